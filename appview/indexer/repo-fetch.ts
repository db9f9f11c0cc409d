/**
 * Full-repo fetch for backfill and resync: `com.atproto.sync.getRepo` from the
 * repo's own PDS, verified (commit signature against the DID's key, MST
 * integrity), reduced to its `dev.cocore.*` records.
 *
 * The PDS address comes from the DID document, which its owner writes: it is
 * fetched with the AppView's outbound fetch (`src/net/safe-fetch.ts`), SSRF-safe
 * outside the local network, bounded in size and time, and a redirect is
 * refused (a PDS serves its own repos).
 */
import type { IdResolver } from '@atproto/identity'
import { cborToLex, cborToLexRecord, readCarWithRoot, verifyRepo } from '@atproto/repo'
import { outboundPolicyOf, pdsEndpoint } from '../../src/identity/index.ts'
import { outboundFailure, outboundFetch } from '../../src/net/safe-fetch.ts'
import { NSID_PREFIX } from '../../src/lexicon/generated/ids.ts'
import { MAX_RECORD_BYTES } from '../../src/lexicon/validate.ts'
import { indexerLogger as log } from '../../src/logger.ts'
import { readRepoCar } from './repo-car.ts'
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

/** Largest repo CAR read. Repos with our records are small; a bigger answer is refused, not buffered. */
export const MAX_REPO_BYTES = 64 * 1024 * 1024
export const REPO_TIMEOUT_MS = 60_000

const repoFetches = new WeakMap<IdResolver, typeof fetch>()

/**
 * The fetch for the PDSes a resolver's DID documents name, under that
 * resolver's rules (`outboundPolicyOf`): SSRF-safe unless it was built for the
 * local network. One per resolver (each holds a connection pool).
 */
export function repoFetchFor(idResolver: IdResolver): typeof fetch {
  let f = repoFetches.get(idResolver)
  if (!f) repoFetches.set(idResolver, (f = outboundFetch({ ...outboundPolicyOf(idResolver), maxBytes: MAX_REPO_BYTES, timeoutMs: REPO_TIMEOUT_MS })))
  return f
}

/**
 * One request to a PDS named by a DID document. Redirects are refused; a
 * refusal or network failure becomes a RepoFetchError naming the reason.
 */
async function pdsGet(fetchImpl: typeof fetch, pds: string, path: string, what: string, timeoutMs: number): Promise<Response> {
  let res: Response
  try {
    res = await fetchImpl(`${pds.replace(/\/+$/, '')}${path}`, { redirect: 'manual', signal: AbortSignal.timeout(timeoutMs) })
  } catch (err) {
    throw new RepoFetchError(`${what} at ${pds}: ${outboundFailure(err)}`, false, { cause: err })
  }
  if (res.status >= 300 && res.status < 400) {
    await res.body?.cancel()
    throw new RepoFetchError(`${what} at ${pds}: redirect refused (HTTP ${res.status})`)
  }
  return res
}

export interface FetchedRepo {
  did: string
  rev: string
  /** The snapshot commit's MST root CID: the next commit's `prevData` names it. */
  data: string
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

export async function fetchRepo(idResolver: IdResolver, did: string, fetchImpl: typeof fetch = repoFetchFor(idResolver)): Promise<FetchedRepo> {
  const pds = await resolvePds(idResolver, did)
  const what = `getRepo ${did}`
  const res = await pdsGet(fetchImpl, pds, `/xrpc/com.atproto.sync.getRepo?did=${encodeURIComponent(did)}`, what, REPO_TIMEOUT_MS)
  if (!res.ok) {
    const body = (await res.json().catch(() => ({}))) as { error?: string }
    const gone = ['RepoNotFound', 'RepoTakendown', 'RepoDeactivated'].includes(body.error ?? '')
    throw new RepoFetchError(`${what}: HTTP ${res.status} ${body.error ?? ''}`, gone)
  }
  let car: Uint8Array
  try {
    car = new Uint8Array(await res.arrayBuffer())
  } catch (err) {
    // Too large, too slow, or cut off: the fetch's limits stopped reading.
    throw new RepoFetchError(`${what} at ${pds}: ${outboundFailure(err)}`, false, { cause: err })
  }
  const key = await idResolver.did.resolveAtprotoKey(did)
  // What a PDS writes is read in one pass (repo-car.ts); anything else by the library, as before.
  const read = await readRepoCar(car, did, key)
  if (read) return { did, ...read }
  const { root, blocks } = await readCarWithRoot(car)
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
  // The root is the signed commit verifyRepo just checked: its MST root is what the next commit's `prevData` names.
  const data = String((cborToLex(blocks.get(root)!) as { data: unknown }).data)
  return { did, rev: verified.commit.rev, data, records }
}

/** `com.atproto.sync.getRepoStatus` at the repo's PDS; null when the PDS cannot be reached. */
export async function getRepoStatus(
  idResolver: IdResolver,
  did: string,
  fetchImpl: typeof fetch = repoFetchFor(idResolver),
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
    const res = await pdsGet(fetchImpl, pds, `/xrpc/com.atproto.sync.getRepoStatus?did=${encodeURIComponent(did)}`, `getRepoStatus ${did}`, 10_000)
    if (res.status === 400 || res.status === 404) {
      const body = (await res.json().catch(() => ({}))) as { error?: string }
      if (body.error === 'RepoNotFound') return { exists: false, active: false, status: 'deleted' }
      if (body.error === 'RepoTakendown') return { exists: true, active: false, status: 'takendown' }
      return null
    }
    if (!res.ok) return null
    const body = (await res.json()) as { active: boolean; status?: string }
    return { exists: true, active: body.active, status: body.status }
  } catch (err) {
    log.debug('getRepoStatus failed', { did, pds, reason: outboundFailure(err) })
    return null
  }
}
