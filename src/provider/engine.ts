/**
 * Inference engines behind the provider agent. An engine turns chat messages
 * into a stream of text pieces (about one token each) and, once the stream
 * ends, reports the token counts and why it stopped: the generator's return
 * value. Two engines:
 *  - BuiltinEngine: deterministic and offline, for tests, demos and
 *    benchmarks of everything around the model;
 *  - OpenAIUpstreamEngine: any OpenAI-compatible server (Ollama, llama.cpp
 *    server, vLLM), streamed.
 *
 * A piece is the answer's text, or text on another channel of the reply (the
 * network's chunk channels): `reasoning` (a thinking model's trace) or
 * `tool_call` (the JSON of an OpenAI `delta.tool_calls` array). A job's
 * public constraints (a JSON Schema for the output, tools) reach the engine
 * as they are on the job record; an engine that cannot honour them says so
 * (`supports`) and the job is refused rather than served unconstrained.
 */
import { createHash } from 'node:crypto'
import { Agent as HttpAgent, request as httpRequest, type IncomingMessage, type RequestOptions } from 'node:http'
import { urlToHttpOptions } from 'node:url'
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https'
import { setTimeout as sleep } from 'node:timers/promises'
import { canonicalBytes } from '../crypto/canonical-json.ts'
import type { FinishReason, GenerationParams } from '../protocol/agent.ts'
import { contentText, type InputMessage } from '../protocol/input.ts'
import type { JobConstraints } from '../protocol/job-constraints.ts'

export interface GenerateRequest {
  model: string
  messages: InputMessage[]
  /** Most pieces (tokens) to produce; reaching it ends the generation with 'length'. */
  maxTokens: number
  params: GenerationParams
  /** Aborting it ends the generation promptly: the generator throws. */
  signal: AbortSignal
  /** The job's structured-output schema and tools, as its record has them. */
  constraints?: JobConstraints
}

/** A piece on a channel other than the answer's. */
export interface ChannelPiece {
  channel: 'reasoning' | 'tool_call'
  text: string
}

/** The answer's text, or text on another channel. */
export type Piece = string | ChannelPiece
export type PieceChannel = 'content' | ChannelPiece['channel']

/** What an engine can be asked besides text: a job that needs more is refused. */
export interface EngineSupport {
  /** Image parts in the messages. */
  images: boolean
  /** `tools` (and tool calls and results in the messages). */
  tools: boolean
  /** An output JSON Schema. */
  outputSchema: boolean
}

export interface Completion {
  tokensIn: number
  tokensOut: number
  finishReason: FinishReason
}

export interface Engine {
  /** Yields pieces; returns the completion. */
  generate(req: GenerateRequest): AsyncGenerator<Piece, Completion, undefined>
  /** Absent: text only. */
  readonly supports?: EngineSupport
}

/** Why `engine` cannot run `req` (what it would have to ignore), or null when it can. */
export function unsupported(engine: Engine, req: Pick<GenerateRequest, 'messages' | 'constraints'>): string | null {
  const s = engine.supports
  if (req.constraints?.outputSchema && !s?.outputSchema) return 'this machine does not serve structured output (response_format)'
  if ((req.constraints?.tools || req.messages.some((m) => m.tool_calls || m.tool_call_id !== undefined)) && !s?.tools) return 'this machine does not serve tool calls'
  if (req.messages.some((m) => typeof m.content !== 'string' && m.content.some((p) => p.type === 'image')) && !s?.images) return 'this machine does not read images'
  return null
}

export class EngineError extends Error {
  override name = 'EngineError'
}

/** Runs a generation to its end, handing each piece's text and channel to `onPiece`; the completion. */
export async function drain(gen: AsyncGenerator<Piece, Completion, undefined>, onPiece: (text: string, channel: PieceChannel) => void): Promise<Completion> {
  let step = await gen.next()
  try {
    while (!step.done) {
      const piece = step.value
      if (typeof piece === 'string') onPiece(piece, 'content')
      else onPiece(piece.text, piece.channel)
      step = await gen.next()
    }
    return step.value
  } finally {
    // onPiece threw: close the generator so an upstream request is not left open.
    if (!step.done) await gen.return(undefined as never).catch(() => undefined)
  }
}

