/**
 * DID documents of brokerages (the authorities whose countersignatures a
 * receipt may carry), for their keys. A countersignature may name any DID, so
 * every look-up is bounded: did:web and did:plc only, SSRF-safe outside the
 * local network (`src/net/safe-fetch.ts`: https, default port, public
 * addresses, 512 kB, 10 s), http only to a loopback host on the local network
 * (dev, tests), and each answer (a document, or none) cached for a while in a
 * bounded LRU, so one unreachable authority is asked at most once per
 * `failureTtlMs` however many receipts name it.
 *
 * A did:web is read as the network's verifiers read it:
 * `https://<host>/.well-known/did.json`, or `https://<host>/<path>/did.json`
 * for one with a path.
 */
import { didDocument, type DidDocument, type IdResolver } from '@atproto/identity'
import { IDENTITY_FETCH, outboundFetch } from '../net/safe-fetch.ts'
import { outboundPolicyOf } from './index.ts'

export interface AuthorityResolverOpts {
  /** Resolves did:plc (the configured directory, with its own cache); its outbound policy decides local or not. */
  idResolver: IdResolver
  /** How long a document is kept (default 10 min). */
  ttlMs?: number
  /** How long a failed look-up is remembered (default 1 min). */
  failureTtlMs?: number
  /** Authorities remembered at most (default 1000). */
  maxSize?: number
}

const LOOPBACK = new Set(['localhost', '127.0.0.1', '[::1]'])

/** Where a did:web's document lives; null when the DID is not a well-formed did:web. */
export function didWebDocumentUrl(did: string, local: boolean): URL | null {
  const parts = did.slice('did:web:'.length).split(':').map(decodeURIComponent)
  const [host, ...path] = parts
  if (!did.startsWith('did:web:') || !host || path.some((p) => !p || p.includes('/'))) return null
  try {
    const url = new URL(`https://${host}`)
    if (url.host !== host.toLowerCase() || url.pathname !== '/') return null
    // Plain http only to this machine, and only on the local network.
    if (local && LOOPBACK.has(url.hostname)) url.protocol = 'http:'
    url.pathname = path.length ? `/${path.map(encodeURIComponent).join('/')}/did.json` : '/.well-known/did.json'
    return url
  } catch {
    return null
  }
}

export class AuthorityResolver {
  private readonly idResolver: IdResolver
  private readonly fetch: typeof fetch
  private readonly local: boolean
  private readonly ttlMs: number
  private readonly failureTtlMs: number
  private readonly maxSize: number
  private readonly entries = new Map<string, { doc: DidDocument | null; at: number }>()
  private readonly inFlight = new Map<string, Promise<DidDocument | null>>()

  constructor(opts: AuthorityResolverOpts) {
    this.idResolver = opts.idResolver
    this.local = outboundPolicyOf(opts.idResolver).local
    this.fetch = outboundFetch({ local: this.local, ...IDENTITY_FETCH })
    this.ttlMs = opts.ttlMs ?? 600_000
    this.failureTtlMs = opts.failureTtlMs ?? 60_000
    this.maxSize = opts.maxSize ?? 1000
  }

  /** What is cached now: a document, null (the last look-up found none), or undefined (not looked up lately). */
  peek(did: string): DidDocument | null | undefined {
    const e = this.entries.get(did)
    if (!e) return undefined
    if (Date.now() - e.at > (e.doc ? this.ttlMs : this.failureTtlMs)) {
      this.entries.delete(did)
      return undefined
    }
    return e.doc
  }

  /** The authority's DID document, or null when it has none we can read. Never throws. */
  resolve(did: string): Promise<DidDocument | null> {
    const cached = this.peek(did)
    if (cached !== undefined) return Promise.resolve(cached)
    let p = this.inFlight.get(did)
    if (!p) {
      p = this.lookUp(did).then((doc) => {
        this.inFlight.delete(did)
        this.entries.delete(did)
        this.entries.set(did, { doc, at: Date.now() })
        // Map order is insertion order: the first entry is the oldest.
        while (this.entries.size > this.maxSize) this.entries.delete(this.entries.keys().next().value!)
        return doc
      })
      this.inFlight.set(did, p)
    }
    return p
  }

  private async lookUp(did: string): Promise<DidDocument | null> {
    try {
      let doc: unknown
      if (did.startsWith('did:plc:')) doc = await this.idResolver.did.resolve(did)
      else {
        const url = didWebDocumentUrl(did, this.local)
        if (!url) return null
        const res = await this.fetch(url, { redirect: 'error', headers: { accept: 'application/did+ld+json,application/json' } })
        if (!res.ok) {
          await res.body?.cancel()
          return null
        }
        doc = await res.json()
      }
      return didDocument.safeParse(doc).success && (doc as DidDocument).id === did ? (doc as DidDocument) : null
    } catch {
      return null
    }
  }
}
