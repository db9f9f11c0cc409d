/**
 * `npm run bench:backfill`: records per second through the real write path of
 * a backfill and of resyncs: getRepo's CAR read and verified (commit
 * signature, MST, block CIDs), each record decoded and validated against its
 * lexicon, then written by the index store, one transaction per repo
 * (`backfill()`, as `npm run backfill` runs it, on a fresh SQLite database).
 *
 * The repos are built here (signed, in memory: --repos R of --records N
 * dev.cocore records each, a third as many records of other collections, and
 * one record in 100 invalid) and served by a stub of the PDS and of the DID
 * directory, so the figures are the indexer's alone. Three passes:
 *   backfill  into an empty index;
 *   resync    the same repos again (nothing changed: every row is kept);
 *   changed   again after a tenth of each repo's records were rewritten and
 *             a twentieth deleted.
 *
 * The same passes run, round after round, with the write path of the commit
 * named by --baseline (default: the one before this benchmark's optimisations),
 * extracted under data/bench/ and given a database of the current schema: its
 * figures are the reference measured on the same machine at the same time,
 * and both must end with the same index (the run fails otherwise).
 *
 * Options: --repos R (default 20), --records N (per repo, default 1000),
 * --runs K (default 3, median reported), --baseline <commit> (or "none").
 * Writes data/bench/backfill.json.
 */
import { execFileSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { availableParallelism, loadavg, tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { parseArgs } from 'node:util'
import { Secp256k1Keypair } from '@atproto/crypto'
import { TID } from '@atproto/common-web'
import type { IdResolver } from '@atproto/identity'
import { MemoryBlockstore, Repo, WriteOpAction, getFullRepo, type RecordWriteOp } from '@atproto/repo'
import { openDb, type Db } from '../src/db/index.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { diffLines, indexState } from './index-state.ts'
import { DEFAULT_DIR } from './record-firehose.ts'

/** The commit before the write path's optimisations. */
const DEFAULT_BASELINE = '37fd6d0'
const TARGET_RECORDS_PER_SEC = 10_000

const { values: args } = parseArgs({
  options: {
    repos: { type: 'string', default: '20' },
    records: { type: 'string', default: '1000' },
    runs: { type: 'string', default: '3' },
    baseline: { type: 'string', default: DEFAULT_BASELINE },
    help: { type: 'boolean', short: 'h', default: false },
  },
})
if (args.help) {
  process.stdout.write('usage: npm run bench:backfill -- [--repos R] [--records N] [--runs K] [--baseline <commit>|none]\n')
  process.exit(0)
}
const positive = (name: string, v: string) => {
  const n = Number(v)
  if (!(Number.isSafeInteger(n) && n > 0)) throw new Error(`--${name}: expected a positive integer, got ${v}`)
  return n
}
const nRepos = positive('repos', args.repos)
const nRecords = positive('records', args.records)
const runs = positive('runs', args.runs)

const log = (msg: string) => process.stderr.write(`[bench] ${msg}\n`)
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}
const threadCpu = () => {
  const c = process.threadCpuUsage()
  return (c.user + c.system) / 1e6
}
const now = () => new Date().toISOString()

// ---------------------------------------------------------------------------
// The repos, and a PDS and DID directory that serve them.

interface BenchRepo {
  did: string
  handle: string
  key: Secp256k1Keypair
  repo: Repo
  /** Paths of the dev.cocore records it holds. */
  paths: string[]
  /** The repo as served now: `initial`, or `changed` for the third pass. */
  car: Uint8Array
  initial: Uint8Array
  changed: Uint8Array
}

let counter = 0
/** A dev.cocore record (one in 100 invalid for its lexicon) or, for `foreign`, a post. */
function record(did: string, others: string[], foreign: boolean): { collection: string; record: Record<string, unknown> } {
  const n = counter++
  if (foreign) return { collection: 'app.bsky.feed.post', record: { $type: 'app.bsky.feed.post', text: `post ${n}`, createdAt: now() } }
  const subject = others[n % others.length]!
  if (n % 100 === 7) return { collection: ids.AccountFriend, record: { $type: ids.AccountFriend, subject: 'not a did', createdAt: now() } }
  switch (n % 4) {
    case 0:
      return {
        collection: ids.ComputePaymentAuthorization,
        record: { $type: ids.ComputePaymentAuthorization, exchange: subject, ceiling: { amount: 1_000 + n, currency: 'CC' }, scope: 'singleJob', nonce: n.toString(16).padStart(32, '0'), expiresAt: now(), createdAt: now() },
      }
    case 1:
      return {
        collection: ids.ComputeJob,
        record: {
          $type: ids.ComputeJob,
          model: `model-${n % 7}`,
          inputCommitment: n.toString(16).padStart(64, '0'),
          maxTokensOut: 256,
          priceCeiling: { amount: 1_000, currency: 'CC' },
          acceptedTrustLevel: 'self-attested',
          paymentAuthorization: { uri: `at://${did}/${ids.ComputePaymentAuthorization}/${TID.nextStr()}`, cid: 'bafyreib2rxk3rybk3aobmv4cjuql3bmfgcmwbimjlzl3owfocgq6i4xkpu' },
          nonce: n.toString(16).padStart(32, '0'),
          expiresAt: now(),
          createdAt: now(),
        },
      }
    default:
      return { collection: ids.AccountFriend, record: { $type: ids.AccountFriend, subject, note: n % 3 ? undefined : `friend ${n}`, createdAt: now() } }
  }
}

const create = (r: { collection: string; record: Record<string, unknown> }): RecordWriteOp =>
  ({ action: WriteOpAction.Create, collection: r.collection, rkey: TID.nextStr(), record: JSON.parse(JSON.stringify(r.record)) }) as RecordWriteOp

async function carOf(repo: Repo): Promise<Uint8Array> {
  const chunks: Uint8Array[] = []
  for await (const c of getFullRepo(repo.storage, repo.cid)) chunks.push(c)
  return Buffer.concat(chunks)
}

async function buildRepos(): Promise<BenchRepo[]> {
  const dids = Array.from({ length: nRepos }, (_, i) => `did:plc:bench${String(i).padStart(19, '0')}`)
  const out: BenchRepo[] = []
  for (const [i, did] of dids.entries()) {
    const key = await Secp256k1Keypair.create()
    const writes: RecordWriteOp[] = [create({ collection: ids.AccountProfile, record: { $type: ids.AccountProfile, displayName: `Bench ${i}`, createdAt: now() } })]
    for (let k = 1; k < nRecords; k++) writes.push(create(record(did, dids, false)))
    for (let k = 0; k < Math.floor(nRecords / 3); k++) writes.push(create(record(did, dids, true)))
    let repo = await Repo.create(new MemoryBlockstore(), did, key)
    for (let k = 0; k < writes.length; k += 2000) repo = await repo.applyWrites(writes.slice(k, k + 2000), key)
    const paths = writes.filter((w) => w.collection.startsWith('dev.cocore.')).map((w) => `${w.collection}/${w.rkey}`)
    const car = await carOf(repo)
    out.push({ did, handle: `bench${i}.test`, key, repo, paths, car, initial: car, changed: car })
  }
  // Then a tenth of each repo's dev.cocore records rewritten and a twentieth deleted, for the third pass.
  for (const r of out) {
    const writes: RecordWriteOp[] = []
    r.paths.forEach((path, i) => {
      const [collection, rkey] = path.split('/') as [string, string]
      if (collection === ids.AccountProfile) return
      if (i % 20 === 3) writes.push({ action: WriteOpAction.Delete, collection, rkey } as RecordWriteOp)
      else if (i % 10 === 5 && collection === ids.AccountFriend) {
        writes.push({ action: WriteOpAction.Update, collection, rkey, record: { $type: collection, subject: dids[(i + 1) % dids.length]!, note: `changed ${i}`, createdAt: now() } } as RecordWriteOp)
      }
    })
    let repo = r.repo
    for (let k = 0; k < writes.length; k += 2000) repo = await repo.applyWrites(writes.slice(k, k + 2000), r.key)
    r.changed = await carOf(repo)
  }
  return out
}

const PDS = 'https://pds.bench.invalid'

/** The DID directory and handle resolution, as the indexer uses them. */
function stubResolver(repos: BenchRepo[]): IdResolver {
  const byDid = new Map(repos.map((r) => [r.did, r]))
  const byHandle = new Map(repos.map((r) => [r.handle, r.did]))
  const doc = (r: BenchRepo) => ({
    id: r.did,
    alsoKnownAs: [`at://${r.handle}`],
    verificationMethod: [{ id: `${r.did}#atproto`, type: 'Multikey', controller: r.did, publicKeyMultibase: r.key.did().slice('did:key:'.length) }],
    service: [{ id: '#atproto_pds', type: 'AtprotoPersonalDataServer', serviceEndpoint: PDS }],
  })
  const known = (did: string) => {
    const r = byDid.get(did)
    if (!r) throw new Error(`unknown DID ${did}`)
    return r
  }
  return {
    did: {
      resolve: async (did: string) => doc(known(did)),
      resolveAtprotoKey: async (did: string) => known(did).key.did(),
      resolveAtprotoData: async (did: string) => ({ did, signingKey: known(did).key.did(), handle: known(did).handle, pds: PDS }),
    },
    handle: { resolve: async (handle: string) => byHandle.get(handle) },
  } as unknown as IdResolver
}

/** The PDS: listReposByCollection and getRepo. */
function stubFetch(repos: BenchRepo[]): typeof fetch {
  const byDid = new Map(repos.map((r) => [r.did, r]))
  return (async (input: string | URL | Request) => {
    const url = new URL(typeof input === 'string' ? input : input instanceof URL ? input.href : input.url)
    if (url.pathname === '/xrpc/com.atproto.sync.listReposByCollection') return Response.json({ repos: repos.map((r) => ({ did: r.did })) })
    if (url.pathname === '/xrpc/com.atproto.sync.getRepo') {
      const r = byDid.get(url.searchParams.get('did') ?? '')
      return r ? new Response(r.car as Uint8Array<ArrayBuffer>) : Response.json({ error: 'RepoNotFound' }, { status: 400 })
    }
    return Response.json({ error: 'NotFound' }, { status: 404 })
  }) as typeof fetch
}

// ---------------------------------------------------------------------------
// The write path under test: this tree's, or a baseline commit's.

interface WritePath {
  name: string
  /** Runs a backfill of every repo into the index at `dbPath`; returns what it reported. */
  backfill(db: Db, idResolver: IdResolver, fetchImpl: typeof fetch): Promise<{ done: number; failed: number; records: number }>
}

async function writePathAt(root: string, name: string): Promise<WritePath> {
  const { IndexStore } = (await import(join(root, 'appview/indexer/store.ts'))) as typeof import('../appview/indexer/store.ts')
  const { Indexer } = (await import(join(root, 'appview/indexer/indexer.ts'))) as typeof import('../appview/indexer/indexer.ts')
  const { backfill } = (await import(join(root, 'appview/indexer/backfill.ts'))) as typeof import('../appview/indexer/backfill.ts')
  return {
    name,
    async backfill(db, idResolver, fetchImpl) {
      const store = new IndexStore(db)
      const indexer = new Indexer({ store, idResolver, sources: [], fetch: fetchImpl })
      const p = await backfill({ store, indexer, idResolver, sources: [PDS], fetch: fetchImpl })
      await indexer.stop()
      return p
    },
  }
}

/** The baseline commit's appview/ and src/, extracted once under data/bench/ (node_modules resolve from the repo). */
function extractBaseline(commit: string): string {
  const sha = execFileSync('git', ['rev-parse', '--short', commit], { encoding: 'utf8' }).trim()
  const dir = resolve(DEFAULT_DIR, `baseline-${sha}`)
  if (!existsSync(join(dir, 'appview/indexer/backfill.ts'))) {
    mkdirSync(dir, { recursive: true })
    execFileSync('sh', ['-c', `git archive ${sha} appview src | tar -x -C '${dir}'`])
  }
  return dir
}

interface Pass {
  seconds: number
  cpuSeconds: number
  records: number
}

async function passes(path: WritePath, repos: BenchRepo[], tmp: string): Promise<{ backfill: Pass; resync: Pass; changed: Pass; state: string; rows: number }> {
  const dbDir = mkdtempSync(join(tmp, 'db-'))
  const db = openDb(join(dbDir, 'appview.sqlite'))
  const idResolver = stubResolver(repos)
  const timed = async (): Promise<Pass> => {
    global.gc?.()
    const t0 = performance.now()
    const c0 = threadCpu()
    const p = await path.backfill(db, idResolver, stubFetch(repos))
    if (p.failed > 0 || p.done !== repos.length) throw new Error(`${path.name}: ${p.failed} of ${p.done} repos failed`)
    return { seconds: (performance.now() - t0) / 1000, cpuSeconds: threadCpu() - c0, records: p.records }
  }
  try {
    for (const r of repos) r.car = r.initial
    const backfill = await timed()
    const resync = await timed()
    for (const r of repos) r.car = r.changed
    const changed = await timed()
    const rows = db.$client.prepare('SELECT count(*) FROM records').pluck().get() as number
    return { backfill, resync, changed, state: indexState(db), rows }
  } finally {
    db.$client.close()
    rmSync(dbDir, { recursive: true, force: true })
  }
}

async function main() {
  const tmp = mkdtempSync(join(tmpdir(), 'cocore-bench-backfill-'))
  try {
    log(`building ${nRepos} repos of ${nRecords} dev.cocore records (+ ${Math.floor(nRecords / 3)} posts) each`)
    const t0 = performance.now()
    const repos = await buildRepos()
    const carBytes = repos.reduce((a, r) => a + r.car.length, 0)
    log(`built in ${((performance.now() - t0) / 1000).toFixed(1)} s (${(carBytes / 1e6).toFixed(1)} MB of CAR)`)

    const paths: WritePath[] = [await writePathAt(resolve('.'), 'this tree')]
    if (args.baseline !== 'none') paths.push(await writePathAt(extractBaseline(args.baseline), `baseline ${args.baseline}`))
    const results = new Map<string, Awaited<ReturnType<typeof passes>>[]>(paths.map((p) => [p.name, []]))
    for (let r = 0; r < runs; r++) {
      for (const path of r % 2 ? [...paths].reverse() : paths) {
        const res = await passes(path, repos, tmp)
        results.get(path.name)!.push(res)
        const rate = (p: Pass) => `${Math.round(p.records / p.seconds)} records/s (${Math.round(p.records / p.cpuSeconds)} per CPU s)`
        log(`round ${r + 1}/${runs} ${path.name}: backfill ${rate(res.backfill)}, resync ${rate(res.resync)}, changed ${rate(res.changed)}; ${res.rows} rows`)
      }
    }

    const summary = (name: string) => {
      const rs = results.get(name)!
      const of = (k: 'backfill' | 'resync' | 'changed') => ({
        recordsPerSec: Math.round(median(rs.map((x) => x[k].records / x[k].seconds))),
        recordsPerCpuSec: Math.round(median(rs.map((x) => x[k].records / x[k].cpuSeconds))),
        runsRecordsPerSec: rs.map((x) => Math.round(x[k].records / x[k].seconds)),
        records: rs[0]![k].records,
      })
      return { backfill: of('backfill'), resync: of('resync'), changed: of('changed'), rowsAtEnd: rs[0]!.rows }
    }
    const states = [...results.values()].flat().map((x) => x.state)
    const sameIndex = states.every((s) => s === states[0])
    const current = summary(paths[0]!.name)
    const baseline = paths[1] ? summary(paths[1].name) : null
    const result = {
      at: new Date().toISOString(),
      node: process.version,
      load: { loadavg1m: Number(loadavg()[0]!.toFixed(2)), cpus: availableParallelism() },
      repos: nRepos,
      recordsPerRepo: nRecords,
      carMB: Number((carBytes / 1e6).toFixed(1)),
      runs,
      current,
      baseline: baseline && { commit: args.baseline, ...baseline },
      ratioToBaseline: baseline && {
        backfill: Number((current.backfill.recordsPerSec / baseline.backfill.recordsPerSec).toFixed(3)),
        resync: Number((current.resync.recordsPerSec / baseline.resync.recordsPerSec).toFixed(3)),
        changed: Number((current.changed.recordsPerSec / baseline.changed.recordsPerSec).toFixed(3)),
      },
      sameIndexAsBaseline: sameIndex,
      targetRecordsPerSec: TARGET_RECORDS_PER_SEC,
    }
    const line = (s: ReturnType<typeof summary>, k: 'backfill' | 'resync' | 'changed') => `${s[k].recordsPerSec} records/s wall, ${s[k].recordsPerCpuSec} per CPU s`
    const rows: [string, string][] = [
      ['repos x records', `${nRepos} x ${nRecords} dev.cocore (+ posts; 1 in 100 invalid), ${result.carMB} MB of CAR`],
      ['load', `1-min load average ${result.load.loadavg1m} on ${result.load.cpus} cores at the end`],
      [`backfill (median of ${runs})`, line(current, 'backfill') + (baseline ? `  | baseline ${line(baseline, 'backfill')}  (x${result.ratioToBaseline!.backfill})` : '')],
      [`resync, unchanged`, line(current, 'resync') + (baseline ? `  | baseline ${line(baseline, 'resync')}  (x${result.ratioToBaseline!.resync})` : '')],
      [`resync, 10% changed`, line(current, 'changed') + (baseline ? `  | baseline ${line(baseline, 'changed')}  (x${result.ratioToBaseline!.changed})` : '')],
      ['index = baseline', baseline ? (sameIndex ? 'same index' : 'INDEX DIFFERS') : '(no baseline)'],
      [`vs target ${TARGET_RECORDS_PER_SEC} records/s`, `backfill x${(current.backfill.recordsPerSec / TARGET_RECORDS_PER_SEC).toFixed(2)}, resync x${(current.resync.recordsPerSec / TARGET_RECORDS_PER_SEC).toFixed(2)}`],
    ]
    const w = Math.max(...rows.map((x) => x[0].length))
    process.stdout.write('\n' + rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join('\n') + '\n')
    mkdirSync(DEFAULT_DIR, { recursive: true })
    writeFileSync(join(DEFAULT_DIR, 'backfill.json'), JSON.stringify(result, null, 2) + '\n')
    process.stdout.write(`\nwritten ${DEFAULT_DIR}/backfill.json\n`)
    if (!sameIndex) {
      process.stderr.write(`index differs from the baseline's:\n${diffLines(states[0]!, states.find((x) => x !== states[0])!)}\n`)
      process.exitCode = 1
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true })
  }
}

await main()
