import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeLatencyOutput, ComputeLatencyParams } from '../../../../../src/lexicon/generated/types.ts'
import { statement, visible, type ApiContext } from '../../../util.ts'

const WINDOW_MS = 7 * 24 * 3600_000
/** Receipts read at most: the newest ones of the window, via the (collection, sort_at, uri) index. */
const MAX_ROWS = 5000

export interface LatencyStats {
  sampleCount: number
  p50Ms: number | null
  p95Ms: number | null
  avgMs: number | null
  lastMs: number | null
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

/** A receipt's latency in ms (completedAt - startedAt), or null when either time is missing or they are out of order. */
export function latencySample(startedAt: unknown, completedAt: unknown): number | null {
  if (typeof startedAt !== 'string' || typeof completedAt !== 'string') return null
  const ms = Date.parse(completedAt) - Date.parse(startedAt)
  return Number.isFinite(ms) && ms >= 0 ? ms : null
}

function grouped(groups: Map<string, number[]>) {
  return [...groups.entries()].map(([key, samples]) => ({ key, stats: latencyStats(samples) })).sort((a, b) => b.stats.sampleCount - a.stats.sampleCount || (a.key < b.key ? -1 : a.key > b.key ? 1 : 0))
}

/** Latency (completedAt - startedAt) of receipts completed in the last 7 days. */
export default function latency(ctx: ApiContext, _params: ComputeLatencyParams): ComputeLatencyOutput {
  const now = Date.now()
  const rows = statement(
    ctx.db,
    `SELECT provider_did AS provider, model, json_extract(body, '$.startedAt') AS startedAt, json_extract(body, '$.completedAt') AS completedAt
    FROM records WHERE collection = ? AND sort_at >= ? AND ${visible()}
    ORDER BY sort_at DESC, uri DESC LIMIT ?`,
  ).all(ids.ComputeReceipt, new Date(now - WINDOW_MS).toISOString(), MAX_ROWS) as { provider: string | null; model: string | null; startedAt: unknown; completedAt: unknown }[]

  const overall: number[] = []
  const byProvider = new Map<string, number[]>()
  const byModel = new Map<string, number[]>()
  const push = (m: Map<string, number[]>, key: string | null, v: number) => {
    if (key === null) return
    const list = m.get(key)
    if (list) list.push(v)
    else m.set(key, [v])
  }
  for (const row of rows) {
    const ms = latencySample(row.startedAt, row.completedAt)
    if (ms === null) continue
    overall.push(ms)
    push(byProvider, row.provider, ms)
    push(byModel, row.model, ms)
  }

  const out = {
    overall: latencyStats(overall),
    byProvider: grouped(byProvider).map(({ key, stats }) => ({ did: key, stats })),
    byModel: grouped(byModel).map(({ key, stats }) => ({ modelId: key, stats })),
    generatedAt: new Date(now).toISOString(),
  }
  return out
}
