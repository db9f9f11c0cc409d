/**
 * The index as text, for benchmarks that check a faster path against a
 * reference: every row that does not depend on when it was written (record
 * rows without `indexed_at`, accounts, repos' sync state, rejection counts
 * without their last time), ordered by key.
 */
import type { Db } from '../src/db/index.ts'

export function indexState(db: Db, opts: { cursors?: boolean } = {}): string {
  const c = db.$client
  const q = (sql: string) => c.prepare(sql).all().map((r) => JSON.stringify(r))
  return [
    ...q('SELECT * FROM records ORDER BY uri').map((r) => r.replace(/"indexed_at":"[^"]*",?/, '')),
    ...q('SELECT * FROM accounts ORDER BY did'),
    ...q('SELECT * FROM repos ORDER BY did'),
    ...(opts.cursors ? q('SELECT * FROM cursors ORDER BY source') : []),
    ...q('SELECT reason, collection, count FROM rejections ORDER BY reason, collection'),
  ].join('\n')
}

/** The first lines where two index states differ (at most 10). */
export function diffLines(a: string, b: string): string {
  const [x, y] = [a.split('\n'), b.split('\n')]
  const out: string[] = []
  for (let i = 0; i < Math.max(x.length, y.length) && out.length < 10; i++) if (x[i] !== y[i]) out.push(`- ${x[i] ?? ''}\n+ ${y[i] ?? ''}`)
  return out.join('\n')
}
