/**
 * Per-account aggregates of the read API (the directory of listAccounts, the
 * counts, series and latency of getProfile), computed from `records` on each
 * call. Each of getProfile's queries is a range of one index: the account's
 * rows in (did, collection, sort_at, uri), or the rows naming it in
 * (collection, subject_did, sort_at, uri), never a network-wide range
 * (test/read-api.test.ts checks the plans); the directory is one pass over
 * an index for all accounts. Their cost still grows with the rows read, so
 * tables kept up to date by the indexer are meant to replace this module,
 * behind these same exports.
 *
 * Times are the records' own (`sort_at`: createdAt, completedAt...), not the
 * time this AppView indexed them: a backfilled AppView answers as one that
 * saw every record live, and two AppViews agree.
 */
import { ids } from '../../src/lexicon/generated/ids.ts'
import type { AccountGetProfileLatencyStats, AccountGetProfileWeekSeries } from '../../src/lexicon/generated/types.ts'
import type { Db } from '../../src/db/index.ts'
import { latencySample, latencyStats } from './dev/cocore/compute/latency.ts'
import { RECEIPT_TOKENS, statement, visible } from './util.ts'

const DAY_MS = 24 * 3600_000
const WEEK_MS = 7 * DAY_MS
const WEEKS = 52
/** Receipts the profile's latency is computed over, newest first (the reference's window). */
const LATENCY_RECEIPTS = 100

/**
 * Per visible DID with at least one record: the time of its newest record
 * (`last_at`), of its oldest dated record (`joined_at`, NULL when none is
 * dated: attestations carry no time), and its provider count. One pass over
 * the (did, collection, sort_at, uri) index, every account: the directory
 * has no cheaper source until the indexer keeps these per account.
 */
export const ACCOUNT_DIRECTORY = `
  SELECT did, MAX(sort_at) AS last_at, MIN(NULLIF(sort_at, '')) AS joined_at, SUM(collection = ?) AS provider_count
  FROM records WHERE ${visible()} GROUP BY did`
/** The values ACCOUNT_DIRECTORY binds, in order. */
export const ACCOUNT_DIRECTORY_PARAMS: readonly string[] = [ids.ComputeProvider]

export interface AccountTotals {
  /** The account's oldest dated record, newest record; null when none is dated. */
  joinedAt: string | null
  lastActivityAt: string | null
  jobCount: number
  receiptCount: number
  /** Records of every collection: 0 means the account has left nothing on the network. */
  recordCount: number
}

/** Counts and first/last times of one account's records, from its range of the (did, collection, sort_at) index. */
export function accountTotals(db: Db, did: string): AccountTotals {
  const rows = statement(db, `SELECT collection, COUNT(*) AS n, MIN(NULLIF(sort_at, '')) AS first, MAX(sort_at) AS last FROM records WHERE did = ? AND ${visible()} GROUP BY collection`).all(did) as {
    collection: string
    n: number
    first: string | null
    last: string
  }[]
  const out: AccountTotals = { joinedAt: null, lastActivityAt: null, jobCount: 0, receiptCount: 0, recordCount: 0 }
  for (const r of rows) {
    out.recordCount += r.n
    if (r.collection === ids.ComputeJob) out.jobCount = r.n
    if (r.collection === ids.ComputeReceipt) out.receiptCount = r.n
    if (r.first !== null && (out.joinedAt === null || r.first < out.joinedAt)) out.joinedAt = r.first
    if (r.last !== '' && (out.lastActivityAt === null || r.last > out.lastActivityAt)) out.lastActivityAt = r.last
  }
  return out
}

/** The 52 week boundaries ending with the current UTC week (weeks start on Monday). */
function weekWindow(now: number): { oldestWeekStart: string; start: string; end: string } {
  const midnight = Math.floor(now / DAY_MS) * DAY_MS
  const sinceMonday = (new Date(midnight).getUTCDay() + 6) % 7
  const currentMonday = midnight - sinceMonday * DAY_MS
  const oldest = currentMonday - (WEEKS - 1) * WEEK_MS
  const start = new Date(oldest).toISOString()
  return { oldestWeekStart: start.slice(0, 10), start, end: new Date(currentMonday + WEEK_MS).toISOString() }
}

/**
 * The week (0 = the oldest) of a normalized `sort_at`, in SQL: whole days
 * from the UTC date part, so exact at every boundary. Binds: oldestWeekStart.
 */
const weekOf = (column: string) => `(CAST(julianday(substr(${column}, 1, 10)) - julianday(?) AS INTEGER) / 7)`

