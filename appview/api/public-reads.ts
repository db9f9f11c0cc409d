/**
 * What the AppView's public reads (XRPC queries, no credentials) go through
 * around their handlers: a limit per client address, and a short-lived cache
 * of identical answers with the HTTP headers that let clients keep them too.
 *
 * An answer is served again only while the index it was computed from is
 * unchanged (`index_version`, moved by every change of records and accounts),
 * so the cache never answers with rows older than the index; answers that
 * also depend on the time (the trailing windows, the current week, a DID
 * document) are kept `timedTtlMs` at most. Its ETag names that state: a
 * client's If-None-Match matching it is answered 304 with no body.
 */
import type { Context, MiddlewareHandler } from 'hono'
import type { Db } from '../../src/db/index.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import { limitedAddress, RateLimiter } from '../../src/net/rate-limit.ts'
import { RateLimitExceededError } from '../../src/xrpc/errors.ts'
import { JsonText, type QueryHandler } from '../../src/xrpc/server.ts'
import { statement } from './util.ts'

export interface PublicReadOpts {
  /** XRPC requests per minute one client address may make (an IPv6 client by its /64), as a token bucket that starts full; 0: no limit. */
  ratePerMinute: number
  /** Answers kept at most (least recently used go first); 0: none kept. */
  cacheEntries: number
  /** Bytes of answers kept at most. */
  cacheBytes: number
  /** How long an answer that depends on the time is served again. */
  timedTtlMs: number
  /** `Cache-Control: public, max-age` given with every answer. */
  maxAgeSec: number
}

export const PUBLIC_READ_DEFAULTS: PublicReadOpts = { ratePerMinute: 3000, cacheEntries: 2000, cacheBytes: 64 << 20, timedTtlMs: 1000, maxAgeSec: 5 }

/** Methods whose answer depends on the time as well as the index: trailing windows, the current week, a verification at this time, a DID document. */
const TIMED = new Set<string>([ids.ComputeModelActivity, ids.ComputeLatency, ids.AccountGetProfile, ids.ComputeVerifyReceipt, ids.ComputeVerifySettlement])

/**
 * Refuses a client address past its rate with 429 and Retry-After, before any
 * handler of `methods` runs (`/xrpc/<nsid>`). A request that did not come
 * over the network (no address: one made in process) is not counted.
 */
export function publicReadLimit(opts: Pick<PublicReadOpts, 'ratePerMinute'>, methods: ReadonlySet<string>, clientAddress: (c: Context) => string | undefined): MiddlewareHandler {
  const limiter = new RateLimiter(opts.ratePerMinute)
  return async (c, next) => {
    const address = opts.ratePerMinute > 0 && methods.has(c.req.path.slice('/xrpc/'.length)) ? limitedAddress(clientAddress(c)) : undefined
    if (address) {
      const wait = limiter.take(address)
      if (wait) throw new RateLimitExceededError(wait)
    }
    await next()
  }
}

interface Answer {
  text: string
  etag: string
  version: number
  /** Date.now() past which it is not served; Infinity for an answer that depends on the index alone. */
  expires: number
}

/**
 * A request header, from the Node request when the adapter passed it: asking
 * the Fetch Request builds a Headers object of every header, a cost the
 * rest of a read avoids.
 */
function requestHeader(c: Context, name: string): string | undefined {
  const incoming = (c.env as { incoming?: { headers: Record<string, string | string[] | undefined> } } | undefined)?.incoming
  if (!incoming) return c.req.header(name)
  const v = incoming.headers[name]
  return Array.isArray(v) ? v.join(', ') : v
}

/** Whether an If-None-Match header names `etag` (or is `*`). */
function matches(header: string | undefined, etag: string): boolean {
  if (!header) return false
  return header.split(',').some((t) => {
    const v = t.trim()
    return v === etag || v === `W/${etag}` || v === '*'
  })
}

/** The handlers, each answering from the cache while its answer holds, with Cache-Control and ETag, and 304 to a matching If-None-Match. */
export function cachedReads<Ctx extends { db: Db }>(handlers: Record<string, QueryHandler<Ctx>>, opts: Omit<PublicReadOpts, 'ratePerMinute'>): Record<string, QueryHandler<Ctx>> {
  const cache = new Map<string, Answer>()
  let bytes = 0
  const drop = (key: string, a: Answer) => {
    cache.delete(key)
    bytes -= a.text.length
  }
  const cacheControl = `public, max-age=${opts.maxAgeSec}`
  const wrapped: Record<string, QueryHandler<Ctx>> = {}
  for (const [nsid, handler] of Object.entries(handlers)) {
    const timed = TIMED.has(nsid)
    wrapped[nsid] = async (ctx, params, c, input) => {
      const version = statement(ctx.db, 'SELECT n FROM index_version WHERE id = 1').pluck().get() as number
      const now = Date.now()
      const url = c.req.url
      const key = `${nsid}?${url.slice(url.indexOf('?') + 1 || url.length)}`
      let answer = cache.get(key)
      if (answer && (answer.version !== version || answer.expires <= now)) {
        drop(key, answer)
        answer = undefined
      }
      if (answer) {
        // Most recently used last.
        cache.delete(key)
        cache.set(key, answer)
      } else {
        const output = await handler(ctx, params, c, input)
        if (output instanceof Response) return output
        const text = output instanceof JsonText ? output.text : JSON.stringify(output)
        answer = { text, version, etag: timed ? `"${version.toString(36)}.${now.toString(36)}"` : `"${version.toString(36)}"`, expires: timed ? now + opts.timedTtlMs : Infinity }
        if (opts.cacheEntries > 0 && text.length <= opts.cacheBytes / 16) {
          cache.set(key, answer)
          bytes += text.length
          for (const [k, a] of cache) {
            if (cache.size <= opts.cacheEntries && bytes <= opts.cacheBytes) break
            drop(k, a)
          }
        }
      }
      const headers = { 'cache-control': cacheControl, etag: answer.etag }
      if (matches(requestHeader(c, 'if-none-match'), answer.etag)) return new Response(null, { status: 304, headers })
      return new JsonText(answer.text, headers)
    }
  }
  return wrapped
}
