/**
 * An engine served as a minimal OpenAI-compatible HTTP API:
 * `POST /v1/chat/completions` (streamed as server-sent events or not) and
 * `GET /v1/models`. It is the "provider called directly" baseline of the
 * benchmarks and an upstream for OpenAIUpstreamEngine in tests. A client
 * that disconnects aborts its generation.
 */
import { randomBytes } from 'node:crypto'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { ChatMessage } from '../protocol/input.ts'
import { drain, generationParams, type Completion, type Engine } from './engine.ts'
import { log } from './log.ts'

/** Largest request body accepted. */
const MAX_BODY_BYTES = 1 << 20
/** Output limit when the request sets none. */
const DEFAULT_MAX_TOKENS = 4096

export interface EngineServerOpts {
  /** 0 (the default): any free port. */
  port?: number
  host?: string
  engine: Engine
  /** The model ids served; requests for others get 404 model_not_found. */
  models: string[]
}

export interface EngineServer {
  /** Base URL, e.g. http://127.0.0.1:8080 (the API is under /v1). */
  url: string
  close(): Promise<void>
}

class HttpError extends Error {
  override name = 'HttpError'
  readonly status: number
  readonly code: string | null
  constructor(status: number, message: string, code: string | null = null) {
    super(message)
    this.status = status
    this.code = code
  }
}

interface ChatRequest {
  model: string
  messages: ChatMessage[]
  maxTokens: number
  stream: boolean
  includeUsage: boolean
  body: Record<string, unknown>
}

export async function startEngineServer(opts: EngineServerOpts): Promise<EngineServer> {
  const host = opts.host ?? '127.0.0.1'
  const server = createServer((req, res) => {
    handle(opts, req, res).catch((err: unknown) => {
      // The client went away (its generation was aborted): nobody to answer.
      if (res.destroyed) return
      if (err instanceof HttpError) return sendError(res, err)
      log.error('engine server request failed', { err: err as Error })
      sendError(res, new HttpError(500, 'internal error'))
    })
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(opts.port ?? 0, host, () => resolve())
  })
  const { port } = server.address() as AddressInfo
  return {
    url: `http://${host.includes(':') ? `[${host}]` : host}:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections()
        server.close(() => resolve())
      }),
  }
}

async function handle(opts: EngineServerOpts, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const path = new URL(req.url ?? '/', 'http://x').pathname.replace(/\/+$/, '')
  if (path === '/v1/models' && req.method === 'GET') {
    const created = Math.floor(Date.now() / 1000)
    return sendJson(res, 200, { object: 'list', data: opts.models.map((id) => ({ id, object: 'model', created, owned_by: 'cocore' })) })
  }
  if (path !== '/v1/chat/completions') throw new HttpError(404, `no route ${req.method} ${path}`)
  if (req.method !== 'POST') throw new HttpError(405, 'use POST')
  const chat = parseChatRequest(await readJson(req), opts.models)

  // The client going away (res closed before it ended) aborts the generation.
  const ac = new AbortController()
  res.on('close', () => {
    if (!res.writableEnded) ac.abort()
  })
  const gen = opts.engine.generate({ model: chat.model, messages: chat.messages, maxTokens: chat.maxTokens, params: generationParams(chat.body), signal: ac.signal })
  const id = `chatcmpl-${randomBytes(12).toString('hex')}`
  const created = Math.floor(Date.now() / 1000)
  const usageOf = (c: Completion) => ({ prompt_tokens: c.tokensIn, completion_tokens: c.tokensOut, total_tokens: c.tokensIn + c.tokensOut })

  if (!chat.stream) {
    let text = ''
    // The builtin engine answers text only: another channel has no place in this plain reply.
    const done = await drain(gen, (piece, channel) => channel === 'content' && (text += piece))
    return sendJson(res, 200, {
      id,
      object: 'chat.completion',
      created,
      model: chat.model,
      choices: [{ index: 0, message: { role: 'assistant', content: text }, logprobs: null, finish_reason: done.finishReason }],
      usage: usageOf(done),
    })
  }

  res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive' })
  const event = (data: unknown) => res.write(`data: ${JSON.stringify(data)}\n\n`)
  const chunk = (delta: Record<string, unknown>, finish: string | null) =>
    event({ id, object: 'chat.completion.chunk', created, model: chat.model, choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }] })
  chunk({ role: 'assistant', content: '' }, null)
  try {
    const done = await drain(gen, (piece, channel) => channel === 'content' && chunk({ content: piece }, null))
    chunk({}, done.finishReason)
    if (chat.includeUsage) event({ id, object: 'chat.completion.chunk', created, model: chat.model, choices: [], usage: usageOf(done) })
  } catch (err) {
    if (ac.signal.aborted) return
    // Headers are sent: the failure travels as an error event, as OpenAI's API does.
    log.warn('engine failed mid-stream', { err: err as Error })
    event({ error: { message: 'the engine failed', type: 'server_error', code: null } })
  }
  res.end('data: [DONE]\n\n')
}

function parseChatRequest(body: Record<string, unknown>, models: string[]): ChatRequest {
  const { model, messages, stream, stream_options } = body
  if (typeof model !== 'string') throw new HttpError(400, 'model is required')
  if (!models.includes(model)) throw new HttpError(404, `The model '${model}' does not exist`, 'model_not_found')
  if (!Array.isArray(messages) || messages.length === 0) throw new HttpError(400, 'messages must be a non-empty array')
  const parsed = messages.map((m: unknown) => {
    const { role, content } = (m ?? {}) as Record<string, unknown>
    if (typeof role !== 'string') throw new HttpError(400, 'each message needs a string role')
    return { role, content: messageText(content) }
  })
  const limit = body.max_completion_tokens ?? body.max_tokens
  if (limit !== undefined && limit !== null && !(Number.isSafeInteger(limit) && (limit as number) >= 0)) throw new HttpError(400, 'max_tokens must be a non-negative integer')
  return {
    model,
    messages: parsed,
    maxTokens: (limit as number | null | undefined) ?? DEFAULT_MAX_TOKENS,
    stream: stream === true,
    includeUsage: (stream_options as { include_usage?: unknown } | undefined)?.include_usage === true,
    body,
  }
}

/** A message's text: a string, or the text parts of a content array. */
function messageText(content: unknown): string {
  if (typeof content === 'string') return content
  if (content === null || content === undefined) return ''
  if (Array.isArray(content)) {
    return content
      .map((part: unknown) => {
        const p = (part ?? {}) as { type?: unknown; text?: unknown }
        if (p.type !== 'text' || typeof p.text !== 'string') throw new HttpError(400, 'only text content parts are supported')
        return p.text
      })
      .join('')
  }
  throw new HttpError(400, 'message content must be a string or an array of text parts')
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const parts: Buffer[] = []
  let size = 0
  for await (const part of req as AsyncIterable<Buffer>) {
    size += part.length
    if (size > MAX_BODY_BYTES) throw new HttpError(413, `request body over ${MAX_BODY_BYTES} bytes`)
    parts.push(part)
  }
  try {
    const body = JSON.parse(Buffer.concat(parts).toString('utf8')) as unknown
    if (body && typeof body === 'object' && !Array.isArray(body)) return body as Record<string, unknown>
  } catch {
    // answered below
  }
  throw new HttpError(400, 'the body must be a JSON object')
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' })
  res.end(JSON.stringify(body))
}

function sendError(res: ServerResponse, err: HttpError): void {
  if (res.headersSent) return void res.end()
  sendJson(res, err.status, { error: { message: err.message, type: err.status >= 500 ? 'server_error' : 'invalid_request_error', param: null, code: err.code } })
}
