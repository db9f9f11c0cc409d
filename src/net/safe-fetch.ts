/**
 * Outbound HTTP to addresses that come from user data: DID documents name a
 * PDS, handles name a host, sign-in forms name either. Outside the local
 * network every such request is SSRF-safe (`@atproto-labs/fetch-node`): https
 * only, default port only, no IP-literal hosts, no private, loopback or
 * link-local address after DNS resolution, each redirect hop checked the same
 * way. In every mode responses are capped in size and time, and the caller
 * must say how redirects are handled.
 *
 * Origins the operator configured (the PLC directory, firehose sources) are
 * trusted even on a private network, but a trusted origin is never followed
 * through a redirect: it must answer itself.
 */
import { safeFetchWrap } from '@atproto-labs/fetch-node'
import { toHttp } from '../config.ts'

export interface OutboundPolicy {
  /** The embedded local network (dev, tests): plain http and loopback allowed; size, time and redirect rules still apply. */
  local: boolean
  /** Operator-configured origins (http(s) or ws(s) URLs), reachable wherever they are. */
  trusted?: readonly string[]
}

export interface OutboundOpts extends OutboundPolicy {
  /** Largest response body read; a bigger one fails the request. */
  maxBytes: number
  /** Whole request, redirects and body included. */
  timeoutMs: number
}

/** What the identity resolvers read: DID documents and `/.well-known/atproto-did` (the library's own defaults). */
export const IDENTITY_FETCH = { maxBytes: 512 * 1024, timeoutMs: 10_000 } as const

export function outboundFetch(opts: OutboundOpts): typeof fetch {
  const open = safeFetchWrap({ ssrfProtection: false, responseMaxSize: opts.maxBytes, timeout: opts.timeoutMs }) as typeof fetch
  if (opts.local) return open
  const guarded = safeFetchWrap({
    allowHttp: false,
    allowCustomPort: false,
    allowIpHost: false,
    allowPrivateIps: false,
    responseMaxSize: opts.maxBytes,
    timeout: opts.timeoutMs,
  }) as typeof fetch
  const trusted = new Set((opts.trusted ?? []).map((u) => new URL(toHttp(u)).origin))
  if (trusted.size === 0) return guarded
  return (input, init) => {
    const url = input instanceof Request ? input.url : String(input)
    // A trusted host may not bounce the request to an address nobody vetted.
    return trusted.has(new URL(url).origin) ? open(input, { ...init, redirect: 'error' }) : guarded(input, init)
  }
}

/**
 * The reason an outbound request failed, from the whole cause chain: the
 * policy refusal ("Hostname is a non-unicast address", "Forbidden protocol
 * \"http:\"", "Response too large"), or the network error.
 */
export function outboundFailure(err: unknown): string {
  const parts: string[] = []
  for (let e = err; e instanceof Error && parts.length < 5; e = e.cause) {
    if (e.message && !parts.includes(e.message)) parts.push(e.message)
  }
  return parts.join(': ') || String(err)
}
