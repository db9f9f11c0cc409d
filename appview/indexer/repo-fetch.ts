/**
 * Full-repo fetch for backfill and resync: `com.atproto.sync.getRepo` from the
 * repo's own PDS, verified (commit signature against the DID's key, MST
 * integrity), reduced to its `dev.cocore.*` records.
 */
import type { IdResolver } from '@atproto/identity'
import { cborToLexRecord, readCarWithRoot, verifyRepo } from '@atproto/repo'
import { pdsEndpoint } from '../../src/identity/index.ts'
import { NSID_PREFIX } from '../../src/lexicon/generated/ids.ts'
import { MAX_RECORD_BYTES } from '../../src/lexicon/validate.ts'
import type { RecordWrite } from './store.ts'

export class RepoFetchError extends Error {
  override name = 'RepoFetchError'
  /** The PDS answered that the repo does not exist (or is taken down / deleted). */
  readonly gone: boolean
  constructor(message: string, gone = false, options?: ErrorOptions) {
    super(message, options)
    this.gone = gone
  }
}

export interface FetchedRepo {
  did: string
  rev: string
  /** Records of our collections, each with its size so the caller can refuse oversize ones. */
  records: (RecordWrite & { size: number })[]
}

export async function resolvePds(idResolver: IdResolver, did: string, forceRefresh = false): Promise<string> {
  const doc = await idResolver.did.resolve(did, forceRefresh)
  if (!doc) throw new RepoFetchError(`DID not resolvable: ${did}`, true)
  const pds = pdsEndpoint(doc)
  if (!pds) throw new RepoFetchError(`no PDS in DID document of ${did}`)
  return pds
}

export async function fetchRepo(idResolver: IdResolver, did: string, fetchImpl: typeof fetch = fetch): Promise<FetchedRepo> {
  const pds = await resolvePds(idResolver, did)
  const res = await fetchImpl(`${pds}/xrpc/com.atproto.sync.getRepo?did=${encodeURIComponent(did)}`, { signal: AbortSignal.timeout(60_000) })
  if (!res.ok) {
    const body = (await res.json().catch(() => ({}))) as { error?: string }
    const gone = ['RepoNotFound', 'RepoTakendown', 'RepoDeactivated'].includes(body.error ?? '')
    throw new RepoFetchError(`getRepo ${did}: HTTP ${res.status} ${body.error ?? ''}`, gone)
  }
  const car = new Uint8Array(await res.arrayBuffer())
  const { root, blocks } = await readCarWithRoot(car)
  const key = await idResolver.did.resolveAtprotoKey(did)
  let verified
  try {
    verified = await verifyRepo(blocks, root, did, key)
  } catch (err) {
    // The key may have rotated since it was cached: refresh once, then give up.
    const fresh = await idResolver.did.resolveAtprotoKey(did, true)
    if (fresh === key) throw err
    verified = await verifyRepo(blocks, root, did, fresh)
  }
  const records: FetchedRepo['records'] = []
  for (const w of verified.creates) {
    if (!w.collection.startsWith(NSID_PREFIX)) continue
    const bytes = blocks.get(w.cid)
    if (!bytes) continue
    records.push({
      action: 'create',
      uri: `at://${did}/${w.collection}/${w.rkey}`,
      did,
      collection: w.collection,
      rkey: w.rkey,
      cid: w.cid.toString(),
      // Oversize records are not decoded at all.
      record: bytes.length > MAX_RECORD_BYTES ? {} : cborToLexRecord(bytes),
      size: bytes.length,
    })
  }
  return { did, rev: verified.commit.rev, records }
}

/** `com.atproto.sync.getRepoStatus` at the repo's PDS; null when the PDS cannot be reached. */
export async function getRepoStatus(
  idResolver: IdResolver,
  did: string,
  fetchImpl: typeof fetch = fetch,
): Promise<{ exists: boolean; active: boolean; status?: string } | null> {
  let pds: string
  try {
    // Fresh DID document: the account may have moved, and its old PDS would say "not found".
    pds = await resolvePds(idResolver, did, true)
  } catch {
    // Unresolvable now may be a blip of the DID's host: unknown, so the caller keeps its state.
    return null
  }
  try {
    const res = await fetchImpl(`${pds}/xrpc/com.atproto.sync.getRepoStatus?did=${encodeURIComponent(did)}`, { signal: AbortSignal.timeout(10_000) })
    if (res.status === 400 || res.status === 404) {
      const body = (await res.json().catch(() => ({}))) as { error?: string }
      if (body.error === 'RepoNotFound') return { exists: false, active: false, status: 'deleted' }
      if (body.error === 'RepoTakendown') return { exists: true, active: false, status: 'takendown' }
      return null
    }
    if (!res.ok) return null
    const body = (await res.json()) as { active: boolean; status?: string }
    return { exists: true, active: body.active, status: body.status }
  } catch {
    return null
  }
}
