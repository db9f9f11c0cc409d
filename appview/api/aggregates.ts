/**
 * The read API's aggregates, read from the tables the indexer keeps (the
 * triggers of migration 0007, appview/indexer/aggregates.ts): an account's
 * counts and 52-week series, the network's model activity and latency, the
 * models directory and the provider leaderboard. Each read is a few index
 * lookups, or one row per account, model or provider it answers with: never
 * a pass over the records it summarises.
 *
 * Times are the records' own (`sort_at`: createdAt, completedAt...), not the
 * time this AppView indexed them: a backfilled AppView answers as one that
 * saw every record live, and two AppViews agree.
 *
 * Trailing windows mean what they say: the stored counters hold the receipts
 * since the window's stored start, and a read adds or takes away the few
 * receipts between that start and its own (the indexer moves the starts
 * every second).
 */
import type { Db } from '../../src/db/index.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import type { AccountGetProfileLatencyStats, AccountGetProfileWeekSeries, ComputeLatencyOutput, ComputeModelActivityOutput, DefsActivityWindows } from '../../src/lexicon/generated/types.ts'
import { LATENCY_WINDOW, RECEIPTS_BETWEEN, WINDOW_NAMES, WINDOWS, windowStarts, type WindowName } from '../indexer/aggregates.ts'
import { statement } from './util.ts'

const DAY_MS = 24 * 3600_000
const WEEK_MS = 7 * DAY_MS
const WEEKS = 52
/** Receipts the profile's latency is computed over, newest first (the reference's window). */
const LATENCY_RECEIPTS = 100
const HIDDEN = 'SELECT did FROM accounts WHERE active = 0'

const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0)

/** Reads `fn` sees as one snapshot (another process may be writing between its statements). */
function snapshot<T>(db: Db, fn: () => T): T {
  if (db.$client.inTransaction) return fn()
  statement(db, 'BEGIN').run()
  try {
    const out = fn()
    statement(db, 'COMMIT').run()
    return out
  } catch (err) {
    if (db.$client.inTransaction) statement(db, 'ROLLBACK').run()
    throw err
  }
}

// ---- one account ----------------------------------------------------------------------------

export interface AccountTotals {
  /** The account's oldest dated record, newest record; null when none is dated. */
  joinedAt: string | null
  lastActivityAt: string | null
  jobCount: number
  receiptCount: number
  /** Records of every collection: 0 means the account has left nothing visible on the network. */
  recordCount: number
}

/** Counts and first/last times of one visible account's records. */
export function accountTotals(db: Db, did: string): AccountTotals {
  const row = statement(db, 'SELECT records, jobs, receipts, joined_at AS joinedAt, last_at AS lastAt FROM account_stats WHERE did = ? AND hidden = 0').get(did) as
    | { records: number; jobs: number; receipts: number; joinedAt: string; lastAt: string }
    | undefined
  if (!row) return { joinedAt: null, lastActivityAt: null, jobCount: 0, receiptCount: 0, recordCount: 0 }
  return { joinedAt: row.joinedAt || null, lastActivityAt: row.lastAt || null, jobCount: row.jobs, receiptCount: row.receipts, recordCount: row.records }
}

/** The 52 weeks ending with the current UTC week (weeks start on Monday), as the dates of their Mondays. */
function weekWindow(now: number): { oldestWeekStart: string; currentWeekStart: string; oldest: number } {
  const midnight = Math.floor(now / DAY_MS) * DAY_MS
  const sinceMonday = (new Date(midnight).getUTCDay() + 6) % 7
  const currentMonday = midnight - sinceMonday * DAY_MS
  const oldest = currentMonday - (WEEKS - 1) * WEEK_MS
  const day = (t: number) => new Date(t).toISOString().slice(0, 10)
  return { oldestWeekStart: day(oldest), currentWeekStart: day(currentMonday), oldest }
}

export interface ProfileSeries {
  weekSeries: AccountGetProfileWeekSeries
  /** Visible accounts with a friend record naming this one (the series' trust, all time). */
  incomingFriendsCount: number
}

