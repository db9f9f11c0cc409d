/**
 * `npm run bench:scale`: every XRPC read of the AppView on indexes of 100,000
 * and 1,000,000 records, against two baselines in the same run.
 *
 *  1. The indexes (bench/scale/build.ts): a realistic network written
 *     through the indexer's own store, so every aggregate is kept as in
 *     production. Built once per size, seed and schema, and kept under
 *     data/bench/ (a 1M build takes minutes; --rebuild builds again).
 *  2. Three servers per index, each its own process (bench/scale/serve.ts):
 *     SYSTEM, the AppView's read path as production runs it (outputs not
 *     validated; its cache of answers off, so each answer is computed, and
 *     no limit per address); BARE, better-sqlite3 + Hono giving the same page
 *     with the same SQL (bench/scale/bare.ts); FIXED, Hono answering the
 *     same bytes with no work at all.
 *  3. Per method, the requests a reader makes (the pages of a list as it
 *     pages through it, profiles and receipts spread over the index), in
 *     closed loops on keep-alive connections (bench/scale/client.ts) at 2 and
 *     at 50 connections, the three servers alternating round by round so
 *     machine noise hits each. Reported: requests per second, p50 and p99
 *     (median over rounds), SYSTEM's ratios to BARE and to FIXED, and how
 *     each method's cost grew from the smallest index to the largest.
 *
 * Options: --sizes 100000,1000000 --accounts 20000 --providers 1000 --days 90
 * --seed 1 --connections 2,50 --seconds 1 --rounds 3 --methods REGEX
 * --json FILE (default data/bench/scale.json) --rebuild --cache (SYSTEM with
 * its cache of answers on).
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs'
import { availableParallelism, loadavg } from 'node:os'
import { join, resolve } from 'node:path'
import { parseArgs } from 'node:util'
import { openDb } from '../src/db/index.ts'
import { ids, NSID_PREFIX } from '../src/lexicon/generated/ids.ts'
import { setLogLevel } from '../src/logger.ts'
import { optimizePlanner } from '../appview/indexer/aggregates.ts'
import { buildIndex, type MixOpts, type Targets } from './scale/build.ts'
import { load, probe, type LoadResult } from './scale/client.ts'
import { median, table } from './report.ts'

process.env.COCORE_LOG_LEVEL ??= 'error'
setLogLevel(process.env.COCORE_LOG_LEVEL)

/** Bumped when the mix changes: a cached index of an older mix is built again. */
const MIX_VERSION = 2
const ROOT = resolve(import.meta.dirname, '..')
const DATA = join(ROOT, 'data', 'bench')

const { values: args } = parseArgs({
  options: {
    sizes: { type: 'string', default: '100000,1000000' },
    accounts: { type: 'string', default: '20000' },
    providers: { type: 'string', default: '1000' },
    days: { type: 'string', default: '90' },
    seed: { type: 'string', default: '1' },
    connections: { type: 'string', default: '2,50' },
    seconds: { type: 'string', default: '1' },
    rounds: { type: 'string', default: '3' },
    methods: { type: 'string' },
    json: { type: 'string', default: join(DATA, 'scale.json') },
    rebuild: { type: 'boolean', default: false },
    cache: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  },
})
if (args.help) {
  process.stdout.write(
    'usage: npm run bench:scale -- [--sizes N,N] [--accounts N] [--providers N] [--days N] [--seed N] [--connections C,C] [--seconds S] [--rounds R] [--methods REGEX] [--json FILE] [--rebuild] [--cache]\n',
  )
  process.exit(0)
}
const ints = (name: 'sizes' | 'connections', min: number) =>
  args[name]!.split(',').map((s) => {
    const v = Number(s)
    if (!(Number.isSafeInteger(v) && v >= min)) throw new Error(`--${name}: expected integers >= ${min}, got ${args[name]}`)
    return v
  })
const num = (name: 'accounts' | 'providers' | 'days' | 'seed' | 'seconds' | 'rounds', min: number) => {
  const v = Number(args[name])
  if (!(Number.isFinite(v) && v >= min)) throw new Error(`--${name}: expected a number >= ${min}, got ${args[name]}`)
  return v
}
const SIZES = ints('sizes', 1000)
const CONNECTIONS = ints('connections', 1)
const SECONDS = num('seconds', 0.1)
const ROUNDS = num('rounds', 1)
const mix = { accounts: num('accounts', 10), providers: num('providers', 2), days: num('days', 1), seed: num('seed', 0) }
const only = args.methods ? new RegExp(args.methods) : undefined
const log = (msg: string) => process.stderr.write(`[scale] ${msg}\n`)

