/**
 * The aggregates the indexer keeps (migration 0007's triggers, the windows'
 * moves) against a from-scratch computation, over seeded random sequences of
 * creates, updates, deletes, resyncs (replaceRepo), purges, accounts hidden
 * and shown again, handles set and windows moved either way: after every few
 * steps every aggregate table equals the one computed in plain JavaScript
 * from the records, and the reads (modelActivity, latency, getProfile's
 * series) equal their definition at a time between two window moves. A
 * rebuild, and the same records written in another order into another
 * database, give the same tables.
 *
 *   COCORE_FUZZ_CASES=3000 COCORE_FUZZ_SEED=7 npx vitest run test/aggregates.test.ts
 */
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { openDb, type Db } from '../src/db/index.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { IndexStore, type RecordWrite } from '../appview/indexer/store.ts'
import { advanceWindows, rebuildAggregates, WINDOWS, WINDOW_NAMES, windowStarts } from '../appview/indexer/aggregates.ts'
import { accountTotals, latencyBucket, latencySample, latencyStats, modelActivity, modelsDirectory, networkLatency, profileSeries, providerLeaderboard } from '../appview/api/aggregates.ts'
import { dumpAggregates, expectedAggregates } from './fixture/aggregates.ts'
import { fuzzConfig, rng, type Rng } from './fixture/fuzz.ts'

const { seed, cases } = fuzzConfig(400)
const DAY = 86400_000
const B32 = 'abcdefghijklmnopqrstuvwxyz234567'
const plc = (n: number) => `did:plc:${[...n.toString(32).padStart(24, '0')].map((d) => B32[parseInt(d, 32)]).join('')}`
const DIDS = Array.from({ length: 10 }, (_, i) => plc(i + 1))
const MODELS = ['m1', 'm2', 'm3', 'other-model']
const COLLECTIONS = [ids.ComputeReceipt, ids.ComputeReceipt, ids.ComputeReceipt, ids.ComputeJob, ids.ComputeJob, ids.ComputeProvider, ids.AccountFriend, ids.AccountFriend, ids.AccountProfile, ids.ComputeAttestation]

const newDb = (name: string) => openDb(join(mkdtempSync(join(tmpdir(), 'cocore-agg-')), `${name}.sqlite`))

/** A time as a record may write it: UTC, an offset, extra fraction digits (cut, not rounded, by Date.parse). */
function stamp(r: Rng, t: number): string {
  const iso = new Date(t).toISOString()
  switch (r.int(4)) {
    case 0:
      return iso
    case 1:
      return `${iso.slice(0, 23)}${r.range(0, 9999)}Z`
    case 2:
      return `${iso.slice(0, 19)}Z`
    default: {
      const off = r.pick([-480, -150, 0, 60, 330, 765])
      const local = new Date(t + off * 60_000).toISOString().slice(0, 23)
      const a = Math.abs(off)
      return `${local}${off < 0 ? '-' : '+'}${String(Math.floor(a / 60)).padStart(2, '0')}:${String(a % 60).padStart(2, '0')}`
    }
  }
}

function body(r: Rng, collection: string, now: number): Record<string, unknown> {
  // Mostly in the last 12 days (the week window moves over them), some in the future, some a month back, a few a year back.
  const t = now - r.range(-DAY, 12 * DAY) - (r.chance(0.15) ? 30 * DAY : 0) - (r.chance(0.03) ? 400 * DAY : 0)
  switch (collection) {
    case ids.ComputeReceipt: {
      const ms = r.chance(0.1) ? -r.range(1, 5000) : r.pick([r.range(0, 999), r.range(1000, 99_999), r.range(100_000, 10_000_000)])
      return {
        $type: collection,
        ...(r.chance(0.9) ? { model: r.pick(MODELS) } : {}),
        tokens: { in: r.range(0, 500), out: r.range(0, 500) },
        startedAt: stamp(r, t - ms),
        completedAt: r.chance(0.05) ? 'not a time' : stamp(r, t),
      }
    }
    case ids.ComputeJob:
      return { $type: collection, model: r.pick(MODELS), createdAt: stamp(r, t) }
    case ids.ComputeProvider:
      return {
        $type: collection,
        supportedModels: r.chance(0.1) ? 'm1' : Array.from({ length: r.int(4) }, () => r.pick([...MODELS, ''])),
        ...(r.chance(0.9) ? { createdAt: stamp(r, t) } : {}),
      }
    case ids.AccountFriend:
      return { $type: collection, subject: r.chance(0.05) ? 'not-a-did' : r.pick(DIDS), createdAt: stamp(r, t) }
    case ids.AccountProfile:
      return { $type: collection, ...(r.chance(0.5) ? { handle: r.pick(['', 'a.test', 'B.Example']) } : {}), createdAt: stamp(r, t) }
    default:
      return { $type: collection }
  }
}

