/**
 * `npm run bench:reads`: the cost of one AppView read, per XRPC method,
 * against the read API of a baseline commit, in the same run on the same
 * index.
 *
 *  1. Builds an index the size a 10-minute stress soak leaves on the
 *     exchange's AppView (by default 5,000 chats: a payment authorization and
 *     a job per chat in the requesters' repos, a signed receipt in a
 *     provider's, a settlement in the exchange's), plus profiles and friend
 *     records of a few hundred accounts. Every record is validated against
 *     its lexicon first and written through the indexer's own store.
 *  2. BASELINE: the read API (appview/server.ts and everything it imports) of
 *     the commit given by --baseline, extracted with `git archive` into a
 *     temporary directory and loaded from there, on the same database.
 *     CURRENT: the read API of this working tree.
 *  3. For each method the stress run reads, the same sequence of requests
 *     (the pages of the list, as a reader pages through it) goes through each
 *     variant's Hono app in process (`app.request`: no sockets, so what is
 *     measured is the read path itself), alternately (baseline first in even
 *     rounds, current first in odd ones) so machine noise hits both. Reported:
 *     the median over rounds of the CPU time per request, and the ratio.
 *     Both are run as `npm start` runs them (outputs validated against the
 *     lexicons) and as production does (not).
 *
 * Every answer of the current read API must be byte for byte the baseline's
 * (each round runs both on one frozen `Date.now`): the bench fails otherwise.
 *
 * Options: --chats N (default 5000), --accounts N (default 300), --rounds R
 * (default 5), --pages P (pages per list per round, default 20),
 * --baseline REF (default: the commit before the read path was reworked),
 * --json FILE.
 */
import { execFileSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { availableParallelism, loadavg, tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { parseArgs } from 'node:util'
import { TID } from '@atproto/common-web'
import type { Hono } from 'hono'
import { setLogLevel } from '../src/logger.ts'
import { IndexStore, type RecordWrite } from '../appview/indexer/store.ts'
import type { AppDeps } from '../appview/server.ts'
import { openDb } from '../src/db/index.ts'
import { P256Signer, sha256Hex } from '../src/crypto/p256.ts'
import { attestationRecord, authorizationRecord, friend, hex32, jobRecord, profile, providerRecord, receiptRecord, settlementRecord } from '../src/dev/records.ts'
import { ids, NSID_PREFIX } from '../src/lexicon/generated/ids.ts'
import { validateRecord } from '../src/lexicon/validate.ts'
import { median, table } from './report.ts'

process.env.COCORE_LOG_LEVEL ??= 'error'
setLogLevel(process.env.COCORE_LOG_LEVEL)

/** The last commit whose read API built every query through drizzle per call. */
const DEFAULT_BASELINE = 'e788a18'

const { values: args } = parseArgs({
  options: {
    chats: { type: 'string', default: '5000' },
    accounts: { type: 'string', default: '300' },
    rounds: { type: 'string', default: '5' },
    pages: { type: 'string', default: '20' },
    baseline: { type: 'string', default: DEFAULT_BASELINE },
    json: { type: 'string' },
    help: { type: 'boolean', short: 'h', default: false },
  },
})
if (args.help) {
  process.stdout.write('usage: npm run bench:reads -- [--chats N] [--accounts N] [--rounds R] [--pages P] [--baseline REF] [--json FILE]\n')
  process.exit(0)
}
const int = (name: 'chats' | 'accounts' | 'rounds' | 'pages', min: number) => {
  const v = Number(args[name])
  if (!(Number.isSafeInteger(v) && v >= min)) throw new Error(`--${name}: expected an integer >= ${min}, got ${args[name]}`)
  return v
}
const CHATS = int('chats', 1)
const ACCOUNTS = int('accounts', 8)
const ROUNDS = int('rounds', 1)
const PAGES = int('pages', 1)
const log = (msg: string) => process.stderr.write(`[bench] ${msg}\n`)

// ---- the index ------------------------------------------------------------------------

const CID = 'bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm'
const B32 = 'abcdefghijklmnopqrstuvwxyz234567'
/** A valid did:plc, one per number: the number's base-32 digits, padded. */
const plc = (n: number) => `did:plc:${[...n.toString(32).padStart(24, '0')].map((d) => B32[parseInt(d, 32)]).join('')}`
const MODELS = ['llama-3-8b', 'qwen-2.5-7b', 'mistral-7b']

interface World {
  requesters: string[]
  providers: string[]
  receipts: string[]
  settlements: string[]
  records: number
}

/** Fills the index as the stress run's traffic would, through the indexer's store. */
function buildIndex(store: IndexStore): World {
  const signer = P256Signer.generate()
  const now = Date.now()
  const exchange = plc(1)
  const requesters = [2, 3, 4, 5].map(plc)
  const providers = [6, 7, 8, 9, 10, 11, 12, 13].map(plc)
  const others = Array.from({ length: ACCOUNTS - 13 }, (_, i) => plc(100 + i))
  const everyone = [exchange, ...requesters, ...providers, ...others]
  let records = 0
  const pending = new Map<string, RecordWrite[]>()
  const put = (did: string, record: Record<string, unknown>, rkey = TID.nextStr()) => {
    const collection = record.$type as string
    const valid = validateRecord(collection, record)
    if (!valid.success) throw new Error(`invalid ${collection}: ${valid.message}`)
    const uri = `at://${did}/${collection}/${rkey}`
    const list = pending.get(did) ?? []
    list.push({ action: 'create', uri, did, collection, rkey, cid: CID, record })
    pending.set(did, list)
    records++
    return { uri, cid: CID }
  }
  const flush = () =>
    store.tx(() => {
      for (const [did, ops] of pending) store.applyCommit(did, TID.nextStr(), ops)
      pending.clear()
    })
  /** Times spread over the last six days, oldest first: inside latency's week and modelActivity's month. */
  const at = (i: number, n: number) => new Date(now - 6 * 86400_000 + Math.floor((i * 6 * 86400_000) / n)).toISOString()

  everyone.forEach((did, i) => {
    put(did, { ...profile(`account ${i}`), createdAt: at(i, everyone.length) }, 'self')
    // A few friends each; the providers are everyone's friends (the stress run reads their incoming friends).
    for (let k = 1; k <= 3; k++) put(did, { ...friend(everyone[(i + k * 17) % everyone.length]!), createdAt: at(i, everyone.length) })
    if (!providers.includes(did)) put(did, { ...friend(providers[i % providers.length]!), createdAt: at(i, everyone.length) })
  })
  const attestations = new Map<string, { ref: { uri: string; cid: string }; model: string }>()
  providers.forEach((p, i) => {
    const model = MODELS[i % MODELS.length]!
    attestations.set(p, { ref: put(p, attestationRecord(signer)), model })
    put(p, providerRecord(signer, undefined, model))
  })
  flush()

  const receipts: string[] = []
  const settlements: string[] = []
  for (let i = 0; i < CHATS; i++) {
    const requester = requesters[i % requesters.length]!
    const provider = providers[i % providers.length]!
    const { ref: attestation, model } = attestations.get(provider)!
    const createdAt = at(i, CHATS)
    const auth = put(requester, { ...authorizationRecord(exchange), createdAt })
    const job = put(requester, { ...jobRecord(auth, hex32(), model), createdAt })
    const completedAt = new Date(Date.parse(createdAt) + 1500 + (i % 7) * 100).toISOString()
    const receipt = put(
      provider,
      receiptRecord(signer, { job, requester, model, inputCommitment: hex32(), outputCommitment: sha256Hex(`reply ${i}`), tokens: { in: 12 + (i % 5), out: 64 }, startedAt: createdAt, completedAt, attestation }),
    )
    receipts.push(receipt.uri)
    const settlement = put(exchange, settlementRecord({ receipt, authorization: auth, amount: 42, fee: 2, reference: `ledger ${i}`, settledAt: completedAt }))
    settlements.push(settlement.uri)
    if (i % 500 === 499) flush()
  }
  flush()
  return { requesters, providers, receipts, settlements, records }
}

// ---- the read APIs ----------------------------------------------------------------------

type CreateApp = (deps: AppDeps) => Hono

/** The baseline's read API: its tree at `ref`, extracted beside this one, sharing node_modules. */
async function loadBaseline(ref: string, dir: string): Promise<{ createApp: CreateApp; commit: string }> {
  const root = resolve(import.meta.dirname, '..')
  const commit = execFileSync('git', ['rev-parse', '--short', `${ref}^{commit}`], { cwd: root, encoding: 'utf8' }).trim()
  const tar = execFileSync('git', ['archive', '--format=tar', commit, 'appview', 'src', 'lexicons'], { cwd: root, maxBuffer: 1 << 30 })
  mkdirSync(dir, { recursive: true })
  execFileSync('tar', ['-x', '-C', dir], { input: tar })
  symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'))
  const mod = (await import(join(dir, 'appview', 'server.ts'))) as { createApp: CreateApp }
  return { createApp: mod.createApp, commit }
}

// ---- the reads ----------------------------------------------------------------------------

interface Target {
  /** The method without the common prefix, and what tells its requests apart. */
  label: string
  /** The requests of one round: the pages of a list, in order. */
  urls: string[]
}

/** The methods the stress run reads (bench/stress/load.ts), and the single-record ones. */
async function targets(app: Hono, w: World): Promise<Target[]> {
  const list = async (nsid: string, field: string, params: Record<string, string>, note = ''): Promise<Target> => {
    const urls: string[] = []
    let cursor: string | undefined
    do {
      const q = new URLSearchParams(params)
      if (cursor) q.set('cursor', cursor)
      const url = `/xrpc/${nsid}?${q}`
      urls.push(url)
      const res = await app.request(url)
      const body = (await res.json()) as Record<string, unknown>
      if (res.status !== 200 || (field && !Array.isArray(body[field]))) throw new Error(`${url}: ${res.status} ${JSON.stringify(body).slice(0, 200)}`)
      cursor = body.cursor as string | undefined
    } while (cursor && urls.length < PAGES)
    return { label: `${nsid.slice(NSID_PREFIX.length)}${note}`, urls }
  }
  const spread = <T,>(xs: T[], n: number) => Array.from({ length: n }, (_, i) => xs[Math.floor((i * xs.length) / n)]!)
  return [
    await list(ids.AccountListProfiles, 'profiles', { limit: '10' }),
    await list(ids.AccountListAccounts, 'accounts', { limit: '10' }),
    await list(ids.AccountListFriendEdges, 'edges', { limit: '50' }),
    await list(ids.AccountListIncomingFriends, 'friends', { did: w.providers[0]!, limit: '10' }),
    await list(ids.ComputeListProviders, 'providers', { limit: '25' }),
    await list(ids.ComputeListReceipts, 'receipts', { limit: '25' }),
    await list(ids.ComputeListReceipts, 'receipts', { provider: w.providers[0]!, limit: '25' }, ' (provider)'),
    await list(ids.ComputeListSettlements, 'settlements', { limit: '25' }),
    await list(ids.ComputeListJobs, 'jobs', { requester: w.requesters[0]!, limit: '25' }),
    await list(ids.ComputeModelActivity, 'models', {}),
    await list(ids.ComputeLatency, '', {}),
    { label: 'account.getProfile', urls: spread(w.providers, PAGES).map((did) => `/xrpc/${ids.AccountGetProfile}?did=${did}`) },
    { label: 'compute.verifyReceipt', urls: spread(w.receipts, PAGES).map((uri) => `/xrpc/${ids.ComputeVerifyReceipt}?uri=${encodeURIComponent(uri)}`) },
  ]
}


/** Requests timed per pass at least: a list shorter than this is gone through again (the CPU clock ticks in milliseconds). */
const MIN_PASS = 50

/** CPU µs per request of one pass over the target's requests; the answers of its first time through, for comparison. */
async function pass(app: Hono, t: Target): Promise<{ cpuUs: number; answers: string[] }> {
  const answers: string[] = []
  const n = Math.max(MIN_PASS, t.urls.length)
  const cpu0 = process.cpuUsage()
  for (let i = 0; i < n; i++) {
    const res = await app.request(t.urls[i % t.urls.length]!)
    const text = await res.text()
    if (i < t.urls.length) answers.push(`${res.status} ${res.headers.get('content-type')} ${text}`)
  }
  const cpu = process.cpuUsage(cpu0)
  return { cpuUs: (cpu.user + cpu.system) / n, answers }
}

interface Row {
  method: string
  requests: number
  baselineUs: number
  currentUs: number
  ratio: number
}

const realNow = Date.now

async function main() {
  const tmp = mkdtempSync(join(tmpdir(), 'cocore-bench-reads-'))
  try {
    const baseline = await loadBaseline(args.baseline!, join(tmp, 'baseline'))
    const { createApp } = await import('../appview/server.ts')
    const db = openDb(join(tmp, 'appview.sqlite'))
    const store = new IndexStore(db)
    const t0 = performance.now()
    const w = buildIndex(store)
    db.$client.pragma('wal_checkpoint(TRUNCATE)')
    db.$client.exec('ANALYZE')
    log(`index: ${w.records} records (${CHATS} chats, ${ACCOUNTS} accounts) built in ${((performance.now() - t0) / 1000).toFixed(1)} s; baseline ${baseline.commit}`)

    const results: Record<string, Row[]> = {}
    let mismatches = 0
    for (const mode of ['dev', 'production'] as const) {
      const validateOutput = mode === 'dev'
      // The current read API without its cache of answers: each request here is computed, as the baseline's are.
      const apps = { baseline: baseline.createApp({ db, store, validateOutput }), current: createApp({ db, store, validateOutput, publicReads: { cacheEntries: 0, ratePerMinute: 0 } }) }
      const list = await targets(apps.current, w)
      // Warm-up: both variants once over everything (JIT, SQLite page cache, statement caches).
      for (const t of list) for (const app of Object.values(apps)) await pass(app, t)
      const rows: Row[] = []
      for (const t of list) {
        const us = { baseline: [] as number[], current: [] as number[] }
        for (let r = 0; r < ROUNDS; r++) {
          // One clock for both variants in a round: the activity and latency windows end now, so their answers would differ by the time between the calls.
          const frozen = Date.now()
          Date.now = () => frozen
          const order = r % 2 === 0 ? (['baseline', 'current'] as const) : (['current', 'baseline'] as const)
          const got: Partial<Record<'baseline' | 'current', string[]>> = {}
          for (const v of order) {
            const p = await pass(apps[v], t)
            us[v].push(p.cpuUs)
            got[v] = p.answers
          }
          Date.now = realNow
          got.baseline!.forEach((a, i) => {
            if (a !== got.current![i]) {
              if (mismatches++ < 5) log(`DIFFERENT ANSWER ${t.label} ${t.urls[i]}\n  baseline ${a.slice(0, 300)}\n  current  ${got.current![i]!.slice(0, 300)}`)
            }
          })
        }
        const b = median(us.baseline)
        const c = median(us.current)
        rows.push({ method: t.label, requests: t.urls.length, baselineUs: Math.round(b), currentUs: Math.round(c), ratio: Math.round((b / c) * 100) / 100 })
      }
      results[mode] = rows
    }

    const out = [
      `environment: node ${process.version}, ${availableParallelism()} cores, load average ${loadavg()[0]!.toFixed(2)}`,
      `index: ${w.records} records (${CHATS} chats, ${ACCOUNTS} accounts); ${ROUNDS} rounds of up to ${PAGES} requests per method; CPU µs per request, median over rounds`,
      `baseline: ${baseline.commit} (its appview/ and src/); current: this working tree`,
    ]
    for (const [mode, rows] of Object.entries(results)) {
      const sum = (k: 'baselineUs' | 'currentUs') => rows.reduce((s, r) => s + r[k], 0)
      out.push(
        '',
        mode === 'dev' ? 'as `npm start` runs it (outputs validated against the lexicons)' : 'as production runs it (outputs not validated)',
        table([
          ['method', 'requests', 'baseline µs', 'current µs', 'baseline/current'],
          ...rows.map((r) => [r.method, String(r.requests), String(r.baselineUs), String(r.currentUs), `${r.ratio.toFixed(2)}x`]),
          ['all methods, one request each', '', String(sum('baselineUs')), String(sum('currentUs')), `${(sum('baselineUs') / sum('currentUs')).toFixed(2)}x`],
        ]),
      )
    }
    out.push('', mismatches ? `FAILED: ${mismatches} answers differ from the baseline's` : 'every answer identical to the baseline\'s')
    process.stdout.write(out.join('\n') + '\n')
    if (args.json) writeFileSync(args.json, JSON.stringify({ baseline: baseline.commit, chats: CHATS, accounts: ACCOUNTS, records: w.records, results, mismatches }, null, 2) + '\n')
    if (mismatches) process.exitCode = 1
    db.$client.close()
  } finally {
    rmSync(tmp, { recursive: true, force: true })
  }
}

await main()
