/**
 * The sealed job input, as requesters build it and providers read it. Two
 * formats, as on the network:
 *  - `messages-v1`: canonical JSON `{"messages":[{"content":..,"role":..}],"salt":..,"v":1}`;
 *  - `text`: UTF-8 of "role: content" lines joined by "\n" (older clients);
 *  - absent: the whole text is one user message (how the reference provider
 *    reads a job that names no format).
 * `inputCommitment` is the sha256 hex of the exact plaintext bytes sealed, so
 * the job record, the receipt and the sealed bytes can be matched later
 * without revealing the prompt. The commitment is public (job and receipt
 * records), so `salt` (16 random bytes, base64) keeps a short prompt from
 * being confirmed by hashing guesses. Readers ignore top-level fields they do
 * not know (the reference provider's `parse_messages_v1` reads only `v` and
 * `messages`), and documents without a salt still decode. Browser-safe: no
 * Node imports (Node's crypto is used when the runtime has it).
 */
import { sha256 } from '@noble/hashes/sha2.js'
import { bytesToHex } from '@noble/hashes/utils.js'
import { canonicalBytes } from '../crypto/canonical-json.ts'

export const INPUT_FORMATS = ['messages-v1', 'text'] as const
export type InputFormat = (typeof INPUT_FORMATS)[number]

export interface ChatMessage {
  role: string
  content: string
}

export class InputError extends Error {
  override name = 'InputError'
}

/** `text` cannot carry a salt: its commitment can be confirmed by guessing, so `messages-v1` is the default. */
export function encodeInput(messages: ChatMessage[], format: InputFormat = 'messages-v1'): Uint8Array {
  if (format === 'text') return new TextEncoder().encode(messages.map((m) => `${m.role}: ${m.content}`).join('\n'))
  return canonicalBytes({ v: 1, salt: randomSalt(), messages: messages.map((m) => ({ role: m.role, content: m.content })) })
}

/** 16 random bytes, base64 (Web Crypto: the same in Node and the browser). */
function randomSalt(): string {
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16))
  return btoa(String.fromCharCode(...bytes))
}

/** The messages of an opened input; throws InputError on anything malformed. */
export function decodeInput(bytes: Uint8Array, format: string | undefined): ChatMessage[] {
  const text = new TextDecoder('utf-8', { fatal: true }).decode(bytes)
  if (format === undefined) return [{ role: 'user', content: text }]
  if (format === 'text') {
    return text.split('\n').map((line) => {
      const i = line.indexOf(': ')
      return i > 0 ? { role: line.slice(0, i), content: line.slice(i + 2) } : { role: 'user', content: line }
    })
  }
  if (format !== 'messages-v1') throw new InputError(`unknown input format "${format}"`)
  let doc: unknown
  try {
    doc = JSON.parse(text)
  } catch {
    throw new InputError('messages-v1 input is not JSON')
  }
  const d = doc as { v?: unknown; messages?: unknown }
  if (d.v !== 1 || !Array.isArray(d.messages)) throw new InputError('messages-v1 input needs v: 1 and a messages array')
  return d.messages.map((m) => {
    const { role, content } = (m ?? {}) as Record<string, unknown>
    if (typeof role !== 'string' || typeof content !== 'string') throw new InputError('each message needs a string role and content')
    return { role, content }
  })
}

/** Node's crypto, looked up without an import so this module still loads in a browser. */
const native = (globalThis as { process?: { getBuiltinModule?: (id: string) => unknown } }).process?.getBuiltinModule?.('node:crypto') as typeof import('node:crypto') | undefined

/** sha256 hex; native in Node (several times faster than the pure-JS hash, which the browser uses). */
export const sha256HexOf = (bytes: Uint8Array): string => (native ? native.createHash('sha256').update(bytes).digest('hex') : bytesToHex(sha256(bytes)))

/** sha256 hex of the exact sealed plaintext. */
export const inputCommitment = (plaintext: Uint8Array): string => sha256HexOf(plaintext)