// ---- the indexes -----------------------------------------------------------------------------

/** What a cached index depends on: the migrations (the schema and its triggers), the mix and its options. */
function cacheKey(records: number): string {
  const migrations = join(ROOT, 'src', 'db', 'migrations')
  const h = createHash('sha256').update(JSON.stringify({ MIX_VERSION, records, ...mix }))
  for (const f of readdirSync(migrations).filter((f) => f.endsWith('.sql')).sort()) h.update(f).update(readFileSync(join(migrations, f)))
  return h.digest('hex').slice(0, 12)
}

/** The index of `records` records, built now or taken from data/bench/. A cached one more than a day old is built again (its windows have moved past its records). */
function index(records: number): { path: string; targets: Targets; builtNow: boolean } {
  mkdirSync(DATA, { recursive: true })
  const base = join(DATA, `scale-${records}-${cacheKey(records)}`)
  const path = `${base}.sqlite`
  if (!args.rebuild && existsSync(path) && existsSync(`${base}.json`)) {
    const targets = JSON.parse(readFileSync(`${base}.json`, 'utf8')) as Targets
    if (Date.now() - targets.builtAt < 86400_000) return { path, targets, builtNow: false }
  }
  const tmp = `${base}.building.sqlite`
  for (const suffix of ['', '-wal', '-shm']) rmSync(`${tmp}${suffix}`, { force: true })
  log(`building ${records} records over ${mix.accounts} accounts (${mix.providers} providers, ${mix.days} days) through the store`)
  const db = openDb(tmp)
  // A page cache for the build (the index outgrows SQLite's default 2 MB many times over); the servers keep the default.
  db.$client.pragma('cache_size = -262144')
  const opts: MixOpts = { records, ...mix }
  const targets = buildIndex(db, opts, log)
  optimizePlanner(db, true)
  db.$client.pragma('wal_checkpoint(TRUNCATE)')
  db.$client.close()
  for (const suffix of ['-wal', '-shm']) rmSync(`${tmp}${suffix}`, { force: true })
  renameSync(tmp, path)
  writeFileSync(`${base}.json`, JSON.stringify(targets))
  return { path, targets, builtNow: true }
}

// ---- the servers ------------------------------------------------------------------------------

interface Server {
  port: number
  proc: ChildProcess
}