/** One account's 52-week activity series and its incoming friends count: at most 52 rows of its weeks. */
export function profileSeries(db: Db, did: string, now: number): ProfileSeries {
  const { oldestWeekStart, currentWeekStart, oldest } = weekWindow(now)
  const zeros = () => Array.from({ length: WEEKS }, () => 0)
  const series: AccountGetProfileWeekSeries = {
    oldestWeekStart,
    jobsDispatched: zeros(),
    receiptsServed: zeros(),
    machinesIndexedCumulative: zeros(),
    tokensIndexed: zeros(),
    trustedByNew: zeros(),
  }
  return snapshot(db, () => {
    const rows = statement(db, 'SELECT week, jobs, receipts, tokens, machines, trusted FROM account_weeks WHERE did = ? AND week >= ? AND week <= ?').all(did, oldestWeekStart, currentWeekStart) as {
      week: string
      jobs: number
      receipts: number
      tokens: number
      machines: number
      trusted: number
    }[]
    const newMachines = zeros()
    for (const r of rows) {
      const w = Math.round((Date.parse(`${r.week}T00:00:00Z`) - oldest) / WEEK_MS)
      series.jobsDispatched[w] = r.jobs
      series.receiptsServed[w] = r.receipts
      series.tokensIndexed[w] = r.tokens
      series.trustedByNew[w] = r.trusted
      newMachines[w] = r.machines
    }
    // Machines dated before the window (or undated: week '') count from its first week on.
    let machines = statement(db, 'SELECT COALESCE(SUM(machines), 0) FROM account_weeks WHERE did = ? AND week < ?').pluck().get(did, oldestWeekStart) as number
    for (let w = 0; w < WEEKS; w++) series.machinesIndexedCumulative[w] = machines += newMachines[w]!
    const incomingFriendsCount = (statement(db, 'SELECT n FROM friend_counts WHERE subject = ?').pluck().get(did) as number | undefined) ?? 0
    return { weekSeries: series, incomingFriendsCount }
  })
}

// ---- latency --------------------------------------------------------------------------------

export type LatencyStats = AccountGetProfileLatencyStats

/** A receipt's latency in ms (completedAt - startedAt), or null when either time is missing or they are out of order. */
export function latencySample(startedAt: unknown, completedAt: unknown): number | null {
  if (typeof startedAt !== 'string' || typeof completedAt !== 'string') return null
  const ms = Date.parse(completedAt) - Date.parse(startedAt)
  return Number.isFinite(ms) && ms >= 0 ? ms : null
}

/** Stats of samples given newest first; nearest-rank percentiles. */
export function latencyStats(newestFirst: number[]): LatencyStats {
  const n = newestFirst.length
  if (n === 0) return { sampleCount: 0, p50Ms: null, p95Ms: null, avgMs: null, lastMs: null }
  const sorted = [...newestFirst].sort((a, b) => a - b)
  const rank = (p: number) => sorted[Math.max(0, Math.ceil((p / 100) * n) - 1)]!
  return {
    sampleCount: n,
    p50Ms: rank(50),
    p95Ms: rank(95),
    avgMs: Math.round(sorted.reduce((s, v) => s + v, 0) / n),
    lastMs: newestFirst[0]!,
  }
}

/**
 * The histogram bucket of a latency (the value to three significant digits:
 * exact below 1 s, within 0.5% above), as the `receipt_samples` view computes
 * it: the percentiles the network's latency reports are these.
 */
export function latencyBucket(ms: number): number {
  if (ms < 1000) return ms
  const unit = 10 ** (Math.floor(Math.log10(ms)) - 2)
  return Math.floor((ms + unit / 2) / unit) * unit
}

/**
 * Latency over the account's newest receipts (as a provider), from its range
 * of the (did, collection, sort_at, uri) index, named: with planner statistics
 * SQLite took records_edges and sorted every receipt of a busy provider.
 */
export function receiptLatency(db: Db, did: string): LatencyStats {
  const rows = statement(
    db,
    `SELECT json_extract(body, '$.startedAt') AS startedAt, json_extract(body, '$.completedAt') AS completedAt
    FROM records INDEXED BY records_did_collection WHERE did = ? AND collection = ? ORDER BY sort_at DESC, uri DESC LIMIT ?`,
  ).all(did, ids.ComputeReceipt, LATENCY_RECEIPTS) as { startedAt: unknown; completedAt: unknown }[]
  const samples: number[] = []
  for (const r of rows) {
    const ms = latencySample(r.startedAt, r.completedAt)
    if (ms !== null) samples.push(ms)
  }
  return latencyStats(samples)
}

type ScopeKind = 'all' | 'provider' | 'model'
interface ScopeRow {
  kind: ScopeKind
  key: string
  n: number
  sum: number
  p50: number
  below50: number
  p95: number
  below95: number
  lastAt: string
  lastUri: string
  lastMs: number
}
interface Sample {
  provider: string
  model: string | null
  sortAt: string
  uri: string
  ms: number
  bucket: number
}