/** Most stop sequences a request may carry (OpenAI's limit). */
const MAX_STOP = 4

/**
 * Sampling values from a request (an exchange frame or an HTTP body), kept
 * only where well-formed: a malformed value falls back to the model default
 * rather than failing the job.
 */
export function generationParams(raw: unknown): GenerationParams {
  const r = (raw && typeof raw === 'object' ? raw : {}) as Record<string, unknown>
  const num = (v: unknown, max: number) => (typeof v === 'number' && Number.isFinite(v) && v >= 0 && v <= max ? v : undefined)
  const stop = (typeof r.stop === 'string' ? [r.stop] : Array.isArray(r.stop) ? r.stop : []).filter((s): s is string => typeof s === 'string' && s.length > 0).slice(0, MAX_STOP)
  return {
    ...(num(r.temperature, 2) !== undefined ? { temperature: r.temperature as number } : {}),
    ...(num(r.top_p, 1) !== undefined ? { top_p: r.top_p as number } : {}),
    ...(stop.length ? { stop } : {}),
    ...(Number.isSafeInteger(r.seed) ? { seed: r.seed as number } : {}),
  }
}

const wordCount = (s: string) => s.split(/\s+/).filter(Boolean).length

// ---- builtin ---------------------------------------------------------------

const VOCABULARY = (
  'the a quiet river stone light over under bright morning signal garden after small network carries every slow green paper ' +
  'window echo north field gentle open number silver bridge and with through careful engine distant cloud simple answer measured ' +
  'warm token harbor line shape clear road patient many one lantern across steady blue thread before soft circuit orchard plain'
).split(' ')

/** Words echoed from the last user message before the generated ones. */
const ECHO_WORDS = 12
const NATURAL_MIN = 20
const NATURAL_SPREAD = 21

/** A stream of uint32s: sha256(seed || counter), counter = 0, 1, ... */
class DigestStream {
  private readonly seed: Uint8Array
  private block = Buffer.alloc(0)
  private pos = 0
  private counter = 0

  constructor(seed: Uint8Array) {
    this.seed = seed
  }

  below(n: number): number {
    if (this.pos + 4 > this.block.length) {
      const c = Buffer.alloc(4)
      c.writeUInt32BE(this.counter++)
      this.block = createHash('sha256').update(this.seed).update(c).digest()
      this.pos = 0
    }
    const v = this.block.readUInt32BE(this.pos)
    this.pos += 4
    return v % n
  }
}

/** Floats are not canonical JSON: sampling values enter the seed as thousandths. */
const milli = (x: number | undefined) => (typeof x === 'number' && Number.isFinite(x) ? Math.round(x * 1000) : undefined)

export interface BuiltinEngineOpts {
  /** Pause before each piece, so tests can make a generation slow (default 0). */
  delayMs?: number
}

/**
 * Deterministic: the same model, messages, sampling values and seed give the
 * same text. The reply echoes the last user message ("You said: ...") and
 * goes on with words drawn from a generator seeded by the sha256 of the
 * canonical input, 20 to 40 of them, one piece (token) per word. `maxTokens`
 * and `stop` cut the same text, so a cut reply is a prefix of the full one.
 */
export class BuiltinEngine implements Engine {
  private readonly delayMs: number

  constructor(opts: BuiltinEngineOpts = {}) {
    this.delayMs = opts.delayMs ?? 0
  }