function startServer(kind: 'system' | 'bare' | 'fixed', path: string): Promise<Server> {
  const proc = spawn(process.execPath, [join(ROOT, 'bench', 'scale', 'serve.ts'), kind, path], {
    env: { ...process.env, SCALE_CACHE: args.cache ? '1' : '0' },
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  return new Promise((resolve, reject) => {
    let out = ''
    proc.stdout!.on('data', (d: Buffer) => {
      out += d.toString()
      const m = /READY (\d+)/.exec(out)
      if (m) resolve({ port: Number(m[1]), proc })
    })
    proc.on('exit', (code) => reject(new Error(`${kind} server exited (${code}) before listening`)))
  })
}

// ---- the reads --------------------------------------------------------------------------------

interface Target {
  label: string
  urls: string[]
}

const PAGES = 20

async function targetsOf(system: Server, t: Targets): Promise<Target[]> {
  const list = async (label: string, nsid: string, field: string, params: Record<string, string>): Promise<Target> => {
    const urls: string[] = []
    let cursor: string | undefined
    do {
      const q = new URLSearchParams(params)
      if (cursor) q.set('cursor', cursor)
      const url = `/xrpc/${nsid}?${q}`
      const res = await probe(system.port, url)
      const body = JSON.parse(res.body) as Record<string, unknown>
      if (res.status !== 200 || (field && !Array.isArray(body[field]))) throw new Error(`${url}: ${res.status} ${res.body.slice(0, 200)}`)
      urls.push(url)
      cursor = body.cursor as string | undefined
    } while (cursor && urls.length < PAGES)
    return { label, urls }
  }
  const spread = <T,>(xs: T[], n: number) => Array.from({ length: Math.min(n, xs.length) }, (_, i) => xs[Math.floor((i * xs.length) / Math.min(n, xs.length))]!)
  const short = (nsid: string) => nsid.slice(NSID_PREFIX.length)
  const all: (() => Promise<Target>)[] = [
    () => list(short(ids.AccountListProfiles), ids.AccountListProfiles, 'profiles', { limit: '10' }),
    () => list(short(ids.AccountListAccounts), ids.AccountListAccounts, 'accounts', { limit: '24' }),
    () => list(short(ids.AccountListFriendEdges), ids.AccountListFriendEdges, 'edges', { limit: '50' }),
    () => list(short(ids.AccountListIncomingFriends), ids.AccountListIncomingFriends, 'friends', { did: t.subjects[0]!, limit: '50' }),
    () => list(short(ids.ComputeListProviders), ids.ComputeListProviders, 'providers', { limit: '25' }),
    () => list(short(ids.ComputeListReceipts), ids.ComputeListReceipts, 'receipts', { limit: '25' }),
    () => list(`${short(ids.ComputeListReceipts)} (provider)`, ids.ComputeListReceipts, 'receipts', { provider: t.providers[0]!, limit: '25' }),
    () => list(short(ids.ComputeListSettlements), ids.ComputeListSettlements, 'settlements', { limit: '25' }),
    () => list(`${short(ids.ComputeListJobs)} (requester)`, ids.ComputeListJobs, 'jobs', { requester: t.requesters[0]!, limit: '25' }),
    () => list(short(ids.ComputeModelActivity), ids.ComputeModelActivity, 'models', {}),
    () => list(short(ids.ComputeLatency), ids.ComputeLatency, '', {}),
    async () => ({ label: short(ids.AccountGetProfile), urls: [...spread(t.providers, 10), ...spread(t.requesters, 10)].map((did) => `/xrpc/${ids.AccountGetProfile}?did=${did}`) }),
    async () => ({ label: short(ids.ComputeVerifyReceipt), urls: spread(t.receipts, 20).map((uri) => `/xrpc/${ids.ComputeVerifyReceipt}?uri=${encodeURIComponent(uri)}`) }),
    async () => ({ label: short(ids.ComputeVerifySettlement), urls: spread(t.settlements, 20).map((uri) => `/xrpc/${ids.ComputeVerifySettlement}?uri=${encodeURIComponent(uri)}`) }),
  ]
  const out: Target[] = []
  for (const make of all) {
    const target = await make()
    if (!only || only.test(target.label)) out.push(target)
  }
  return out
}

type Variant = 'system' | 'bare' | 'fixed'
const VARIANTS: Variant[] = ['system', 'bare', 'fixed']

interface Row {
  records: number
  method: string
  connections: number
  /** SYSTEM's figures, medians over rounds. */
  reqPerSec: number
  p50Ms: number
  p99Ms: number
  bareSqlite: { reqPerSec: number; p50Ms: number; p99Ms: number }
  fixedBody: { reqPerSec: number; p50Ms: number; p99Ms: number }
  /** SYSTEM's req/s over BARE's, and over FIXED's. */
  ratioToBareSqlite: number
  ratioToFixedBody: number
}

const round = (x: number, digits = 2) => Math.round(x * 10 ** digits) / 10 ** digits

async function measureSize(records: number): Promise<Row[]> {
  const { path, targets: t, builtNow } = index(records)
  log(`${records} records: ${path}${builtNow ? '' : ' (cached)'}; ${JSON.stringify(t.counts)}`)
  const servers: Partial<Record<Variant, Server>> = {}
  try {
    servers.system = await startServer('system', path)
    servers.bare = await startServer('bare', path)
    const targets = await targetsOf(servers.system, t)
    // FIXED answers with the first answer of each method, byte for byte.
    const bodies: Record<string, string> = {}
    for (const target of targets) bodies[target.label] = (await probe(servers.system.port, target.urls[0]!)).body
    const bodiesPath = join(DATA, `scale-fixed-${process.pid}.json`)
    writeFileSync(bodiesPath, JSON.stringify(bodies))
    servers.fixed = await startServer('fixed', bodiesPath)
    const urlsOf = (v: Variant, target: Target) => (v === 'fixed' ? [`/fixed/${encodeURIComponent(target.label)}`] : target.urls)
    for (const target of targets) {
      for (const url of target.urls) {
        const bare = await probe(servers.bare!.port, url)
        if (bare.status !== 200) throw new Error(`bare ${url}: ${bare.status} ${bare.body.slice(0, 200)}`)
      }
      // Warm-up: each server once over the method (JIT, page cache, statements).
      for (const v of VARIANTS) await load(servers[v]!.port, urlsOf(v, target), 2, Math.min(0.3, SECONDS))
    }
    const rows: Row[] = []
    for (const connections of CONNECTIONS) {
      for (const target of targets) {
        const results: Record<Variant, LoadResult[]> = { system: [], bare: [], fixed: [] }
        for (let r = 0; r < ROUNDS; r++) {
          // Each round starts with another server.
          const order = VARIANTS.map((_, i) => VARIANTS[(i + r) % VARIANTS.length]!)
          for (const v of order) {
            const res = await load(servers[v]!.port, urlsOf(v, target), connections, SECONDS)
            if (res.errors) throw new Error(`${v} ${target.label}: ${res.errors} answers were not 200`)
            results[v].push(res)
          }
        }
        const fig = (v: Variant) => ({ reqPerSec: round(median(results[v].map((x) => x.reqPerSec)), 0), p50Ms: round(median(results[v].map((x) => x.p50Ms)), 3), p99Ms: round(median(results[v].map((x) => x.p99Ms)), 3) })
        const sys = fig('system')
        const bare = fig('bare')
        const fixed = fig('fixed')
        rows.push({ records, method: target.label, connections, ...sys, bareSqlite: bare, fixedBody: fixed, ratioToBareSqlite: round(sys.reqPerSec / bare.reqPerSec), ratioToFixedBody: round(sys.reqPerSec / fixed.reqPerSec) })
        log(`${records} ${target.label} @${connections}: ${sys.reqPerSec} req/s (bare ${bare.reqPerSec}, fixed ${fixed.reqPerSec}), p50 ${sys.p50Ms} ms, p99 ${sys.p99Ms} ms`)
      }
    }
    rmSync(bodiesPath, { force: true })
    return rows
  } finally {
    for (const s of Object.values(servers)) s?.proc.kill()
  }
}


async function main() {
  const load0 = loadavg()[0]!
  const rows: Row[] = []
  for (const records of SIZES) rows.push(...(await measureSize(records)))
  const out = [
    `environment: node ${process.version}, ${availableParallelism()} cores, load average ${load0.toFixed(2)} at the start, ${loadavg()[0]!.toFixed(2)} at the end`,
    `mix: ${mix.accounts} accounts, ${mix.providers} providers, records dated over ${mix.days} days, seed ${mix.seed}; ${ROUNDS} rounds of ${SECONDS} s per server, method and connection count; medians`,
    `SYSTEM: the AppView's read path as production runs it (cache of answers ${args.cache ? 'on' : 'off'}); BARE: better-sqlite3 + Hono, same SQL; FIXED: Hono, fixed body`,
  ]
  for (const records of SIZES) {
    for (const connections of CONNECTIONS) {
      const mine = rows.filter((r) => r.records === records && r.connections === connections)
      out.push(
        '',
        `${records} records, ${connections} connections`,
        table([
          ['method', 'req/s', 'p50 ms', 'p99 ms', 'bare req/s', 'fixed req/s', 'vs bare', 'vs fixed'],
          ...mine.map((r) => [r.method, String(r.reqPerSec), r.p50Ms.toFixed(2), r.p99Ms.toFixed(2), String(r.bareSqlite.reqPerSec), String(r.fixedBody.reqPerSec), `${r.ratioToBareSqlite.toFixed(2)}x`, `${r.ratioToFixedBody.toFixed(2)}x`]),
        ]),
      )
    }
  }
  const growth: { method: string; connections: number; from: number; to: number; costGrowth: number; p99Growth: number }[] = []
  if (SIZES.length > 1) {
    const [from, to] = [SIZES[0]!, SIZES[SIZES.length - 1]!]
    for (const connections of CONNECTIONS) {
      for (const r of rows.filter((x) => x.records === from && x.connections === connections)) {
        const big = rows.find((x) => x.records === to && x.connections === connections && x.method === r.method)
        if (big) growth.push({ method: r.method, connections, from, to, costGrowth: round(r.reqPerSec / big.reqPerSec), p99Growth: round(big.p99Ms / r.p99Ms) })
      }
    }
    out.push(
      '',
      `cost growth from ${from} to ${to} records (time per request: req/s at ${from} over req/s at ${to}; and p99)`,
      table([['method', 'connections', 'cost x', 'p99 x'], ...growth.map((g) => [g.method, String(g.connections), `${g.costGrowth.toFixed(2)}x`, `${g.p99Growth.toFixed(2)}x`])]),
    )
  }
  process.stdout.write(out.join('\n') + '\n')
  mkdirSync(DATA, { recursive: true })
  writeFileSync(args.json!, JSON.stringify({ environment: { node: process.version, cores: availableParallelism(), loadAverage: load0 }, mix, seconds: SECONDS, rounds: ROUNDS, cache: args.cache, methods: rows, growth }, null, 2) + '\n')
  log(`figures written to ${args.json}`)
}

await main()