/**
 * One account's records of one collection per week of the window, with their
 * tokens for receipts. Binds: oldestWeekStart, did, collection, start, end.
 * @NOTE One collection per statement: with `collection IN (...)` SQLite
 * prefers the network-wide (collection, sort_at) range over the account's.
 */
const ownWeeks = (tokens: boolean) => `
  SELECT ${weekOf('sort_at')} AS week, COUNT(*) AS n${tokens ? `, SUM(${RECEIPT_TOKENS}) AS tokens` : ''}
  FROM records WHERE did = ? AND collection = ? AND sort_at >= ? AND sort_at < ?
  GROUP BY week`
const OWN_WEEKS = ownWeeks(false)
const OWN_WEEKS_TOKENS = ownWeeks(true)

/**
 * Accounts that friended `did`, each once, at its first friend record naming
 * it: counted per week of the window (week -1: before it, or after). Hidden
 * frienders are left out, as listIncomingFriends leaves them out.
 * @NOTE `+did`: grouping by the bare column makes SQLite walk every friend
 * record of the network in the (collection, did, subject_did) index for its
 * order; the unary plus keeps it on this account's range of records_subject.
 */
const FRIENDS_WEEKS = `
  WITH firsts AS (
    SELECT MIN(sort_at) AS first FROM records WHERE collection = ? AND subject_did = ? AND ${visible()} GROUP BY +did
  )
  SELECT CASE WHEN first >= ? AND first < ? THEN ${weekOf('first')} ELSE -1 END AS week, COUNT(*) AS n
  FROM firsts GROUP BY week`

export interface ProfileSeries {
  weekSeries: AccountGetProfileWeekSeries
  /** Distinct accounts with a friend record naming this one (the series' trust, all time). */
  incomingFriendsCount: number
}

/** One account's 52-week activity series and its incoming friends count. */
export function profileSeries(db: Db, did: string, now: number): ProfileSeries {
  const { oldestWeekStart, start, end } = weekWindow(now)
  const zeros = () => Array.from({ length: WEEKS }, () => 0)
  const series: AccountGetProfileWeekSeries = {
    oldestWeekStart,
    jobsDispatched: zeros(),
    receiptsServed: zeros(),
    machinesIndexedCumulative: zeros(),
    tokensIndexed: zeros(),
    trustedByNew: zeros(),
  }
  type WeekRow = { week: number; n: number; tokens?: number }
  const weeks = (collection: string) => statement(db, collection === ids.ComputeReceipt ? OWN_WEEKS_TOKENS : OWN_WEEKS).all(oldestWeekStart, did, collection, start, end) as WeekRow[]
  const inWindow = (r: WeekRow) => r.week >= 0 && r.week < WEEKS
  for (const r of weeks(ids.ComputeJob).filter(inWindow)) series.jobsDispatched[r.week] = r.n
  for (const r of weeks(ids.ComputeReceipt).filter(inWindow)) {
    series.receiptsServed[r.week] = r.n
    series.tokensIndexed[r.week] = r.tokens ?? 0
  }
  const newMachines = zeros()
  for (const r of weeks(ids.ComputeProvider).filter(inWindow)) newMachines[r.week] = r.n
  // Machines dated before the window count from its first week on.
  let machines = statement(db, `SELECT COUNT(*) AS n FROM records WHERE did = ? AND collection = ? AND sort_at < ?`).pluck().get(did, ids.ComputeProvider, start) as number
  for (let w = 0; w < WEEKS; w++) series.machinesIndexedCumulative[w] = machines += newMachines[w]!

  let incomingFriendsCount = 0
  const friends = statement(db, FRIENDS_WEEKS).all(ids.AccountFriend, did, start, end, oldestWeekStart) as { week: number; n: number }[]
  for (const r of friends) {
    incomingFriendsCount += r.n
    if (r.week >= 0 && r.week < WEEKS) series.trustedByNew[r.week] = r.n
  }
  return { weekSeries: series, incomingFriendsCount }
}

/** Latency over the account's newest receipts (as a provider), from its range of the (did, collection, sort_at) index. */
export function receiptLatency(db: Db, did: string): AccountGetProfileLatencyStats {
  const rows = statement(
    db,
    `SELECT json_extract(body, '$.startedAt') AS startedAt, json_extract(body, '$.completedAt') AS completedAt
    FROM records WHERE did = ? AND collection = ? ORDER BY sort_at DESC, uri DESC LIMIT ?`,
  ).all(did, ids.ComputeReceipt, LATENCY_RECEIPTS) as { startedAt: unknown; completedAt: unknown }[]
  const samples: number[] = []
  for (const r of rows) {
    const ms = latencySample(r.startedAt, r.completedAt)
    if (ms !== null) samples.push(ms)
  }
  return latencyStats(samples)
}
