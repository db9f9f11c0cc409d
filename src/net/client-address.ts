/**
 * The client address every per-address limit is kept for. It is the TCP peer,
 * unless that peer is one of the operator's reverse proxies
 * (`COCORE_TRUSTED_PROXIES`): then it is read from `X-Forwarded-For`, walking
 * from the right past the trusted proxies to the first address that is not
 * one. Entries further left were written by the client and are never read,
 * so a client cannot name its own address.
 */
import type { IncomingMessage } from 'node:http'
import { BlockList, isIP } from 'node:net'

export class InvalidCidrError extends Error {
  override name = 'InvalidCidrError'
}

/**
 * An address as proxies and sockets write it (`[v6]:port`, `v4:port`, a zone
 * id, IPv4-mapped IPv6) in one form: dotted IPv4 or lowercase IPv6. Undefined
 * for anything that is not an address.
 */
export function normalizeAddress(raw: string | undefined): string | undefined {
  let s = raw?.trim()
  if (!s) return undefined
  const withPort = /^\[([^\]]+)\](?::(\d{1,5}))?$/.exec(s) ?? /^(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})$/.exec(s)
  if (withPort) {
    if (Number(withPort[2] ?? 0) > 65535) return undefined
    s = withPort[1]!
  }
  s = s.replace(/%[^%]*$/, '')
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i.exec(s)
  if (mapped) s = mapped[1]!
  const family = isIP(s)
  if (family === 0) return undefined
  return family === 6 ? s.toLowerCase() : s
}

/** The operator's reverse proxies, as CIDRs (IPv4 and IPv6; a bare address is a /32 or /128). */
export class TrustedProxies {
  static readonly none = new TrustedProxies([])
  private readonly list = new BlockList()
  readonly size: number

  /** @throws InvalidCidrError */
  constructor(cidrs: readonly string[]) {
    for (const cidr of cidrs) {
      const [addr, prefix, extra] = cidr.trim().split('/')
      const ip = normalizeAddress(addr)
      const family = ip ? isIP(ip) : 0
      const bits = prefix === undefined ? (family === 4 ? 32 : 128) : /^\d{1,3}$/.test(prefix) ? Number(prefix) : NaN
      if (!ip || extra !== undefined || !(bits >= 0 && bits <= (family === 4 ? 32 : 128))) throw new InvalidCidrError(`not a CIDR: "${cidr}"`)
      this.list.addSubnet(ip, bits, family === 4 ? 'ipv4' : 'ipv6')
    }
    this.size = cidrs.length
  }

  /** Whether a (normalized) address is one of the proxies. IPv4-mapped IPv6 matches IPv4 ranges. */
  has(address: string): boolean {
    return this.size > 0 && this.list.check(address, isIP(address) === 4 ? 'ipv4' : 'ipv6')
  }
}

/**
 * The rule itself: `peer` is the TCP peer, `forwardedFor` the request's
 * X-Forwarded-For (repeated headers joined with commas).
 */
export function resolveClientAddress(peer: string | undefined, forwardedFor: string | undefined, trusted: TrustedProxies): string | undefined {
  const direct = normalizeAddress(peer)
  if (!direct || !trusted.has(direct) || !forwardedFor?.trim()) return direct
  const hops = forwardedFor.split(',')
  let nearest = direct
  for (let i = hops.length - 1; i >= 0; i--) {
    const hop = normalizeAddress(hops[i])
    // Written by a trusted proxy yet unreadable: that proxy answers for the request.
    if (!hop) return nearest
    if (!trusted.has(hop)) return hop
    nearest = hop
  }
  // Every hop is a trusted address: the request started inside; the leftmost is the origin.
  return nearest
}

type NodeRequest = Pick<IncomingMessage, 'headers'> & { socket?: { remoteAddress?: string } | null }

/** The client address of a Node request (the provider gateway's WebSocket upgrade, say). */
export function clientAddress(req: NodeRequest, trusted: TrustedProxies): string | undefined {
  const xff = req.headers['x-forwarded-for']
  return resolveClientAddress(req.socket?.remoteAddress, Array.isArray(xff) ? xff.join(',') : xff, trusted)
}

/** The client address of a request served by Hono's Node adapter (its `env.incoming` is the Node request). */
export function contextClientAddress(c: { env: unknown }, trusted: TrustedProxies): string | undefined {
  const incoming = (c.env as { incoming?: NodeRequest } | undefined)?.incoming
  return incoming ? clientAddress(incoming, trusted) : undefined
}
