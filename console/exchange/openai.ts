/**
 * The OpenAI-compatible API on the console port: `POST /v1/chat/completions`
 * (streamed or not), `GET /v1/models`, and the routing variants
 * `/v1/{private,verified,probono}/...`. API keys with the `inference` scope
 * only; errors are OpenAI error objects.
 *
 * These endpoints receive plaintext by their nature. The prompt is sealed on
 * receipt to each provider tried, reply chunks are opened only to be written
 * to the response, and neither is logged or stored: they live in this
 * request's memory and nowhere else (test/exchange-privacy.test.ts).
 */
import { randomBytes } from 'node:crypto'
import { IncomingMessage, ServerResponse } from 'node:http'
import { RESPONSE_ALREADY_SENT } from '@hono/node-server/utils/response'
import { Hono, type Context } from 'hono'
import { bodyLimit } from 'hono/body-limit'
import { consoleLogger as log } from '../../src/logger.ts'
import type { GenerationParams } from '../../src/protocol/agent.ts'
import { encodeInput, inputCommitment, type ChatMessage } from '../../src/protocol/input.ts'
import type { ApiKey, KeyGate } from '../api-keys.ts'
import { admit, AdmissionError, type InferenceDeps } from './admission.ts'
import { ExchangeError, TIERS, type ExchangeEvent, type Route, type Tier } from './exchange.ts'
import { ReceiptSealer } from './receipt-sealer.ts'

export interface OpenAiDeps extends InferenceDeps {
  gate: KeyGate
  /** The client address, as the console takes it (for the limits per address). */
  clientIp: (c: Context) => string | undefined
}

/** Most tokens a reply may be asked for (the job lexicon's maximum). */
const MAX_TOKENS_LIMIT = 2_000_000
const DEFAULT_MAX_TOKENS = 1024

type ErrorType = 'invalid_request_error' | 'authentication_error' | 'permission_error' | 'rate_limit_error' | 'insufficient_quota' | 'not_found_error' | 'server_error'

export class OpenAiError extends Error {
  override name = 'OpenAiError'
  readonly status: number
  readonly type: ErrorType
  readonly code: string
  readonly param: string | null
  readonly retryAfterSec?: number
  constructor(status: number, type: ErrorType, code: string, message: string, param: string | null = null, retryAfterSec?: number) {
    super(message)
    this.status = status
    this.type = type
    this.code = code
    this.param = param
    this.retryAfterSec = retryAfterSec
  }
  toJSON() {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } }
  }
}

const invalid = (message: string, param: string | null, code = 'invalid_value') => new OpenAiError(400, 'invalid_request_error', code, message, param)

function fromExchange(err: ExchangeError): OpenAiError {
  const type: ErrorType = err.status === 404 ? 'not_found_error' : err.status < 500 ? 'invalid_request_error' : 'server_error'
  return new OpenAiError(err.status, type, err.code, err.message, err.status === 404 ? 'model' : null)
}

const fromAdmission = (err: AdmissionError) =>
  err.code === 'insufficient_quota' ? new OpenAiError(429, 'insufficient_quota', err.code, err.message) : new OpenAiError(403, 'permission_error', err.code, err.message)

export interface ChatRequest {
  model: string
  messages: ChatMessage[]
  maxTokens: number
  params: GenerationParams
  stream: boolean
  includeUsage: boolean
  country?: string
  minProviderVersion?: string
}

