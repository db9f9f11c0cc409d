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
 *
 * A messages-v1 message is the network's envelope message: `content` a string
 * or parts (`{type:"text",text}`, `{type:"image",mime,data}` with the image's
 * bytes in base64), an assistant's `tool_calls` and a tool result's
 * `tool_call_id` as OpenAI names them. Readers that take text only
 * (`decodeInput`) refuse the rest rather than drop it.
 */
import { sha256 } from '@noble/hashes/sha2.js'
import { bytesToHex } from '@noble/hashes/utils.js'
import { canonicalBytes } from '../crypto/canonical-json.ts'

export const INPUT_FORMATS = ['messages-v1', 'text'] as const
export type InputFormat = (typeof INPUT_FORMATS)[number]

/** A text-only message. */
export interface ChatMessage {
  role: string
  content: string
}

export interface TextPart {
  type: 'text'
  text: string
}

/** An image carried inline: `data` is its bytes in standard base64, `mime` its media type (image/...). */
export interface ImagePart {
  type: 'image'
  mime: string
  data: string
}

export type ContentPart = TextPart | ImagePart

/** A call the assistant made, as OpenAI names it (`arguments` is the JSON text the model wrote). */
export interface ToolCall {
  id: string
  type: 'function'
  function: { name: string; arguments: string }
}

/** A message of the messages-v1 document. */
export interface InputMessage {
  role: string
  content: string | ContentPart[]
  /** On an assistant message: the calls it made. */
  tool_calls?: ToolCall[]
  /** On a tool message: the call it answers. */
  tool_call_id?: string
}

/** The text of a message's content: its text parts joined by newlines (images have none). */
export const contentText = (content: InputMessage['content']): string =>
  typeof content === 'string' ? content : content.flatMap((p) => (p.type === 'text' ? [p.text] : [])).join('\n')

export class InputError extends Error {
  override name = 'InputError'
}

/** `text` cannot carry a salt: its commitment can be confirmed by guessing, so `messages-v1` is the default. */
export function encodeInput(messages: InputMessage[], format: InputFormat = 'messages-v1'): Uint8Array {
  if (format === 'text') {
    if (messages.some((m) => typeof m.content !== 'string' || m.tool_calls || m.tool_call_id !== undefined)) throw new InputError('the text format holds text messages only')
    return new TextEncoder().encode(messages.map((m) => `${m.role}: ${m.content}`).join('\n'))
  }
  return canonicalBytes({ v: 1, salt: randomSalt(), messages: messages.map(envelopeMessage) })
}

/** Exactly the envelope's fields, in its shapes (nothing else a caller's objects carry). */
function envelopeMessage(m: InputMessage): InputMessage {
  return {
    role: m.role,
    content: typeof m.content === 'string' ? m.content : m.content.map((p) => (p.type === 'text' ? { type: 'text', text: p.text } : { type: 'image', mime: p.mime, data: p.data })),
    ...(m.tool_calls ? { tool_calls: m.tool_calls.map((c) => ({ id: c.id, type: 'function' as const, function: { name: c.function.name, arguments: c.function.arguments } })) } : {}),
    ...(m.tool_call_id !== undefined ? { tool_call_id: m.tool_call_id } : {}),
  }
}

/** 16 random bytes, base64 (Web Crypto: the same in Node and the browser). */
function randomSalt(): string {
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16))
  return btoa(String.fromCharCode(...bytes))
}

/** The text messages of an opened input; throws InputError on anything malformed, or on images and tool calls (not text). */
export function decodeInput(bytes: Uint8Array, format: string | undefined): ChatMessage[] {
  return decodeMessages(bytes, format).map((m) => {
    if (typeof m.content !== 'string' || m.tool_calls || m.tool_call_id !== undefined) throw new InputError('this reader takes text messages only (no images or tool calls)')
    return { role: m.role, content: m.content }
  })
}

/** The messages of an opened input, with their parts and tool fields; throws InputError on anything malformed. */
export function decodeMessages(bytes: Uint8Array, format: string | undefined): InputMessage[] {
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
  return d.messages.map((m, i) => {
    const { role, content, tool_calls, tool_call_id } = (m ?? {}) as Record<string, unknown>
    if (typeof role !== 'string') throw new InputError(`message ${i} needs a string role`)
    const out: InputMessage = { role, content: contentOf(content, i) }
    if (tool_calls !== undefined) out.tool_calls = toolCallsOf(tool_calls, i)
    if (tool_call_id !== undefined) {
      if (typeof tool_call_id !== 'string') throw new InputError(`message ${i}: tool_call_id must be a string`)
      out.tool_call_id = tool_call_id
    }
    return out
  })
}

function contentOf(content: unknown, i: number): InputMessage['content'] {
  if (typeof content === 'string') return content
  if (!Array.isArray(content)) throw new InputError(`message ${i}: content must be a string or a list of parts`)
  return content.map((part, j): ContentPart => {
    const p = (part ?? {}) as Record<string, unknown>
    if (p.type === 'text' && typeof p.text === 'string') return { type: 'text', text: p.text }
    if (p.type === 'image' && typeof p.mime === 'string' && typeof p.data === 'string') return { type: 'image', mime: p.mime, data: p.data }
    throw new InputError(`message ${i} part ${j}: a part is {type:"text",text} or {type:"image",mime,data}`)
  })
}

function toolCallsOf(calls: unknown, i: number): ToolCall[] {
  if (!Array.isArray(calls)) throw new InputError(`message ${i}: tool_calls must be a list`)
  return calls.map((call, j) => {
    const c = (call ?? {}) as { id?: unknown; type?: unknown; function?: { name?: unknown; arguments?: unknown } }
    if (typeof c.id !== 'string' || c.type !== 'function' || typeof c.function?.name !== 'string' || typeof c.function.arguments !== 'string') {
      throw new InputError(`message ${i} tool call ${j}: needs an id, type "function" and a function with a name and arguments`)
    }
    return { id: c.id, type: 'function', function: { name: c.function.name, arguments: c.function.arguments } }
  })
}

/** Node's crypto, looked up without an import so this module still loads in a browser. */
const native = (globalThis as { process?: { getBuiltinModule?: (id: string) => unknown } }).process?.getBuiltinModule?.('node:crypto') as typeof import('node:crypto') | undefined

/** sha256 hex; native in Node (several times faster than the pure-JS hash, which the browser uses). */
export const sha256HexOf = (bytes: Uint8Array): string => (native ? native.createHash('sha256').update(bytes).digest('hex') : bytesToHex(sha256(bytes)))

/** sha256 hex of the exact sealed plaintext. */
export const inputCommitment = (plaintext: Uint8Array): string => sha256HexOf(plaintext)
