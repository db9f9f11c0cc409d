/**
 * A small XRPC layer on Hono: `/xrpc/<nsid>` is routed to the handler
 * registered for that NSID; query parameters are coerced by the lexicon's
 * parameter types and validated with `@atproto/lexicon`; errors are XRPC
 * `{ error, message }` bodies, never stack traces.
 *
 * Why not `@atproto/xrpc-server`: it is Express-based; on this machine Hono
 * serves JSON ~5x faster (see README), and validation is the same library.
 */
import { Hono, type Context } from 'hono'
import { ValidationError } from '@atproto/lexicon'
import { lexicons } from '../lexicon/validate.ts'
import { InternalServerError, InvalidRequestError, MethodNotImplementedError, PayloadTooLargeError, RateLimitExceededError, XrpcError } from './errors.ts'
import { readParams } from './params.ts'
import type { Logger } from '../logger.ts'

/**
 * A handler's output already serialized: JSON text that holds stored JSON
 * (a record's body as indexed) spliced in, rather than parsed and written
 * again. `T` is the output it stands for. It is checked against the lexicon
 * like any output when outputs are validated.
 *
 * The router answers it as it is, with `headers` and the router's
 * `answerHeaders` only (headers set on the context are not added): a response
 * built once, with plain headers, which the Node adapter writes without
 * building a Fetch Response and a stream for it.
 */
export class JsonText<T = unknown> {
  readonly text: string
  readonly headers: Record<string, string> | undefined
  declare readonly output?: T
  constructor(text: string, headers?: Record<string, string>) {
    this.text = text
    this.headers = headers
  }
}

export type QueryHandler<Ctx> = (ctx: Ctx, params: Record<string, unknown>, c: Context, input?: unknown) => unknown | Promise<unknown>

/** Largest procedure input accepted (JSON). */
export const MAX_INPUT_BYTES = 256 * 1024

export interface XrpcRouterOpts<Ctx> {
  handlers: Record<string, QueryHandler<Ctx>>
  ctx: Ctx
  log: Logger
  /** Check every response against the lexicon's output schema (dev and tests). */
  validateOutput?: boolean
  /** Headers of every JsonText answer besides its own (lower-case names). */
  answerHeaders?: (c: Context) => Record<string, string>
}

export function xrpcRouter<Ctx>(opts: XrpcRouterOpts<Ctx>): Hono {
  const app = new Hono()
  app.all('/xrpc/:nsid', async (c) => {
    const nsid = c.req.param('nsid')
    const handler = Object.hasOwn(opts.handlers, nsid) ? opts.handlers[nsid] : undefined
    if (!handler) throw new MethodNotImplementedError(nsid)
    const def = lexicons.getDef(nsid)
    if (def?.type === 'query' && c.req.method !== 'GET' && c.req.method !== 'HEAD') {
      throw new InvalidRequestError(`${nsid} is a query: use GET`, 'InvalidRequest')
    }
    let input: unknown
    if (def?.type === 'procedure') {
      if (c.req.method !== 'POST') throw new InvalidRequestError(`${nsid} is a procedure: use POST`)
      input = await readInput(nsid, c)
    }
    const url = c.req.url
    const q = url.indexOf('?')
    const params = readParams(nsid, q < 0 ? '' : url.slice(q + 1))
    const output = await handler(opts.ctx, params, c, input)
    // A streamed output (text/event-stream) is the handler's own response.
    if (output instanceof Response) return output
    const text = output instanceof JsonText ? output.text : undefined
    if (opts.validateOutput) {
      try {
        lexicons.assertValidXrpcOutput(nsid, text === undefined ? output : JSON.parse(text))
      } catch (err) {
        opts.log.error('handler output does not match its lexicon', { nsid, err })
        throw new InternalServerError(`output of ${nsid} failed validation: ${(err as Error).message}`)
      }
    }
    if (text === undefined) return c.json(output as object)
    return new Response(text, { status: 200, headers: { 'content-type': 'application/json', ...opts.answerHeaders?.(c), ...(output as JsonText).headers } })
  })
  return app
}