/** The store driven at random; records kept in memory too, to pick what to update or delete. */
class Driver {
  readonly db: Db
  readonly r: Rng
  readonly now: number
  readonly store: IndexStore
  private rev = 0
  private rkey = 0
  constructor(db: Db, r: Rng, now: number) {
    this.db = db
    this.r = r
    this.now = now
    this.store = new IndexStore(db)
  }
  private nextRev = () => String(++this.rev).padStart(12, '0')
  private uris(did?: string): { uri: string; collection: string; rkey: string; did: string }[] {
    return this.db.$client.prepare(`SELECT uri, collection, rkey, did FROM records ${did ? 'WHERE did = ?' : ''}`).all(...(did ? [did] : [])) as never
  }
  write(did: string, collection: string, rkey = collection === ids.AccountProfile ? 'self' : `k${++this.rkey}`): RecordWrite {
    return { action: 'create', uri: `at://${did}/${collection}/${rkey}`, did, collection, rkey, cid: `c${this.r.next()}`, record: body(this.r, collection, this.now) }
  }
  step(): string {
    const r = this.r
    const did = r.pick(DIDS)
    const roll = r.int(100)
    if (roll < 55) {
      const ops = Array.from({ length: r.range(1, 3) }, () => this.write(did, r.pick(COLLECTIONS)))
      this.store.tx(() => this.store.applyCommit(did, this.nextRev(), ops))
      return `create ${ops.length}`
    }
    if (roll < 67) {
      const mine = this.uris(did)
      if (!mine.length) return 'update (none)'
      const x = r.pick(mine)
      this.store.tx(() => this.store.applyCommit(did, this.nextRev(), [{ ...this.write(did, x.collection, x.rkey), action: 'update' }]))
      return `update ${x.collection}`
    }
    if (roll < 77) {
      const mine = this.uris(did)
      if (!mine.length) return 'delete (none)'
      const x = r.pick(mine)
      this.store.tx(() => this.store.applyCommit(did, this.nextRev(), [{ action: 'delete', uri: x.uri }]))
      return `delete ${x.collection}`
    }
    if (roll < 83) {
      const active = r.chance(0.5)
      this.store.setStatus(did, active, active ? null : 'deactivated')
      return active ? 'show' : 'hide'
    }
    if (roll < 87) {
      this.store.setHandle(did, r.pick([null, '', 'h1.test', 'H2.test']))
      return 'handle'
    }
    if (roll < 88) {
      this.store.tx(() => this.store.purge(did))
      return 'purge'
    }
    if (roll < 95) {
      // A resync: some records kept as they are, some rewritten, some new; the rest go.
      const writes: RecordWrite[] = []
      for (const x of this.uris(did)) {
        const keep = r.int(3)
        if (keep === 0) continue
        const row = this.db.$client.prepare('SELECT cid, body FROM records WHERE uri = ?').get(x.uri) as { cid: string; body: string }
        writes.push(keep === 1 ? { action: 'create', uri: x.uri, did, collection: x.collection, rkey: x.rkey, cid: row.cid, record: JSON.parse(row.body) } : this.write(did, x.collection, x.rkey))
      }
      for (let i = r.int(3); i > 0; i--) writes.push(this.write(did, r.pick(COLLECTIONS)))
      this.store.tx(() => this.store.replaceRepo(did, this.nextRev(), null, writes))
      return 'resync'
    }
    // The windows move, mostly forward, sometimes back.
    advanceWindows(this.db, this.now + r.range(-DAY, 2 * DAY))
    return 'windows'
  }
}

