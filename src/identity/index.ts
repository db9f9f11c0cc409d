/**
 * Identity resolution with a bounded DID cache. Outside the local network
 * every DID document and handle is fetched SSRF-safely (`src/net/safe-fetch.ts`,
 * the same rules as `@atproto/identity`'s default fetch: https only, default
 * port, no IP-literal hosts, no private, loopback or link-local address after
 * resolution, redirects checked hop by hop, 512 kB and 10 s at most); only the
 * configured PLC directory is trusted wherever it is. The embedded local
 * network passes plain `fetch` for http on loopback.
 */
import { HandleResolver, IdResolver, type CacheResult, type DidCache, type DidDocument } from '@atproto/identity'
import { IDENTITY_FETCH, outboundFetch, type OutboundPolicy } from '../net/safe-fetch.ts'

/** An LRU DID cache with a size bound and stale/expiry ages (never an unbounded Map). */
export class BoundedDidCache implements DidCache {
  private readonly entries = new Map<string, { doc: DidDocument; updatedAt: number }>()
  private readonly maxSize: number
  private readonly staleMs: number
  private readonly maxAgeMs: number
  constructor(opts: { maxSize: number; staleMs: number; maxAgeMs?: number }) {
    this.maxSize = opts.maxSize
    this.staleMs = opts.staleMs
    this.maxAgeMs = opts.maxAgeMs ?? opts.staleMs * 24
  }
  get size(): number {
    return this.entries.size
  }
  async cacheDid(did: string, doc: DidDocument): Promise<void> {
    this.entries.delete(did)
    this.entries.set(did, { doc, updatedAt: Date.now() })
    // Map iteration order is insertion order: the first key is the least recently used.
    while (this.entries.size > this.maxSize) this.entries.delete(this.entries.keys().next().value!)
  }
  async refreshCache(did: string, getDoc: () => Promise<DidDocument | null>): Promise<void> {
    const doc = await getDoc()
    if (doc) await this.cacheDid(did, doc)
  }
  async checkCache(did: string): Promise<CacheResult | null> {
    const val = this.entries.get(did)
    if (!val) return null
    const now = Date.now()
    if (now > val.updatedAt + this.maxAgeMs) {
      this.entries.delete(did)
      return null
    }
    // Touch for LRU order.
    this.entries.delete(did)
    this.entries.set(did, val)
    return { did, doc: val.doc, updatedAt: val.updatedAt, stale: now > val.updatedAt + this.staleMs, expired: false }
  }
  async clearEntry(did: string): Promise<void> {
    this.entries.delete(did)
  }
  async clear(): Promise<void> {
    this.entries.clear()
  }
}

export interface IdentityOpts {
  plcUrl: string
  cacheSize: number
  cacheTtlSec: number
  /** Local network only: allow plain-http PLC/PDS/did:web fetches. */
  allowHttp: boolean
  /**
   * Local network only: resolve handles by asking this PDS. `.test` handles
   * have neither DNS records nor a reachable well-known endpoint.
   */
  handlesViaPds?: string
  /** Operator-configured origins (firehose sources) that PDS fetches may reach even on a private network. */
  trusted?: readonly string[]
}

/** How each resolver reaches the network: what it resolves, and the PDSes it names, are fetched under the same rules. */
const policies = new WeakMap<IdResolver, OutboundPolicy>()

/**
 * The outbound rules for the PDSes a resolver's DID documents name: the local
 * network's when it was built for it, else the public network's (SSRF-safe),
 * trusting only the configured PLC directory and sources.
 */
export const outboundPolicyOf = (resolver: IdResolver): OutboundPolicy => policies.get(resolver) ?? { local: false }

/** Resolves handles with `com.atproto.identity.resolveHandle` on one PDS (local network). */
class PdsHandleResolver extends HandleResolver {
  private readonly pds: string
  constructor(pds: string) {
    super()
    this.pds = pds
  }
  override async resolve(handle: string): Promise<string | undefined> {
    const res = await fetch(`${this.pds}/xrpc/com.atproto.identity.resolveHandle?handle=${encodeURIComponent(handle)}`)
    if (!res.ok) return undefined
    return ((await res.json()) as { did?: string }).did
  }
}

export function createIdResolver(opts: IdentityOpts): IdResolver {
  const resolver = new IdResolver({
    plcUrl: opts.plcUrl,
    timeout: 5000,
    didCache: new BoundedDidCache({ maxSize: opts.cacheSize, staleMs: opts.cacheTtlSec * 1000 }),
    fetch: opts.allowHttp ? globalThis.fetch : outboundFetch({ local: false, trusted: [opts.plcUrl], ...IDENTITY_FETCH }),
  })
  if (opts.handlesViaPds) resolver.handle = new PdsHandleResolver(opts.handlesViaPds)
  policies.set(resolver, { local: opts.allowHttp, trusted: [opts.plcUrl, ...(opts.trusted ?? [])] })
  return resolver
}

/** The PDS endpoint of a DID document (`#atproto_pds` service), if any. */
export function pdsEndpoint(doc: DidDocument): string | undefined {
  const svc = doc.service?.find((s) => s.id === '#atproto_pds' || s.id === `${doc.id}#atproto_pds`)
  return typeof svc?.serviceEndpoint === 'string' ? svc.serviceEndpoint : undefined
}