  /** The pieces the request produces and why they end (no delay, no signal). */
  plan(req: Omit<GenerateRequest, 'signal'>): { pieces: string[]; completion: Completion } {
    const seed = createHash('sha256')
      .update(
        canonicalBytes({
          model: req.model,
          messages: req.messages.map((m) => ({ role: m.role, content: m.content })),
          seed: Number.isSafeInteger(req.params.seed) ? req.params.seed : undefined,
          temperatureMilli: milli(req.params.temperature),
          topPMilli: milli(req.params.top_p),
        }),
      )
      .digest()
    const prng = new DigestStream(seed)
    const lastUser = req.messages.filter((m) => m.role === 'user').at(-1) ?? req.messages.at(-1)
    const echoed = contentText(lastUser?.content ?? '').split(/\s+/).filter(Boolean)
    const echo = echoed.length > ECHO_WORDS ? [...echoed.slice(0, ECHO_WORDS), '...'] : echoed
    let pieces = echo.length ? ['You ', 'said: ', ...echo.map((w, i) => (i === echo.length - 1 && !/[.!?]$/.test(w) ? `${w}. ` : `${w} `))] : ['You ', 'said ', 'nothing. ']
    const n = NATURAL_MIN + prng.below(NATURAL_SPREAD)
    for (let i = 0; i < n; i++) {
      const w = VOCABULARY[prng.below(VOCABULARY.length)]!
      pieces.push(i === 0 ? w[0]!.toUpperCase() + w.slice(1) + ' ' : i === n - 1 ? `${w}.` : `${w} `)
    }

    let finishReason: FinishReason = 'stop'
    const cut = firstStop(pieces.join(''), req.params.stop)
    if (cut >= 0) pieces = prefixPieces(pieces, cut)
    if (pieces.length > req.maxTokens) {
      pieces = pieces.slice(0, Math.max(0, req.maxTokens))
      finishReason = 'length'
    }
    const tokensIn = req.messages.reduce((sum, m) => sum + wordCount(contentText(m.content)), 0)
    return { pieces, completion: { tokensIn, tokensOut: pieces.length, finishReason } }
  }

  async *generate(req: GenerateRequest): AsyncGenerator<string, Completion, undefined> {
    const { pieces, completion } = this.plan(req)
    for (const piece of pieces) {
      req.signal.throwIfAborted()
      if (this.delayMs > 0) await sleep(this.delayMs, undefined, { signal: req.signal })
      yield piece
    }
    req.signal.throwIfAborted()
    return completion
  }
}

/** Index of the earliest stop sequence in `text`, -1 when none occurs. */
function firstStop(text: string, stop: string[] | undefined): number {
  let cut = -1
  for (const s of stop ?? []) {
    if (!s) continue
    const i = text.indexOf(s)
    if (i >= 0 && (cut < 0 || i < cut)) cut = i
  }
  return cut
}

/** The pieces cut to their first `length` characters (a piece split by the cut keeps its head). */
function prefixPieces(pieces: string[], length: number): string[] {
  const out: string[] = []
  let left = length
  for (const p of pieces) {
    if (left <= 0) break
    out.push(p.slice(0, left))
    left -= p.length
  }
  return out
}

// ---- OpenAI-compatible upstream -------------------------------------------

/** The chat completions endpoint under a base URL given with or without `/v1`. */
export function chatCompletionsUrl(base: string): string {
  const b = base.replace(/\/+$/, '')
  if (b.endsWith('/chat/completions')) return b
  return b.endsWith('/v1') ? `${b}/chat/completions` : `${b}/v1/chat/completions`
}

interface StreamChunk {
  choices?: { delta?: { content?: unknown; reasoning_content?: unknown; reasoning?: unknown; tool_calls?: unknown }; finish_reason?: unknown }[]
  usage?: { prompt_tokens?: unknown; completion_tokens?: unknown } | null
  error?: { message?: unknown }
}

const count = (v: unknown): number | undefined => (Number.isSafeInteger(v) && (v as number) >= 0 ? (v as number) : undefined)

/** The messages in OpenAI's form: an image part as an `image_url` data URL; tool calls and results as they are. */
export function upstreamMessages(messages: InputMessage[]): unknown[] {
  return messages.map((m) => ({
    role: m.role,
    content: typeof m.content === 'string' ? m.content : m.content.map((p) => (p.type === 'text' ? { type: 'text', text: p.text } : { type: 'image_url', image_url: { url: `data:${p.mime};base64,${p.data}` } })),
    ...(m.tool_calls ? { tool_calls: m.tool_calls } : {}),
    ...(m.tool_call_id !== undefined ? { tool_call_id: m.tool_call_id } : {}),
  }))
}