interface Rec {
  uri: string
  did: string
  sortAt: string
  model: string | null
  subject: string | null
  collection: string
  body: Record<string, any>
}
const records = (db: Db) =>
  (db.$client.prepare('SELECT uri, did, collection, sort_at AS sortAt, model, subject_did AS subject, body FROM records WHERE did NOT IN (SELECT did FROM accounts WHERE active = 0)').all() as (Omit<Rec, 'body'> & { body: string })[]).map(
    (x) => ({ ...x, body: JSON.parse(x.body) as Record<string, any> }),
  )
const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0)
const tokensOf = (x: Rec) => Number(x.body.tokens?.in ?? 0) + Number(x.body.tokens?.out ?? 0)

/** modelActivity by its definition: visible receipts naming a model, per window ending at `now`. */
function referenceActivity(db: Db, now: number) {
  const receipts = records(db).filter((x) => x.collection === ids.ComputeReceipt && x.model !== null && x.sortAt >= new Date(now - WINDOWS.month).toISOString())
  const windows = (xs: Rec[]) =>
    Object.fromEntries(
      WINDOW_NAMES.map((w) => {
        const inside = xs.filter((x) => x.sortAt >= new Date(now - WINDOWS[w]).toISOString())
        return [w, { requests: inside.length, tokens: inside.reduce((t, x) => t + tokensOf(x), 0) }]
      }),
    )
  const models = [...new Set(receipts.map((x) => x.model!))].map((modelId) => {
    const mine = receipts.filter((x) => x.model === modelId)
    const byProvider = [...new Set(mine.map((x) => x.did))].map((did) => ({ did, stats: windows(mine.filter((x) => x.did === did)) }))
    byProvider.sort((a, b) => b.stats.month!.requests - a.stats.month!.requests || cmp(a.did, b.did))
    return { modelId, totals: windows(mine), byProvider }
  })
  return models.sort((a, b) => b.totals.month!.requests - a.totals.month!.requests || cmp(a.modelId, b.modelId))
}

/** The models directory and the provider leaderboard by their definitions. */
function referenceDirectory(db: Db, now: number) {
  const all = records(db)
  const receipts = all.filter((x) => x.collection === ids.ComputeReceipt && x.model !== null)
  const windows = (xs: Rec[]) =>
    Object.fromEntries(
      WINDOW_NAMES.map((w) => {
        const inside = xs.filter((x) => x.sortAt >= new Date(now - WINDOWS[w]).toISOString())
        return [w, { requests: inside.length, tokens: inside.reduce((t, x) => t + tokensOf(x), 0) }]
      }),
    ) as Record<(typeof WINDOW_NAMES)[number], { requests: number; tokens: number }>
  const offers = all.filter((x) => x.collection === ids.ComputeProvider).map((x) => ({ did: x.did, models: new Set(Array.isArray(x.body.supportedModels) ? (x.body.supportedModels as unknown[]).filter((m): m is string => typeof m === 'string' && m !== '') : []) }))
  const models = [...new Set([...receipts.map((x) => x.model!), ...offers.flatMap((o) => [...o.models])])]
  const directory = models
    .map((modelId) => {
      const mine = receipts.filter((x) => x.model === modelId)
      const machines = offers.filter((o) => o.models.has(modelId))
      return { modelId, providerCount: new Set(machines.map((o) => o.did)).size, machineCount: machines.length, requests: mine.length, tokens: mine.reduce((t, x) => t + tokensOf(x), 0), activity: windows(mine) }
    })
    .sort((a, b) => b.activity.month.requests - a.activity.month.requests || b.machineCount - a.machineCount || cmp(a.modelId, b.modelId))
  const stats = db.$client.prepare('SELECT did, handle, machines FROM account_stats').all() as { did: string; handle: string | null; machines: number }[]
  const leaderboard = [...new Set(receipts.map((x) => x.did))]
    .map((did) => {
      const mine = receipts.filter((x) => x.did === did)
      const a = stats.find((s) => s.did === did)
      return { did, handle: a?.handle ?? null, machines: a?.machines ?? 0, requests: mine.length, tokens: mine.reduce((t, x) => t + tokensOf(x), 0), activity: windows(mine) }
    })
    .sort((a, b) => b.activity.month.requests - a.activity.month.requests || b.activity.month.tokens - a.activity.month.tokens || cmp(a.did, b.did))
    .slice(0, 5)
  return { directory, leaderboard }
}