/** The request body, checked field by field; unknown fields are ignored, unsupported ones refused. */
export function parseChatRequest(body: unknown): ChatRequest {
  if (!body || typeof body !== 'object' || Array.isArray(body)) throw invalid('the request body must be a JSON object', null)
  const b = body as Record<string, unknown>
  if (typeof b.model !== 'string' || !b.model) throw invalid('model is required (a string)', 'model')
  if (b.model.length > 256) throw invalid('model is at most 256 characters', 'model')
  if (!Array.isArray(b.messages) || b.messages.length === 0) throw invalid('messages must be a non-empty array', 'messages')
  const messages = b.messages.map((m, i): ChatMessage => {
    const { role, content } = (m ?? {}) as Record<string, unknown>
    if (typeof role !== 'string' || !['system', 'developer', 'user', 'assistant'].includes(role)) throw invalid(`messages[${i}].role must be system, developer, user or assistant`, `messages[${i}].role`)
    if (typeof content === 'string') return { role, content }
    // Content parts: text only.
    if (Array.isArray(content) && content.every((p) => p && typeof p === 'object' && (p as { type?: unknown }).type === 'text' && typeof (p as { text?: unknown }).text === 'string')) {
      return { role, content: content.map((p) => (p as { text: string }).text).join('') }
    }
    throw invalid(`messages[${i}].content must be a string or an array of text parts`, `messages[${i}].content`)
  })
  for (const f of ['tools', 'functions', 'tool_choice', 'response_format', 'logprobs'] as const) {
    if (b[f] !== undefined && b[f] !== null && b[f] !== false) throw invalid(`${f} is not supported by this exchange yet`, f, 'unsupported_parameter')
  }
  if (b.n !== undefined && b.n !== null && b.n !== 1) throw invalid('only n = 1 is supported', 'n', 'unsupported_parameter')
  const maxRaw = b.max_completion_tokens ?? b.max_tokens
  let maxTokens = DEFAULT_MAX_TOKENS
  if (maxRaw !== undefined && maxRaw !== null) {
    if (!Number.isSafeInteger(maxRaw) || (maxRaw as number) < 1 || (maxRaw as number) > MAX_TOKENS_LIMIT) throw invalid(`max_tokens must be an integer from 1 to ${MAX_TOKENS_LIMIT}`, b.max_completion_tokens !== undefined ? 'max_completion_tokens' : 'max_tokens')
    maxTokens = maxRaw as number
  }
  const params: GenerationParams = {}
  const num = (name: string, min: number, max: number): number | undefined => {
    const v = b[name]
    if (v === undefined || v === null) return undefined
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) throw invalid(`${name} must be a number from ${min} to ${max}`, name)
    return v
  }
  const temperature = num('temperature', 0, 2)
  const topP = num('top_p', 0, 1)
  if (temperature !== undefined) params.temperature = temperature
  if (topP !== undefined) params.top_p = topP
  if (b.seed !== undefined && b.seed !== null) {
    if (!Number.isSafeInteger(b.seed)) throw invalid('seed must be an integer', 'seed')
    params.seed = b.seed as number
  }
  if (b.stop !== undefined && b.stop !== null) {
    const stop = typeof b.stop === 'string' ? [b.stop] : b.stop
    if (!Array.isArray(stop) || stop.length > 4 || !stop.every((s) => typeof s === 'string' && s.length > 0 && s.length <= 256)) throw invalid('stop must be a string or up to 4 non-empty strings', 'stop')
    params.stop = stop as string[]
  }
  if (b.stream !== undefined && b.stream !== null && typeof b.stream !== 'boolean') throw invalid('stream must be a boolean', 'stream')
  const so = b.stream_options as { include_usage?: unknown } | undefined | null
  if (so !== undefined && so !== null && (typeof so !== 'object' || (so.include_usage !== undefined && typeof so.include_usage !== 'boolean'))) throw invalid('stream_options.include_usage must be a boolean', 'stream_options')
  if (b.country !== undefined && b.country !== null && (typeof b.country !== 'string' || !/^[A-Za-z]{2}$/.test(b.country))) throw invalid('country must be a two-letter ISO 3166-1 code', 'country')
  if (b.min_provider_version !== undefined && b.min_provider_version !== null && (typeof b.min_provider_version !== 'string' || !/^\d+(\.\d+){0,3}$/.test(b.min_provider_version))) {
    throw invalid('min_provider_version must be a dotted version such as 0.4.2', 'min_provider_version')
  }
  return {
    model: b.model,
    messages,
    maxTokens,
    params,
    stream: b.stream === true,
    includeUsage: so?.include_usage === true,
    ...(typeof b.country === 'string' ? { country: b.country.toUpperCase() } : {}),
    ...(typeof b.min_provider_version === 'string' ? { minProviderVersion: b.min_provider_version } : {}),
  }
}