/**
 * The nearest-rank `p`th percentile of a scope's stored histogram plus
 * `delta` (samples per bucket to add, or remove when negative), for `total`
 * samples in all: from the stored percentile's bucket, one non-empty bucket
 * at a time, as far as the correction moves it (a few buckets).
 */
function correctedPercentile(db: Db, s: ScopeRow, p: 50 | 95, delta: Map<number, number>, total: number): number {
  const rank = Math.floor((p * total + 99) / 100)
  const hist = (op: '<' | '>' | '=', b: number) =>
    statement(db, `SELECT bucket, n FROM latency_hist WHERE kind = ? AND key = ? AND bucket ${op} ? ORDER BY bucket ${op === '<' ? 'DESC' : 'ASC'} LIMIT 1`).get(s.kind, s.key, b) as
      | { bucket: number; n: number }
      | undefined
  const count = (b: number) => (hist('=', b)?.n ?? 0) + (delta.get(b) ?? 0)
  const keys = [...delta.keys()]
  let bucket = p === 50 ? s.p50 : s.p95
  let below = (p === 50 ? s.below50 : s.below95) + keys.reduce((sum, b) => sum + (b < bucket ? delta.get(b)! : 0), 0)
  for (;;) {
    const here = count(bucket)
    if (below >= rank) {
      const prev = Math.max(hist('<', bucket)?.bucket ?? -Infinity, ...keys.filter((b) => b < bucket))
      if (prev === -Infinity) throw new Error(`latency histogram of ${s.kind} ${s.key} holds fewer samples than its stats count`)
      below -= count(prev)
      bucket = prev
    } else if (below + here < rank) {
      below += here
      const next = Math.min(hist('>', bucket)?.bucket ?? Infinity, ...keys.filter((b) => b > bucket))
      if (next === Infinity) throw new Error(`latency histogram of ${s.kind} ${s.key} holds fewer samples than its stats count`)
      bucket = next
    } else return bucket
  }
}

/** A scope's stats with `samples` added (sign 1, all older than its stored ones) or removed (-1, each one of its stored ones). */
function correctedScope(db: Db, stored: ScopeRow | undefined, samples: Sample[], sign: 1 | -1): LatencyStats {
  const n = (stored?.n ?? 0) + sign * samples.length
  if (n <= 0) return latencyStats([])
  if (!stored) {
    const newestFirst = [...samples].sort((a, b) => cmp(b.sortAt, a.sortAt) || cmp(b.uri, a.uri))
    const stats = latencyStats(newestFirst.map((x) => x.bucket))
    return { ...stats, avgMs: Math.round(samples.reduce((t, x) => t + x.ms, 0) / n), lastMs: newestFirst[0]!.ms }
  }
  const delta = new Map<number, number>()
  for (const x of samples) delta.set(x.bucket, (delta.get(x.bucket) ?? 0) + sign)
  return {
    sampleCount: n,
    p50Ms: correctedPercentile(db, stored, 50, delta, n),
    p95Ms: correctedPercentile(db, stored, 95, delta, n),
    avgMs: Math.round((stored.sum + sign * samples.reduce((t, x) => t + x.ms, 0)) / n),
    // Added samples are older than the stored ones; removed ones never include the newest while any is left.
    lastMs: stored.lastMs,
  }
}

const storedStats = (s: ScopeRow): LatencyStats => ({ sampleCount: s.n, p50Ms: s.p50, p95Ms: s.p95, avgMs: Math.round(s.sum / s.n), lastMs: s.lastMs })

/**
 * Latency (completedAt - startedAt) of the receipts completed in the last 7
 * days, of visible providers: overall, by provider and by model, each with
 * its sample count, nearest-rank p50 and p95 (to three significant digits:
 * exact below 1 s, within 0.5% above), mean and newest sample.
 */
