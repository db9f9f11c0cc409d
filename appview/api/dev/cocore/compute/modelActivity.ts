import { and, eq, gte, isNotNull, sql } from 'drizzle-orm'
import { records } from '../../../../../src/db/schema.ts'
import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeModelActivityOutput, ComputeModelActivityParams, DefsActivityWindows } from '../../../../../src/lexicon/generated/types.ts'
import { visible, type ApiContext } from '../../../util.ts'

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

/** Per-model request and token counts over the trailing hour/day/week/30 days, by completedAt. */
export default function modelActivity(ctx: ApiContext, _params: ComputeModelActivityParams): ComputeModelActivityOutput {
  const now = Date.now()
  const since = (w: Window) => new Date(now - WINDOWS[w]).toISOString()
  // Token fields are integers by the receipt lexicon; CAST guards the sums against odd values.
  const tokens = sql`(CAST(COALESCE(json_extract(${records.body}, '$.tokens.in'), 0) AS INTEGER) + CAST(COALESCE(json_extract(${records.body}, '$.tokens.out'), 0) AS INTEGER))`
  const reqs = (w: Window) => sql<number>`SUM(CASE WHEN ${records.sortAt} >= ${since(w)} THEN 1 ELSE 0 END)`.mapWith(Number)
  const toks = (w: Window) => sql<number>`SUM(CASE WHEN ${records.sortAt} >= ${since(w)} THEN ${tokens} ELSE 0 END)`.mapWith(Number)

  // One indexed range scan over the last 30 days of receipts, aggregated in SQL.
  const rows = ctx.db
    .select({
      model: records.model,
      provider: records.providerDid,
      hourRequests: reqs('hour'),
      hourTokens: toks('hour'),
      dayRequests: reqs('day'),
      dayTokens: toks('day'),
      weekRequests: reqs('week'),
      weekTokens: toks('week'),
      monthRequests: sql<number>`COUNT(*)`.mapWith(Number),
      monthTokens: sql<number>`SUM(${tokens})`.mapWith(Number),
    })
    .from(records)
    .where(and(eq(records.collection, ids.ComputeReceipt), gte(records.sortAt, since('month')), isNotNull(records.model), visible()))
    .groupBy(records.model, records.providerDid)
    .all()

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