/** latency by its definition, over the buckets (three significant digits) the histograms keep. */
function referenceLatency(db: Db, now: number) {
  const samples = records(db)
    .filter((x) => x.collection === ids.ComputeReceipt && x.sortAt >= new Date(now - WINDOWS.week).toISOString())
    .sort((a, b) => cmp(b.sortAt, a.sortAt) || cmp(b.uri, a.uri))
    .flatMap((x) => {
      const ms = latencySample(x.body.startedAt, x.body.completedAt)
      return ms === null ? [] : [{ ...x, ms }]
    })
  const stats = (xs: typeof samples) => {
    const byBucket = latencyStats(xs.map((x) => latencyBucket(x.ms)))
    return { ...byBucket, avgMs: xs.length ? Math.round(xs.reduce((t, x) => t + x.ms, 0) / xs.length) : null, lastMs: xs[0]?.ms ?? null }
  }
  const grouped = (key: (x: (typeof samples)[number]) => string | null) =>
    [...new Set(samples.map(key).filter((k): k is string => k !== null))]
      .map((k) => ({ key: k, stats: stats(samples.filter((x) => key(x) === k)) }))
      .sort((a, b) => b.stats.sampleCount - a.stats.sampleCount || cmp(a.key, b.key))
  return {
    overall: stats(samples),
    byProvider: grouped((x) => x.did).map(({ key, stats: s }) => ({ did: key, stats: s })),
    byModel: grouped((x) => x.model).map(({ key, stats: s }) => ({ modelId: key, stats: s })),
  }
}

/** getProfile's series by its definition. */
function referenceSeries(db: Db, did: string, now: number) {
  const all = records(db)
  const mine = all.filter((x) => x.did === did)
  const midnight = Math.floor(now / DAY) * DAY
  const oldest = midnight - ((new Date(midnight).getUTCDay() + 6) % 7) * DAY - 51 * 7 * DAY
  const weekIndex = (sortAt: string) => (sortAt && sortAt >= new Date(oldest).toISOString() && sortAt < new Date(oldest + 52 * 7 * DAY).toISOString() ? Math.floor((Date.parse(sortAt.slice(0, 10)) - oldest) / (7 * DAY)) : -1)
  const zeros = () => Array.from({ length: 52 }, () => 0)
  const s = { jobsDispatched: zeros(), receiptsServed: zeros(), machinesIndexedCumulative: zeros(), tokensIndexed: zeros(), trustedByNew: zeros() }
  for (const x of mine) {
    const w = weekIndex(x.sortAt)
    if (x.collection === ids.ComputeJob && w >= 0) s.jobsDispatched[w]!++
    if (x.collection === ids.ComputeReceipt && w >= 0) {
      s.receiptsServed[w]!++
      s.tokensIndexed[w]! += tokensOf(x)
    }
  }
  for (let w = 0; w < 52; w++) {
    const end = new Date(oldest + (w + 1) * 7 * DAY).toISOString()
    s.machinesIndexedCumulative[w] = mine.filter((x) => x.collection === ids.ComputeProvider && x.sortAt < end).length
  }
  const firsts = new Map<string, string>()
  for (const x of all.filter((x) => x.collection === ids.AccountFriend && x.subject === did)) if (!firsts.has(x.did) || x.sortAt < firsts.get(x.did)!) firsts.set(x.did, x.sortAt)
  for (const first of firsts.values()) {
    const w = weekIndex(first)
    if (w >= 0) s.trustedByNew[w]!++
  }
  return { weekSeries: { oldestWeekStart: new Date(oldest).toISOString().slice(0, 10), ...s }, incomingFriendsCount: firsts.size }
}

/** A time a read may come at: near where the windows stand, on either side. */
const readTime = (db: Db, r: Rng) => Date.parse(windowStarts(db).hour) + WINDOWS.hour + r.range(-3 * 3600_000, 3 * 3600_000)