type Env = { Variables: { key: ApiKey } }

const MAX_BODY_BYTES = 4 << 20

/** Headers of a streamed completion besides its content type. */
const API_STREAM_HEADERS = { 'cache-control': 'no-store', 'x-content-type-options': 'nosniff' }
const tooLarge = () => new OpenAiError(413, 'invalid_request_error', 'request_too_large', 'the request body is over 4 MB')

/** Node's request and response, when the app runs on @hono/node-server (not under app.request in tests). */
function nodeBindings(c: Context): { incoming: IncomingMessage; outgoing: ServerResponse } | null {
  const env = c.env as { incoming?: unknown; outgoing?: unknown } | undefined
  return env?.incoming instanceof IncomingMessage && env.outgoing instanceof ServerResponse ? (env as { incoming: IncomingMessage; outgoing: ServerResponse }) : null
}

/**
 * The JSON body. On Node's server, read straight from the request stream:
 * through the adapter's WHATWG Request (a Request object and two stream
 * wrappers per call) it took a few hundred microseconds of the job's path.
 */
async function readJson(c: Context): Promise<unknown> {
  const node = nodeBindings(c)
  // Read already (through the adapter's Request): its cached body.
  if (!node || node.incoming.readableDidRead) return c.req.json()
  const { incoming } = node
  if (Number(incoming.headers['content-length']) > MAX_BODY_BYTES) throw tooLarge()
  const text = await new Promise<string>((resolve, reject) => {
    const parts: Buffer[] = []
    let size = 0
    const done = (err: Error | null) => {
      incoming.off('data', onData).off('end', onEnd).off('error', done).off('close', onClose)
      if (err) reject(err)
      else resolve(Buffer.concat(parts, size).toString('utf8'))
    }
    const onData = (part: Buffer) => {
      size += part.length
      // Refused without reading on (the adapter drains the rest once the answer is sent).
      if (size > MAX_BODY_BYTES) done(tooLarge())
      else parts.push(part)
    }
    const onEnd = () => done(null)
    const onClose = () => done(Object.assign(new Error('the client closed the request before its body ended'), { name: 'AbortError' }))
    incoming.on('data', onData).once('end', onEnd).once('error', done).once('close', onClose)
  })
  return JSON.parse(text)
}

