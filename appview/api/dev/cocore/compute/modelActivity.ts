import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeModelActivityOutput, ComputeModelActivityParams, DefsActivityWindows } from '../../../../../src/lexicon/generated/types.ts'
import { RECEIPT_TOKENS, statement, visible, type ApiContext } from '../../../util.ts'

const HOUR = 3600_000
const WINDOWS = { hour: HOUR, day: 24 * HOUR, week: 7 * 24 * HOUR, month: 30 * 24 * HOUR } as const
type Window = keyof typeof WINDOWS

const emptyWindows = (): DefsActivityWindows => ({
  hour: { requests: 0, tokens: 0 },
  day: { requests: 0, tokens: 0 },
  week: { requests: 0, tokens: 0 },
  month: { requests: 0, tokens: 0 },
})

const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0)

const reqs = `SUM(CASE WHEN sort_at >= ? THEN 1 ELSE 0 END)`
const toks = `SUM(CASE WHEN sort_at >= ? THEN tokens ELSE 0 END)`
/**
 * One indexed range scan over the last 30 days of receipts, aggregated in SQL.
 * MATERIALIZED: each body's tokens are read from its JSON once, not once per
 * window (parsing the bodies is most of this query's time).
 */
const ACTIVITY = `
  WITH r AS MATERIALIZED (
    SELECT model, provider_did, sort_at, ${RECEIPT_TOKENS} AS tokens FROM records
    WHERE collection = ? AND sort_at >= ? AND model IS NOT NULL AND ${visible()}
  )
  SELECT model, provider_did AS provider,
    ${reqs} AS hourRequests, ${toks} AS hourTokens,
    ${reqs} AS dayRequests, ${toks} AS dayTokens,
    ${reqs} AS weekRequests, ${toks} AS weekTokens,
    COUNT(*) AS monthRequests, SUM(tokens) AS monthTokens
  FROM r GROUP BY model, provider_did`

interface Row {
  model: string | null
  provider: string | null
  hourRequests: number
  hourTokens: number
  dayRequests: number
  dayTokens: number
  weekRequests: number
  weekTokens: number
  monthRequests: number
  monthTokens: number
}

/** Per-model request and token counts over the trailing hour/day/week/30 days, by completedAt. */
export default function modelActivity(ctx: ApiContext, _params: ComputeModelActivityParams): ComputeModelActivityOutput {
  const now = Date.now()
  const since = (w: Window) => new Date(now - WINDOWS[w]).toISOString()
  const rows = statement(ctx.db, ACTIVITY).all(ids.ComputeReceipt, since('month'), since('hour'), since('hour'), since('day'), since('day'), since('week'), since('week')) as Row[]

  const models = new Map<string, { modelId: string; totals: DefsActivityWindows; byProvider: { did: string; stats: DefsActivityWindows }[] }>()
  for (const r of rows) {
    if (r.model === null) continue
    const stats: DefsActivityWindows = {
      hour: { requests: r.hourRequests, tokens: r.hourTokens },
      day: { requests: r.dayRequests, tokens: r.dayTokens },
      week: { requests: r.weekRequests, tokens: r.weekTokens },
      month: { requests: r.monthRequests, tokens: r.monthTokens },
    }
    let m = models.get(r.model)
    if (!m) models.set(r.model, (m = { modelId: r.model, totals: emptyWindows(), byProvider: [] }))
    for (const w of Object.keys(WINDOWS) as Window[]) {
      m.totals[w].requests += stats[w].requests
      m.totals[w].tokens += stats[w].tokens
    }
    if (r.provider !== null) m.byProvider.push({ did: r.provider, stats })
  }

  const list = [...models.values()].sort((a, b) => b.totals.month.requests - a.totals.month.requests || cmp(a.modelId, b.modelId))
  for (const m of list) m.byProvider.sort((a, b) => b.stats.month.requests - a.stats.month.requests || cmp(a.did, b.did))
  return { generatedAt: new Date(now).toISOString(), models: list }
}
