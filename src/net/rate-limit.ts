/** Limits per client: a token bucket per key, and the part of a client address a limit is kept for. */
import { isIPv4, isIPv6 } from 'node:net'

/** A token bucket per key: `perMinute` requests, refilled continuously. In memory: limits are per process. */
export class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>()
  private readonly perMinute: number
  constructor(perMinute: number) {
    this.perMinute = perMinute
  }
  /** 0 when allowed; otherwise the seconds to wait. */
  take(key: string, now = Date.now()): number {
    const b = this.refill(key, now)
    if (b.tokens >= 1) {
      b.tokens -= 1
      return 0
    }
    return this.waitFor(b)
  }
  /** What `take` would answer, without taking: 0 when a request would pass, else the seconds to wait. */
  peek(key: string, now = Date.now()): number {
    const b = this.buckets.get(key)
    if (!b) return 0
    const tokens = Math.min(this.perMinute, b.tokens + (now - b.at) * this.rate)
    return tokens >= 1 ? 0 : this.waitFor({ tokens })
  }
  private get rate(): number {
    return this.perMinute / 60_000
  }
  private refill(key: string, now: number): { tokens: number; at: number } {
    const b = this.buckets.get(key) ?? { tokens: this.perMinute, at: now }
    b.tokens = Math.min(this.perMinute, b.tokens + (now - b.at) * this.rate)
    b.at = now
    this.buckets.delete(key)
    this.buckets.set(key, b)
    // Bounded: the least recently used buckets go first (they are full again anyway).
    if (this.buckets.size > 100_000) this.buckets.delete(this.buckets.keys().next().value!)
    return b
  }
  /** Whole seconds until the bucket holds one token again (rounded up, so a client that waits them passes). */
  private waitFor(b: { tokens: number }): number {
    return Math.ceil((1 - b.tokens) / this.rate / 1000)
  }
}

/**
 * The part of a client address its limits are kept for: an IPv4 address
 * (IPv4-mapped IPv6 too, as a dual-stack listener reports it) whole, an IPv6
 * address by its /64, since one host commonly holds a whole /64 and could
 * otherwise step to a fresh address for every guess.
 */
export function limitedAddress(ip: string | undefined): string | undefined {
  if (!ip) return undefined
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip)
  if (mapped && isIPv4(mapped[1]!)) return mapped[1]
  const bare = ip.replace(/%.*$/, '')
  if (!isIPv6(bare)) return ip
  const [head = '', tail] = bare.split('::') as [string, string | undefined]
  const groups = (part: string) => (part ? part.split(':').flatMap((g) => (g.includes('.') ? ['0', '0'] : [g])) : [])
  const h = groups(head)
  const t = tail === undefined ? [] : groups(tail)
  const all = tail === undefined ? h : [...h, ...Array<string>(8 - h.length - t.length).fill('0'), ...t]
  return `${all.slice(0, 4).map((g) => parseInt(g, 16).toString(16)).join(':')}::/64`
}

