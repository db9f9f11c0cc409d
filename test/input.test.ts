/**
 * The sealed job input (src/protocol/input.ts). Its commitment is published
 * on job and receipt records, so a `messages-v1` document carries a random
 * salt: the same messages never encode (nor commit) the same twice, and a
 * guessed prompt cannot be confirmed by hashing it. Documents without a salt
 * (older clients) still decode.
 *
 *   npx vitest run test/input.test.ts
 */
import { describe, expect, it } from 'vitest'
import { canonicalBytes } from '../src/crypto/canonical-json.ts'
import { decodeInput, encodeInput, inputCommitment } from '../src/protocol/input.ts'

const messages = [
  { role: 'system', content: 'be brief' },
  { role: 'user', content: 'yes' },
]
const text = (b: Uint8Array) => new TextDecoder().decode(b)

describe('messages-v1 input', () => {
  it('is salted: two encodings of the same messages differ, and both decode to those messages', () => {
    const a = encodeInput(messages)
    const b = encodeInput(messages)
    expect(text(a)).not.toBe(text(b))
    expect(inputCommitment(a)).not.toBe(inputCommitment(b))
    expect(decodeInput(a, 'messages-v1')).toEqual(messages)
    expect(decodeInput(b, 'messages-v1')).toEqual(messages)
  })

  it('carries 16 random bytes of salt at the top level, in canonical JSON, beside v and messages', () => {
    const bytes = encodeInput(messages)
    const doc = JSON.parse(text(bytes)) as { v: number; salt: string; messages: unknown }
    expect(Object.keys(doc)).toEqual(['messages', 'salt', 'v'])
    expect(doc.v).toBe(1)
    expect(Buffer.from(doc.salt, 'base64')).toHaveLength(16)
    // Canonical bytes: a verifier holding the document (salt included) rebuilds the committed bytes.
    expect(text(canonicalBytes(doc))).toBe(text(bytes))
  })

  it('cannot be confirmed by hashing a guessed prompt', () => {
    const guessed = inputCommitment(canonicalBytes({ v: 1, messages }))
    expect(inputCommitment(encodeInput(messages))).not.toBe(guessed)
  })

  it('still decodes a document without a salt, and ignores other top-level fields', () => {
    expect(decodeInput(canonicalBytes({ v: 1, messages }), 'messages-v1')).toEqual(messages)
    expect(decodeInput(canonicalBytes({ v: 1, messages, extra: { any: 1 } }), 'messages-v1')).toEqual(messages)
  })

  it('reads input that names no format as one user message, as the reference provider does', () => {
    expect(decodeInput(new TextEncoder().encode('user: hi\nassistant: hello'), undefined)).toEqual([{ role: 'user', content: 'user: hi\nassistant: hello' }])
  })

  it('leaves the text format as it was (it has no place for a salt)', () => {
    expect(text(encodeInput(messages, 'text'))).toBe('system: be brief\nuser: yes')
  })
})
