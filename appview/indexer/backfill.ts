/**
 * Backfill: every repo holding `dev.cocore.*` records, fetched whole with
 * `com.atproto.sync.getRepo`, verified, and made the index's truth for that
 * repo in one transaction. Idempotent: unchanged records are not rewritten.
 *
 * Repo discovery per source: `com.atproto.sync.listReposByCollection` (a relay
 * answers it, so only repos with our collections are fetched), falling back to
 * `com.atproto.sync.listRepos` (a PDS lists all of its repos).
 */
import type { IdResolver } from '@atproto/identity'
import { toHttp } from '../../src/config.ts'
import { recordCollections } from '../../src/lexicon/generated/ids.ts'
import { indexerLogger as log } from '../../src/logger.ts'
import type { Indexer } from './indexer.ts'
import { fetchRepo, RepoFetchError } from './repo-fetch.ts'
import type { IndexStore } from './store.ts'

export interface BackfillProgress {
  total: number
  done: number
  failed: number
  records: number
}

export interface BackfillOpts {
  store: IndexStore
  indexer: Indexer
  idResolver: IdResolver
  /** Firehose sources (ws or http URLs of relays / PDSes). */
  sources: string[]
  concurrency?: number
  onProgress?: (p: BackfillProgress) => void
  fetch?: typeof fetch
}

async function pages<T>(url: (cursor?: string) => string, pick: (body: any) => T[], fetchImpl: typeof fetch): Promise<T[]> {
  const out: T[] = []
  let cursor: string | undefined
  for (;;) {
    const res = await fetchImpl(url(cursor), { signal: AbortSignal.timeout(30_000) })
    if (!res.ok) throw new RepoFetchError(`${url(cursor)}: HTTP ${res.status}`)
    const body = (await res.json()) as { cursor?: string }
    const items = pick(body)
    out.push(...items)
    if (!body.cursor || items.length === 0 || body.cursor === cursor) return out
    cursor = body.cursor
  }
}

/** DIDs of the repos a source hosts or relays that may hold our records. */
export async function listSourceRepos(source: string, fetchImpl: typeof fetch = fetch): Promise<string[]> {
  const base = toHttp(source)
  const q = (cursor?: string) => (cursor ? `&cursor=${encodeURIComponent(cursor)}` : '')
  try {
    const dids = new Set<string>()
    for (const collection of recordCollections) {
      const repos = await pages(
        (c) => `${base}/xrpc/com.atproto.sync.listReposByCollection?collection=${collection}&limit=1000${q(c)}`,
        (b) => (b.repos ?? []) as { did: string }[],
        fetchImpl,
      )
      for (const r of repos) dids.add(r.did)
    }
    return [...dids]
  } catch {
    const repos = await pages(
      (c) => `${base}/xrpc/com.atproto.sync.listRepos?limit=1000${q(c)}`,
      (b) => (b.repos ?? []) as { did: string; active?: boolean }[],
      fetchImpl,
    )
    return repos.filter((r) => r.active !== false).map((r) => r.did)
  }
}

export async function backfill(opts: BackfillOpts): Promise<BackfillProgress> {
  const dids = new Set<string>()
  for (const s of opts.sources) for (const d of await listSourceRepos(s, opts.fetch)) dids.add(d)
  const queue = [...dids]
  const progress: BackfillProgress = { total: queue.length, done: 0, failed: 0, records: 0 }
  opts.onProgress?.(progress)
  const worker = async () => {
    for (let did = queue.shift(); did; did = queue.shift()) {
      try {
        const repo = await fetchRepo(opts.idResolver, did, opts.fetch)
        // A repo without our records is not an account of ours, unless we already hold some of its rows.
        if (repo.records.length > 0 || opts.store.isKnown(did)) {
          const handle = opts.store.isKnown(did) ? undefined : await opts.indexer.verifiedHandle(did)
          opts.store.tx(() => {
            opts.indexer.applyRepo(repo)
            if (handle !== undefined) opts.store.setHandle(did, handle)
          })
          progress.records += repo.records.length
        }
      } catch (err) {
        progress.failed++
        log.warn('backfill of repo failed', { did, err })
      }
      progress.done++
      opts.onProgress?.(progress)
    }
  }
  await Promise.all(Array.from({ length: opts.concurrency ?? 4 }, worker))
  return progress
}