/** The constraints as OpenAI's request fields: `tools`, `tool_choice` (a named function as its object form), `response_format`. */
export function upstreamConstraints(c: JobConstraints | undefined): Record<string, unknown> {
  if (!c) return {}
  const choice = c.toolChoice === 'required' && c.toolChoiceFunction ? { type: 'function', function: { name: c.toolChoiceFunction } } : c.toolChoice
  return {
    ...(c.tools ? { tools: c.tools } : {}),
    ...(c.tools && choice ? { tool_choice: choice } : {}),
    ...(c.outputSchema ? { response_format: { type: 'json_schema', json_schema: c.outputSchema } } : {}),
  }
}

/**
 * Streams from an OpenAI-compatible `/v1/chat/completions`. Token counts come
 * from the final usage chunk (`stream_options.include_usage`); a server that
 * sends none gets estimates (one token per streamed piece out, about four
 * characters per token in).
 *
 * Over node:http(s) with a keep-alive connection pool, read as 'data'
 * events: the first piece reaches the job about a millisecond sooner than
 * through fetch (whose WHATWG request, body stream and decoder stream cost
 * that much on every job).
 */
export class OpenAIUpstreamEngine implements Engine {
  readonly url: string
  /** Passed through to the upstream: whether its model honours them is the operator's choice of model. */
  readonly supports: EngineSupport
  private readonly apiKey: string | undefined
  private readonly target: URL
  private readonly requestTarget: RequestOptions
  private readonly agent: HttpAgent

  constructor(url: string, apiKey?: string, supports: Partial<EngineSupport> = {}) {
    this.url = chatCompletionsUrl(url)
    this.apiKey = apiKey
    this.supports = { images: true, tools: true, outputSchema: true, ...supports }
    this.target = new URL(this.url)
    if (this.target.protocol !== 'http:' && this.target.protocol !== 'https:') throw new EngineError(`upstream URL must be http(s): ${this.url}`)
    // Converted once, not on every request.
    this.requestTarget = urlToHttpOptions(this.target)
    // Idle connections do not keep the process alive (the agent unrefs them).
    this.agent = this.target.protocol === 'https:' ? new HttpsAgent({ keepAlive: true }) : new HttpAgent({ keepAlive: true })
  }

  /** The response to the request, retried once on a fresh connection when a pooled one was closed under it. */
  private async post(body: string, signal: AbortSignal): Promise<IncomingMessage> {
    const send = () =>
      new Promise<IncomingMessage>((resolve, reject) => {
        const req = (this.target.protocol === 'https:' ? httpsRequest : httpRequest)({
          ...this.requestTarget,
          method: 'POST',
          agent: this.agent,
          signal,
          headers: {
            'content-type': 'application/json',
            'content-length': Buffer.byteLength(body),
            accept: 'text/event-stream',
            ...(this.apiKey ? { authorization: `Bearer ${this.apiKey}` } : {}),
          },
        })
        req.once('response', resolve)
        req.once('error', (err) => reject(Object.assign(err, { reused: req.reusedSocket })))
        req.end(body)
      })
    try {
      return await send()
    } catch (err) {
      // The server closed an idle keep-alive connection just as it was reused: nothing was processed.
      if ((err as { reused?: boolean }).reused && (err as { code?: string }).code === 'ECONNRESET' && !signal.aborted) return send()
      throw err
    }
  }