describe('aggregates', () => {
  it(`equal a from-scratch computation after every few random steps (seed ${seed}, ${cases} steps)`, () => {
    const now = Date.now()
    const r = rng(seed)
    const d = new Driver(newDb('live'), r, now)
    const log: string[] = []
    for (let i = 1; i <= cases; i++) {
      log.push(d.step())
      if (i % 10 !== 0 && i !== cases) continue
      const where = `seed ${seed}, step ${i}: ${log.slice(-10).join(', ')}`
      expect(dumpAggregates(d.db), where).toEqual(expectedAggregates(d.db))
      const t = readTime(d.db, r)
      expect(modelActivity(d.db, t).models, where).toEqual(referenceActivity(d.db, t))
      const { overall, byProvider, byModel } = networkLatency(d.db, t)
      expect({ overall, byProvider, byModel }, where).toEqual(referenceLatency(d.db, t))
      expect({ directory: modelsDirectory(d.db, t), leaderboard: providerLeaderboard(d.db, t, 5) }, where).toEqual(referenceDirectory(d.db, t))
      for (const did of DIDS.slice(0, 3)) {
        const hidden = d.db.$client.prepare('SELECT 1 FROM accounts WHERE did = ? AND active = 0').get(did)
        if (hidden || accountTotals(d.db, did).recordCount === 0) continue
        expect(profileSeries(d.db, did, t), where).toEqual(referenceSeries(d.db, did, t))
      }
    }
    const live = dumpAggregates(d.db)
    // The run reached every kind of aggregate.
    for (const table of ['account_stats', 'account_weeks', 'friend_edges', 'friend_counts', 'model_activity', 'model_machines', 'latency_samples', 'latency_stats']) expect(live[table]!.length, table).toBeGreaterThan(2)

    // A rebuild from the records changes nothing.
    rebuildAggregates(d.db)
    expect(dumpAggregates(d.db)).toEqual(live)

    // The same records and accounts, written in another order into another database, windows where the first's stand.
    const other = newDb('replayed')
    const store = new IndexStore(other)
    const rows = d.db.$client.prepare('SELECT uri, did, collection, rkey, cid, body FROM records').all() as { uri: string; did: string; collection: string; rkey: string; cid: string; body: string }[]
    for (let i = rows.length - 1; i > 0; i--) {
      const j = r.int(i + 1)
      ;[rows[i], rows[j]] = [rows[j]!, rows[i]!]
    }
    const accounts = d.db.$client.prepare('SELECT did, handle, active, status FROM accounts').all() as { did: string; handle: string | null; active: number; status: string | null }[]
    // Half the account states before the records, half after.
    const half = accounts.length >> 1
    const setAccount = (a: (typeof accounts)[number]) => {
      store.setStatus(a.did, a.active === 1, a.status)
      store.setHandle(a.did, a.handle)
    }
    accounts.slice(0, half).forEach(setAccount)
    rows.forEach((x, i) => store.tx(() => store.applyCommit(x.did, String(i + 1).padStart(12, '0'), [{ action: 'create', ...x, record: JSON.parse(x.body) }])))
    accounts.slice(half).forEach(setAccount)
    const starts = windowStarts(d.db)
    advanceWindows(other, Date.parse(starts.hour) + WINDOWS.hour)
    expect(dumpAggregates(other)).toEqual(live)
  })

  it('the receipt_samples view reads times as Date.parse does, fraction digits and offsets included', () => {
    const db = newDb('times')
    const store = new IndexStore(db)
    const r = rng(seed ^ 0x5a5a)
    const did = DIDS[0]!
    const writes: RecordWrite[] = []
    for (let i = 0; i < 2000; i++) {
      const t = Date.now() - r.range(0, 400 * DAY)
      writes.push({
        action: 'create',
        uri: `at://${did}/${ids.ComputeReceipt}/t${i}`,
        did,
        collection: ids.ComputeReceipt,
        rkey: `t${i}`,
        cid: 'c',
        record: { $type: ids.ComputeReceipt, model: 'm', startedAt: stamp(r, t - r.range(0, 50_000_000)), completedAt: stamp(r, t) },
      })
    }
    store.tx(() => store.applyCommit(did, '1', writes))
    const rows = db.$client.prepare('SELECT s.ms, r.body FROM receipt_samples s JOIN records r ON r.uri = s.uri').all() as { ms: number | null; body: string }[]
    expect(rows).toHaveLength(2000)
    for (const row of rows) {
      const b = JSON.parse(row.body) as { startedAt: string; completedAt: string }
      expect(row.ms, `${b.startedAt} -> ${b.completedAt}`).toBe(Date.parse(b.completedAt) - Date.parse(b.startedAt))
    }
  })
})
