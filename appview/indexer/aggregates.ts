/**
 * The aggregates' upkeep besides row changes (which the triggers of migration
 * 0007 apply in the transaction of each write): moving the trailing windows
 * of receipts forward, rebuilding every aggregate from `records`, and keeping
 * the planner's statistics current.
 *
 * A window's counters hold the receipts with `sort_at` at or after its start
 * (`activity_windows.at`). Moving it subtracts the receipts it passes (or adds
 * them back if the clock went back), so its cost is the receipts of the time
 * moved over, never the window's. Reads are exact between two moves: they
 * correct for the receipts between the stored start and their own
 * (appview/api/aggregates.ts).
 */
import type { Db } from '../../src/db/index.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'

const HOUR_MS = 3600_000
/** The trailing windows, by their name in `activity_windows` and `model_activity`'s columns. */
export const WINDOWS = { hour: HOUR_MS, day: 24 * HOUR_MS, week: 7 * 24 * HOUR_MS, month: 30 * 24 * HOUR_MS } as const
export type WindowName = keyof typeof WINDOWS
export const WINDOW_NAMES = Object.keys(WINDOWS) as WindowName[]
/** The latency statistics cover the week window. */
export const LATENCY_WINDOW: WindowName = 'week'

/** A receipt's tokens (in + out), as the triggers count them. */
export const RECEIPT_TOKENS = `(CAST(COALESCE(json_extract(body, '$.tokens.in'), 0) AS INTEGER) + CAST(COALESCE(json_extract(body, '$.tokens.out'), 0) AS INTEGER))`

/** Where each window starts now, as stored. */
export function windowStarts(db: Db): Record<WindowName, string> {
  const rows = db.$client.prepare('SELECT name, at FROM activity_windows').all() as { name: WindowName; at: string }[]
  return Object.fromEntries(rows.map((r) => [r.name, r.at])) as Record<WindowName, string>
}

/**
 * The receipts naming a model with `sort_at` in [from, to), per model and
 * provider: what a window gains or loses between two starts.
 */
export const RECEIPTS_BETWEEN = `SELECT model, did AS provider, COUNT(*) AS n, SUM(${RECEIPT_TOKENS}) AS tokens
  FROM records WHERE collection = '${ids.ComputeReceipt}' AND model IS NOT NULL AND sort_at >= ? AND sort_at < ? GROUP BY model, did`

/**
 * Moves every window to end at `now`: one transaction; a no-op for a window
 * already there. Returns the receipts moved over (for the caller's logs).
 */
export function advanceWindows(db: Db, now: number): number {
  const c = db.$client
  let moved = 0
  c.transaction(() => {
    const starts = windowStarts(db)
    for (const name of WINDOW_NAMES) {
      const to = new Date(now - WINDOWS[name]).toISOString()
      const from = starts[name]
      if (from === undefined || to === from) continue
      const [lo, hi, sign] = to > from ? [from, to, -1] : [to, from, 1]
      moved += c
        .prepare(
          `UPDATE model_activity SET ${name}_requests = ${name}_requests + ? * d.n, ${name}_tokens = ${name}_tokens + ? * d.tokens
          FROM (${RECEIPTS_BETWEEN}) d WHERE model_activity.model = d.model AND model_activity.provider = d.provider`,
        )
        .run(sign, sign, lo, hi).changes
      if (name === LATENCY_WINDOW) {
        // The samples' own triggers keep the histograms and percentiles.
        if (sign < 0) c.prepare('DELETE FROM latency_samples WHERE sort_at >= ? AND sort_at < ?').run(lo, hi)
        else
          c.prepare(
            `INSERT INTO latency_samples (uri, provider, model, sort_at, ms, bucket)
            SELECT uri, provider, model, sort_at, ms, bucket FROM receipt_samples
            WHERE sort_at >= ? AND sort_at < ? AND ms >= 0 AND provider NOT IN (SELECT did FROM accounts WHERE active = 0)`,
          ).run(lo, hi)
      }
      c.prepare('UPDATE activity_windows SET at = ? WHERE name = ?').run(to, name)
    }
  })()
  return moved
}

/** Every table the triggers keep. @NOTE Order matters here: a table whose own triggers write into others comes before them. */
const AGGREGATE_TABLES = ['latency_samples', 'friend_edges', 'latency_stats', 'latency_hist', 'model_machines', 'model_activity', 'index_counts', 'friend_counts', 'account_weeks', 'account_stats', 'account_collections']

/**
 * Rebuilds every aggregate from `records` and `accounts`, with the windows
 * where they stand: what the triggers would have made of the rows written in
 * any order. For an index whose aggregate tables are suspect (restored from
 * a copy, edited by hand); writes through the store never need it.
 */
export function rebuildAggregates(db: Db): void {
  const c = db.$client
  c.transaction(() => {
    for (const table of AGGREGATE_TABLES) c.prepare(`DELETE FROM ${table}`).run()
    c.prepare('INSERT INTO record_changes SELECT 1, uri, did, collection, rkey, sort_at, model, subject_did, body FROM records').run()
  })()
}

/**
 * Planner statistics: `PRAGMA optimize` analyses the tables whose statistics
 * are missing or stale (a few thousand rows sampled per index, so it stays
 * quick on a large index). At open, and then from time to time as the index
 * grows; without statistics SQLite misjudges which index narrows a query.
 */
export function optimizePlanner(db: Db, opening = false): void {
  const c = db.$client
  c.pragma('analysis_limit = 2000')
  // 0x10002 at open: every table is checked, not only those the connection has queried.
  c.pragma(opening ? 'optimize = 0x10002' : 'optimize')
}

export interface UpkeepOpts {
  /** How often the windows move; default 1 s. */
  windowsEveryMs?: number
  /** How often planner statistics are refreshed; default an hour. */
  optimizeEveryMs?: number
  onError?: (err: unknown) => void
}

/**
 * Runs the upkeep on timers until stopped: statistics at once, then the
 * windows every second and statistics every hour. Timers do not hold the
 * process open.
 */
export function startUpkeep(db: Db, opts: UpkeepOpts = {}): { stop(): void } {
  const guard = (fn: () => void) => () => {
    try {
      fn()
    } catch (err) {
      opts.onError?.(err)
    }
  }
  guard(() => optimizePlanner(db, true))()
  guard(() => advanceWindows(db, Date.now()))()
  const timers = [
    setInterval(guard(() => advanceWindows(db, Date.now())), opts.windowsEveryMs ?? 1000),
    setInterval(guard(() => optimizePlanner(db)), opts.optimizeEveryMs ?? 3600_000),
  ]
  for (const t of timers) t.unref()
  return { stop: () => timers.forEach(clearInterval) }
}