export function networkLatency(db: Db, now: number): ComputeLatencyOutput {
  return snapshot(db, () => {
    const start = new Date(now - WINDOWS[LATENCY_WINDOW]).toISOString()
    const stored = windowStarts(db)[LATENCY_WINDOW]
    const rows = statement(
      db,
      'SELECT kind, key, n, sum, p50, below50, p95, below95, last_at AS lastAt, last_uri AS lastUri, last_ms AS lastMs FROM latency_stats',
    ).all() as ScopeRow[]
    const stats = new Map<string, { kind: ScopeKind; key: string; stats: LatencyStats }>()
    for (const r of rows) stats.set(`${r.kind} ${r.key}`, { kind: r.kind, key: r.key, stats: storedStats(r) })

    // Samples between the stored start and this read's: few (the start moves every second).
    const sign = start > stored ? -1 : 1
    const samples =
      start === stored
        ? []
        : ((sign < 0
            ? statement(db, 'SELECT provider, model, sort_at AS sortAt, uri, ms, bucket FROM latency_samples WHERE sort_at < ?').all(start)
            : statement(db, `SELECT provider, model, sort_at AS sortAt, uri, ms, bucket FROM receipt_samples WHERE sort_at >= ? AND sort_at < ? AND ms >= 0 AND provider NOT IN (${HIDDEN})`).all(start, stored)) as Sample[])
    if (samples.length) {
      const byScope = new Map<string, { kind: ScopeKind; key: string; samples: Sample[] }>()
      const add = (kind: ScopeKind, key: string, x: Sample) => {
        const id = `${kind} ${key}`
        const entry = byScope.get(id) ?? byScope.set(id, { kind, key, samples: [] }).get(id)!
        entry.samples.push(x)
      }
      for (const x of samples) {
        add('all', '', x)
        add('provider', x.provider, x)
        if (x.model !== null) add('model', x.model, x)
      }
      const byId = new Map(rows.map((r) => [`${r.kind} ${r.key}`, r]))
      for (const [id, { kind, key, samples: xs }] of byScope) {
        const s = correctedScope(db, byId.get(id), xs, sign)
        if (s.sampleCount === 0) stats.delete(id)
        else stats.set(id, { kind, key, stats: s })
      }
    }

    const group = (kind: ScopeKind) =>
      [...stats.values()].filter((s) => s.kind === kind).sort((a, b) => b.stats.sampleCount - a.stats.sampleCount || cmp(a.key, b.key))
    return {
      overall: stats.get('all ')?.stats ?? latencyStats([]),
      byProvider: group('provider').map(({ key, stats: s }) => ({ did: key, stats: s })),
      byModel: group('model').map(({ key, stats: s }) => ({ modelId: key, stats: s })),
      generatedAt: new Date(now).toISOString(),
    }
  })
}

// ---- model activity ---------------------------------------------------------------------------

export interface ActivityPair {
  model: string
  provider: string
  /** All time. */
  requests: number
  tokens: number
  windows: DefsActivityWindows
}

const emptyWindows = (): DefsActivityWindows => ({
  hour: { requests: 0, tokens: 0 },
  day: { requests: 0, tokens: 0 },
  week: { requests: 0, tokens: 0 },
  month: { requests: 0, tokens: 0 },
})

const ACTIVITY = `SELECT model, provider, requests, tokens, hour_requests AS hr, hour_tokens AS ht, day_requests AS dr, day_tokens AS dt,
    week_requests AS wr, week_tokens AS wt, month_requests AS mr, month_tokens AS mt
  FROM model_activity WHERE provider NOT IN (${HIDDEN})`
interface ActivityRow {
  model: string
  provider: string
  requests: number
  tokens: number
  hr: number
  ht: number
  dr: number
  dt: number
  wr: number
  wt: number
  mr: number
  mt: number
}

/**
 * Receipts naming a model, per model and visible provider: all time and in
 * each trailing window ending at `now`. One row per pair, plus the receipts
 * between each window's stored start and `now - length`.
 */
export function activityPairs(db: Db, now: number): ActivityPair[] {
  return snapshot(db, () => {
    const pairs = new Map<string, ActivityPair>()
    for (const r of statement(db, ACTIVITY).all() as ActivityRow[]) {
      const windows = { hour: { requests: r.hr, tokens: r.ht }, day: { requests: r.dr, tokens: r.dt }, week: { requests: r.wr, tokens: r.wt }, month: { requests: r.mr, tokens: r.mt } }
      pairs.set(`${r.model} ${r.provider}`, { model: r.model, provider: r.provider, requests: r.requests, tokens: r.tokens, windows })
    }
    const starts = windowStarts(db)
    for (const w of WINDOW_NAMES) {
      const start = new Date(now - WINDOWS[w]).toISOString()
      const stored = starts[w]
      if (start === stored) continue
      const [lo, hi, sign] = start > stored ? [stored, start, -1] : [start, stored, 1]
      for (const d of statement(db, `SELECT * FROM (${RECEIPTS_BETWEEN}) WHERE provider NOT IN (${HIDDEN})`).all(lo, hi) as { model: string; provider: string; n: number; tokens: number }[]) {
        // A pair with receipts in a window has receipts of all time: its row exists.
        const pair = pairs.get(`${d.model} ${d.provider}`)
        if (!pair) continue
        pair.windows[w].requests += sign * d.n
        pair.windows[w].tokens += sign * d.tokens
      }
    }
    return [...pairs.values()]
  })
}