export function openAiRoutes(deps: OpenAiDeps): Hono<Env> {
  const app = new Hono<Env>()
  app.onError((err, c) => {
    // The client went away before the reply began: nobody to answer.
    if (err.name === 'AbortError') return c.body(null, 499 as 400)
    const e = err instanceof OpenAiError ? err : err instanceof ExchangeError ? fromExchange(err) : err instanceof AdmissionError ? fromAdmission(err) : null
    if (!e) {
      log.error('inference API error', { path: c.req.path, err })
      return c.json(new OpenAiError(500, 'server_error', 'internal_error', 'The exchange could not complete this request.').toJSON(), 500)
    }
    if (e.retryAfterSec !== undefined) c.header('Retry-After', String(e.retryAfterSec))
    return c.json(e.toJSON(), e.status as 400)
  })

  // Every call: the limits of its client address, a live key (one answer for every unusable key), then the key's limit.
  app.use('/v1/*', async (c, next) => {
    const key = deps.gate.admit(c.req.header('authorization'), deps.clientIp(c))
    if ('refused' in key) {
      if (key.refused === 'invalid') throw new OpenAiError(401, 'authentication_error', 'invalid_api_key', 'Invalid API key: send a console API key as "Authorization: Bearer <key>"')
      const whose = key.refused === 'key' ? 'this API key' : 'this client address'
      throw new OpenAiError(429, 'rate_limit_error', 'rate_limit_exceeded', `Rate limit exceeded for ${whose}; retry after ${key.retryAfterSec} s`, null, key.retryAfterSec)
    }
    if (!key.scopes.includes('inference')) throw new OpenAiError(403, 'permission_error', 'missing_scope', 'this API key lacks the inference scope')
    deps.usage.add(key.did, key.id, { requests: 1 })
    c.set('key', key)
    await next()
  })
  // On Node's server the body is read (and limited) from the request stream itself, in the handler.
  const limitBody = bodyLimit({ maxSize: MAX_BODY_BYTES, onError: () => Promise.reject(tooLarge()) })
  app.use('/v1/*', (c, next) => (nodeBindings(c) ? next() : limitBody(c, next)))

  const tierOf = (c: Context): Tier | undefined => {
    const t = c.req.param('tier')
    if (t === undefined) return undefined
    if (!(TIERS as readonly string[]).includes(t)) throw new OpenAiError(404, 'not_found_error', 'unknown_endpoint', `no such routing tier: ${t}`)
    return t as Tier
  }

  const models = (c: Context<Env>) => {
    const key = c.get('key')
    const data = deps.exchange.models(key.did, tierOf(c)).map((m) => ({ id: m.id, object: 'model', created: 0, owned_by: 'cocore', providers: m.providers }))
    return c.json({ object: 'list', data })
  }
  app.get('/v1/models', models)
  app.get('/v1/:tier/models', models)

  const completions = async (c: Context<Env>) => {
    const key = c.get('key')
    let body: unknown
    try {
      body = await readJson(c)
    } catch (err) {
      if (err instanceof OpenAiError) throw err
      throw invalid('the request body is not valid JSON', null, 'invalid_json')
    }
    const req = parseChatRequest(body)
    const route: Route = { model: req.model, requesterDid: key.did, tier: tierOf(c), ...(req.country ? { country: req.country } : {}), ...(req.minProviderVersion ? { minProviderVersion: req.minProviderVersion } : {}) }
    admit(deps, key.did)
    // Fail fast on routing, before anything is sealed or published.
    deps.exchange.route(route)

    const plaintext = encodeInput(req.messages)
    const sealer = new ReceiptSealer(plaintext)
    const ac = new AbortController()
    const node = nodeBindings(c)
    // The client went away before the reply ended (as the adapter decides it for its request's signal).
    if (node) node.outgoing.once('close', () => node.outgoing.writableFinished || ac.abort())
    else c.req.raw.signal.addEventListener('abort', () => ac.abort())
    const events = deps.exchange.run({
      route,
      inputCommitment: inputCommitment(plaintext),
      inputFormat: 'messages-v1',
      inputBytes: plaintext.length,
      maxTokensOut: req.maxTokens,
      params: req.params,
      signal: ac.signal,
      seal: sealer.seal,
    })
    const id = `chatcmpl-${randomBytes(12).toString('base64url')}`
    const created = Math.floor(Date.now() / 1000)
    let provider: { did: string; key: string } | null = null
    const open = (ciphertext: string): string => sealer.open(provider!, ciphertext)
    const settle = (e: Extract<ExchangeEvent, { kind: 'complete' }>) => deps.usage.add(key.did, key.id, { tokensIn: e.tokensIn, tokensOut: e.tokensOut })
    const wipe = () => sealer.wipe()
    const usage = (e: Extract<ExchangeEvent, { kind: 'complete' }>) => ({ prompt_tokens: e.tokensIn, completion_tokens: e.tokensOut, total_tokens: e.tokensIn + e.tokensOut })

    if (!req.stream) {
      let text = ''
      let meta: Extract<ExchangeEvent, { kind: 'meta' }> | null = null
      try {
        for await (const e of events) {
          if (e.kind === 'meta') {
            meta = e
            provider = { did: e.providerDid, key: e.encryptionPubKey }
          } else if (e.kind === 'chunk') text += open(e.ciphertext)
          else {
            settle(e)
            return c.json({
              id,
              object: 'chat.completion',
              created,
              model: req.model,
              choices: [{ index: 0, message: { role: 'assistant', content: text }, finish_reason: e.finishReason, logprobs: null }],
              usage: usage(e),
              cocore: { provider: meta?.providerDid, job: meta?.jobUri, receipt: e.receiptUri ?? null },
            })
          }
        }
        throw new ExchangeError('provider_failed', 502, 'the job ended without completing')
      } finally {
        text = ''
        wipe()
      }
    }

    // Pull the first event before answering, so routing and publishing errors are plain HTTP errors.
    const first = await events.next().catch((err: unknown) => {
      wipe()
      throw err
    })
    const encoder = new TextEncoder()
    const sse = (data: unknown) => `data: ${JSON.stringify(data)}\n\n`
    const chunk = (delta: Record<string, unknown>, finish: string | null, extra: Record<string, unknown> = {}) =>
      sse({ id, object: 'chat.completion.chunk', created, model: req.model, choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }], ...extra })
    let meta: Extract<ExchangeEvent, { kind: 'meta' }> | null = null
    let pending: IteratorResult<ExchangeEvent> | null = first
    let ended = false
    const end = async () => {
      if (ended) return
      ended = true
      await events.return(undefined)
      wipe()
    }
    /**
     * The SSE text of the next event, or null once the reply has ended. The
     * role chunk (sent when a provider answers, with its first piece already
     * in hand) leaves together with that piece: one write, one wake-up of the
     * client, for the time to first token.
     */
    const nextText = async (): Promise<string | null> => {
      try {
        const next = pending ?? (await events.next())
        pending = null
        if (next.done) {
          await end()
          return null
        }
        const e = next.value
        if (e.kind === 'meta') {
          meta = e
          provider = { did: e.providerDid, key: e.encryptionPubKey }
          return chunk({ role: 'assistant', content: '' }, null) + ((await nextText()) ?? '')
        }
        if (e.kind === 'chunk') return chunk({ content: open(e.ciphertext) }, null)
        settle(e)
        let text = chunk({}, e.finishReason, { cocore: { provider: meta?.providerDid, job: meta?.jobUri, receipt: e.receiptUri ?? null } })
        if (req.includeUsage) text += sse({ id, object: 'chat.completion.chunk', created, model: req.model, choices: [], usage: usage(e) })
        await end()
        return `${text}data: [DONE]\n\n`
      } catch (err) {
        if (ac.signal.aborted) {
          await end()
          return null
        }
        const e = err instanceof OpenAiError ? err : err instanceof ExchangeError ? fromExchange(err) : new OpenAiError(500, 'server_error', 'internal_error', 'The exchange could not complete this request.')
        if (!(err instanceof OpenAiError || err instanceof ExchangeError)) log.error('inference stream error', { err: err as Error })
        await end()
        // Mid-stream, an error is an event carrying an OpenAI error object.
        return sse(e.toJSON())
      }
    }

    if (node) {
      // Written to Node's response directly: the headers leave with the first event in one write
      // (through the adapter they are flushed alone), and each event is one write, in order, waiting
      // for 'drain' when the client reads slowly, so a slow client holds the relay back. The headers
      // are those the console's middleware gives every response, which does not see this one.
      const out = node.outgoing
      out.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', ...API_STREAM_HEADERS })
      void (async () => {
        for (let text = await nextText(); text !== null; text = await nextText()) {
          if (out.destroyed) return void (await end())
          if (!out.write(text)) await new Promise((resolve) => (out.once('drain', resolve), out.once('close', resolve)))
        }
        out.end()
      })().catch((err: unknown) => {
        log.error('inference stream error', { err: err as Error })
        out.destroy()
      })
      return RESPONSE_ALREADY_SENT
    }
    c.header('Content-Type', 'text/event-stream; charset=utf-8')
    for (const [name, value] of Object.entries(API_STREAM_HEADERS)) c.header(name, value)
    // Pulled as the response is written, one event at a time: a slow client holds the relay back.
    const sseStream = new ReadableStream<Uint8Array>(
      {
        pull: async (controller) => {
          const text = await nextText()
          if (text === null) return controller.close()
          controller.enqueue(encoder.encode(text))
          if (ended) controller.close()
        },
        // The client went away.
        cancel: async () => {
          ac.abort()
          await end()
        },
      },
      { highWaterMark: 0 },
    )
    return c.body(sseStream)
  }
  app.post('/v1/chat/completions', completions)
  app.post('/v1/:tier/chat/completions', completions)
  app.all('/v1/*', (c) => c.json(new OpenAiError(404, 'not_found_error', 'unknown_endpoint', `no such endpoint: ${c.req.method} ${c.req.path}`).toJSON(), 404))
  return app
}
