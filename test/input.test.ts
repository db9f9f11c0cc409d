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
import { decodeInput, decodeMessages, encodeInput, inputCommitment, InputError, type InputMessage } from '../src/protocol/input.ts'

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

describe('messages-v1 with images and tool calls (the network envelope)', () => {
  const conversation: InputMessage[] = [
    { role: 'user', content: [{ type: 'text', text: 'what is this?' }, { type: 'image', mime: 'image/png', data: 'iVBORw0=' }] },
    { role: 'assistant', content: '', tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'lookup', arguments: '{"q":"png"}' } }] },
    { role: 'tool', content: 'a picture', tool_call_id: 'call_1' },
  ]

  it('lays the messages out as the reference envelope does, byte for byte (canonical JSON: sorted keys, no spaces)', () => {
    const doc = JSON.parse(text(encodeInput(conversation))) as { salt: string }
    // Without the salt (our only addition), the bytes the reference's buildEnvelopeBytes gives for these messages.
    const { salt: _, ...unsalted } = doc
    expect(text(canonicalBytes(unsalted))).toBe(
      '{"messages":[' +
        '{"content":[{"text":"what is this?","type":"text"},{"data":"iVBORw0=","mime":"image/png","type":"image"}],"role":"user"},' +
        '{"content":"","role":"assistant","tool_calls":[{"function":{"arguments":"{\\"q\\":\\"png\\"}","name":"lookup"},"id":"call_1","type":"function"}]},' +
        '{"content":"a picture","role":"tool","tool_call_id":"call_1"}' +
        '],"v":1}',
    )
  })

  it('decodes back to the same messages, and only the envelope fields are encoded', () => {
    const extra = conversation.map((m) => ({ ...m, name: 'ignored', content: typeof m.content === 'string' ? m.content : m.content.map((p) => ({ ...p, detail: 'high' })) }))
    expect(decodeMessages(encodeInput(extra), 'messages-v1')).toEqual(conversation)
  })

  it('is refused by a text-only reader, and by the text format, rather than dropped', () => {
    expect(() => decodeInput(encodeInput(conversation), 'messages-v1')).toThrow(InputError)
    expect(() => encodeInput(conversation, 'text')).toThrow(InputError)
  })

  it('refuses malformed parts and tool calls', () => {
    const bad = (m: unknown) => () => decodeMessages(canonicalBytes({ v: 1, messages: [m] }), 'messages-v1')
    expect(bad({ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] })).toThrow(/part 0/)
    expect(bad({ role: 'user', content: [{ type: 'image', mime: 'image/png' }] })).toThrow(InputError)
    expect(bad({ role: 'assistant', content: '', tool_calls: [{ id: 'c', type: 'function', function: { name: 'f' } }] })).toThrow(/tool call 0/)
    expect(bad({ role: 'tool', content: 'x', tool_call_id: 7 })).toThrow(/tool_call_id/)
  })
})