/** Per-model request and token counts over the trailing hour/day/week/30 days (by completedAt), with the split by provider. */
export function modelActivity(db: Db, now: number): ComputeModelActivityOutput {
  const models = new Map<string, { modelId: string; totals: DefsActivityWindows; byProvider: { did: string; stats: DefsActivityWindows }[] }>()
  for (const p of activityPairs(db, now)) {
    if (p.windows.month.requests === 0) continue
    let m = models.get(p.model)
    if (!m) models.set(p.model, (m = { modelId: p.model, totals: emptyWindows(), byProvider: [] }))
    addWindows(m.totals, p.windows)
    m.byProvider.push({ did: p.provider, stats: p.windows })
  }
  const list = [...models.values()].sort((a, b) => b.totals.month.requests - a.totals.month.requests || cmp(a.modelId, b.modelId))
  for (const m of list) m.byProvider.sort((a, b) => b.stats.month.requests - a.stats.month.requests || cmp(a.did, b.did))
  return { generatedAt: new Date(now).toISOString(), models: list }
}

function addWindows(into: DefsActivityWindows, from: DefsActivityWindows): void {
  for (const w of WINDOW_NAMES as WindowName[]) {
    into[w].requests += from[w].requests
    into[w].tokens += from[w].tokens
  }
}

// ---- for the console: models directory, provider leaderboard ---------------------------------

export interface ModelDirectoryEntry {
  modelId: string
  /** Visible accounts with a machine (provider record) listing the model, and those machines. */
  providerCount: number
  machineCount: number
  /** Receipts naming the model and their tokens, all time. */
  requests: number
  tokens: number
  activity: DefsActivityWindows
}

/** Every model a visible machine offers or a receipt names, busiest first (30 days), then by machines, then id. */
export function modelsDirectory(db: Db, now: number): ModelDirectoryEntry[] {
  const entries = new Map<string, ModelDirectoryEntry>()
  const entry = (modelId: string) =>
    entries.get(modelId) ?? entries.set(modelId, { modelId, providerCount: 0, machineCount: 0, requests: 0, tokens: 0, activity: emptyWindows() }).get(modelId)!
  const offers = statement(db, `SELECT model, COUNT(*) AS providers, SUM(machines) AS machines FROM model_machines WHERE did NOT IN (${HIDDEN}) GROUP BY model`).all() as {
    model: string
    providers: number
    machines: number
  }[]
  for (const o of offers) Object.assign(entry(o.model), { providerCount: o.providers, machineCount: o.machines })
  for (const p of activityPairs(db, now)) {
    const e = entry(p.model)
    e.requests += p.requests
    e.tokens += p.tokens
    addWindows(e.activity, p.windows)
  }
  return [...entries.values()].sort((a, b) => b.activity.month.requests - a.activity.month.requests || b.machineCount - a.machineCount || cmp(a.modelId, b.modelId))
}

export interface LeaderboardEntry {
  did: string
  handle: string | null
  /** Its machines (provider records). */
  machines: number
  /** Receipts naming a model it served, and their tokens, all time and per window. */
  requests: number
  tokens: number
  activity: DefsActivityWindows
}

/** The `limit` visible providers that served the most requests in the last 30 days (then tokens, then DID). */
export function providerLeaderboard(db: Db, now: number, limit = 100): LeaderboardEntry[] {
  const byProvider = new Map<string, Omit<LeaderboardEntry, 'handle' | 'machines'>>()
  for (const p of activityPairs(db, now)) {
    const e = byProvider.get(p.provider) ?? byProvider.set(p.provider, { did: p.provider, requests: 0, tokens: 0, activity: emptyWindows() }).get(p.provider)!
    e.requests += p.requests
    e.tokens += p.tokens
    addWindows(e.activity, p.windows)
  }
  const top = [...byProvider.values()]
    .sort((a, b) => b.activity.month.requests - a.activity.month.requests || b.activity.month.tokens - a.activity.month.tokens || cmp(a.did, b.did))
    .slice(0, limit)
  const account = statement(db, 'SELECT handle, machines FROM account_stats WHERE did = ?')
  return top.map((e) => {
    const a = account.get(e.did) as { handle: string | null; machines: number } | undefined
    return { did: e.did, handle: a?.handle ?? null, machines: a?.machines ?? 0, requests: e.requests, tokens: e.tokens, activity: e.activity }
  })
}