  async *generate(req: GenerateRequest): AsyncGenerator<Piece, Completion, undefined> {
    const { temperature, top_p, stop, seed } = req.params
    const body = JSON.stringify({
      model: req.model,
      messages: upstreamMessages(req.messages),
      ...upstreamConstraints(req.constraints),
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: req.maxTokens,
      temperature,
      top_p,
      stop: stop?.length ? stop : undefined,
      seed,
    })
    const res = await this.post(body, req.signal)
    if (res.statusCode !== 200) throw new EngineError(`upstream answered HTTP ${res.statusCode}${await errorMessage(res)}`)

    // The body as it arrives, pulled one 'data' event at a time.
    const texts: string[] = []
    let ended = false
    let failed: Error | null = null
    let wake: (() => void) | null = null
    const poke = () => {
      const w = wake
      wake = null
      w?.()
    }
    res.setEncoding('utf8')
    res.on('data', (t: string) => {
      texts.push(t)
      poke()
    })
    res.once('end', () => {
      ended = true
      poke()
    })
    res.once('error', (err) => {
      failed = err
      poke()
    })
    req.signal.addEventListener('abort', poke)

    let buf = ''
    let pieces = 0
    let finish: unknown = null
    let done = false
    let usage: StreamChunk['usage'] = null
    try {
      read: for (;;) {
        req.signal.throwIfAborted()
        if (failed) throw failed
        const text = texts.shift()
        if (text === undefined) {
          if (ended) break
          await new Promise<void>((resolve) => (wake = resolve))
          continue
        }
        buf += text
        for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
          const line = buf.slice(0, nl).trim()
          buf = buf.slice(nl + 1)
          if (!line.startsWith('data:')) continue
          const data = line.slice(5).trim()
          if (data === '[DONE]') {
            done = true
            break read
          }
          let chunk: StreamChunk
          try {
            chunk = JSON.parse(data) as StreamChunk
          } catch {
            throw new EngineError('upstream sent a malformed stream event')
          }
          if (chunk.error) throw new EngineError(`upstream error: ${String(chunk.error.message ?? 'unknown').slice(0, 200)}`)
          const choice = chunk.choices?.[0]
          const delta = choice?.delta
          // A thinking trace rides a sibling field (vLLM's reasoning_content, Ollama's reasoning).
          const reasoning = delta?.reasoning_content ?? delta?.reasoning
          if (typeof reasoning === 'string' && reasoning) {
            pieces++
            yield { channel: 'reasoning', text: reasoning }
          }
          // Tool-call fragments as the upstream streams them: the requester's side assembles them by index.
          if (Array.isArray(delta?.tool_calls) && delta.tool_calls.length) {
            pieces++
            yield { channel: 'tool_call', text: JSON.stringify(delta.tool_calls) }
          }
          const content = delta?.content
          if (typeof content === 'string' && content) {
            pieces++
            yield content
          }
          if (choice?.finish_reason) finish = choice.finish_reason
          if (chunk.usage) usage = chunk.usage
        }
      }
    } finally {
      req.signal.removeEventListener('abort', poke)
      // A response read to its end leaves its connection to the pool; anything else (done early, failed,
      // aborted, a server that holds the stream open after [DONE]) is not held open.
      if (!res.complete) res.destroy()
    }
    if (!done && !finish) throw new EngineError('upstream stream ended before the reply did')
    const chars = req.messages.reduce((sum, m) => sum + contentText(m.content).length, 0)
    return {
      tokensIn: count(usage?.prompt_tokens) ?? Math.ceil(chars / 4),
      tokensOut: count(usage?.completion_tokens) ?? pieces,
      finishReason: finish === 'length' ? 'length' : 'stop',
    }
  }
}

/** The upstream's error message, if it sent an OpenAI-style one (never the request). */
async function errorMessage(res: IncomingMessage): Promise<string> {
  try {
    const parts: Buffer[] = []
    let size = 0
    for await (const part of res as AsyncIterable<Buffer>) {
      size += part.length
      // Only the start of an error body is read: the message is cut to 200 characters anyway.
      if (size > 64 * 1024) break
      parts.push(part)
    }
    const body = JSON.parse(Buffer.concat(parts).toString('utf8')) as { error?: { message?: unknown } | string }
    const msg = typeof body.error === 'string' ? body.error : body.error?.message
    return typeof msg === 'string' ? `: ${msg.slice(0, 200)}` : ''
  } catch {
    return ''
  }
}