/** A procedure's JSON input: content type, size cap, parse, then lexicon validation. */
async function readInput(nsid: string, c: Context): Promise<unknown> {
  const def = lexicons.getDef(nsid) as { input?: { encoding?: string; schema?: unknown } } | undefined
  if (!def?.input) return undefined
  const type = (c.req.header('content-type') ?? '').split(';')[0]!.trim().toLowerCase()
  if (type !== 'application/json') throw new InvalidRequestError(`${nsid} takes application/json input`, 'InvalidRequest')
  const declared = Number(c.req.header('content-length') ?? '0')
  if (declared > MAX_INPUT_BYTES) throw new PayloadTooLargeError()
  const buf = await readCapped(c.req.raw, MAX_INPUT_BYTES)
  let body: unknown
  try {
    body = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(buf))
  } catch {
    throw new InvalidRequestError('input is not valid JSON')
  }
  const outside = outsideDataModel(body)
  if (outside) throw new InvalidRequestError(outside)
  try {
    return lexicons.assertValidXrpcInput(nsid, body)
  } catch (err) {
    if (err instanceof ValidationError) throw new InvalidRequestError(err.message)
    throw err
  }
}

/** No lone surrogate: in Unicode mode a surrogate pair is one code point, so only a lone surrogate matches. */
export const isWellFormed = (s: string): boolean => !/[\uD800-\uDFFF]/u.test(s)

/**
 * What in a parsed JSON input the AT data model has no room for, which the
 * lexicon validator lets through: an integer beyond 2^53 (no record can hold
 * it; its CID cannot be computed), and a string with a lone surrogate (a
 * JSON escape such as "\ud800": no UTF-8 encodes it, so it is stored as one
 * thing and read back as another). Walked without recursion: the input may
 * be nested as deep as its size allows.
 */
function outsideDataModel(value: unknown): string | null {
  const stack: unknown[] = [value]
  while (stack.length) {
    const v = stack.pop()
    if (typeof v === 'number') {
      if (Number.isInteger(v) && !Number.isSafeInteger(v)) return 'integers are limited to 53 bits (the AT data model)'
    } else if (typeof v === 'string') {
      if (!isWellFormed(v)) return 'strings must be valid Unicode: a lone surrogate (such as \\ud800) is not'
    } else if (v && typeof v === 'object') {
      for (const [k, child] of Object.entries(v)) {
        if (!isWellFormed(k)) return 'strings must be valid Unicode: a lone surrogate (such as \\ud800) is not'
        stack.push(child)
      }
    }
  }
  return null
}

/**
 * The body, refused as soon as it passes `max` bytes: a chunked body declares
 * no length, and one that never ends must not be buffered until it does.
 */
async function readCapped(req: Request, max: number): Promise<Uint8Array> {
  if (!req.body) return new Uint8Array(0)
  const reader = req.body.getReader()
  const parts: Uint8Array[] = []
  let size = 0
  for (;;) {
    const { done, value } = await reader.read()
    if (done) break
    size += value.byteLength
    if (size > max) {
      // Nothing more is read; the HTTP server drains or closes the rest after the answer.
      void reader.cancel().catch(() => {})
      throw new PayloadTooLargeError()
    }
    parts.push(value)
  }
  return Buffer.concat(parts, size)
}

/** Hono error handler: XRPC errors as they are, anything else as a bare 500. */
export function xrpcErrorHandler(log: Logger) {
  return (err: Error, c: Context) => {
    if (err instanceof RateLimitExceededError) c.header('Retry-After', String(err.retryAfterSec))
    if (err instanceof XrpcError) return c.json(err.toJSON(), err.status as 400)
    log.error('unhandled error', { path: c.req.path, err })
    return c.json({ error: 'InternalServerError', message: 'Internal server error' }, 500)
  }
}
