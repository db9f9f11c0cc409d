/**
 * The exchange's publication outbox. A record the exchange decides to
 * publish (a settlement, a grant, a patronage credit) is written here in the
 * same SQLite transaction as the ledger movement it reports, with its rkey
 * already chosen; a worker then publishes it and marks it published. A
 * failure is retried with capped exponential backoff; a crash anywhere
 * resumes from the table; a publication whose answer was lost is rewritten
 * at the same rkey (same record, same CID), never added twice.
 */
import type { Db } from '../../src/db/index.ts'
import { consoleLogger as log } from '../../src/logger.ts'
import type { ExchangeRepo } from './repo.ts'

export interface OutboxRow {
  ref: string
  collection: string
  rkey: string
  record: Record<string, unknown>
  status: 'pending' | 'published'
  attempts: number
  lastError: string | null
  uri: string | null
  cid: string | null
}

export interface OutboxOpts {
  /** Backoff after a failed publication: first pause, doubled per failure, capped. */
  retry?: { firstMs: number; maxMs: number }
  /** Test hook: runs after a record is published and before it is marked so (a crash there is resumed). */
  afterPublish?: (ref: string) => void
}

export class Outbox {
  private readonly db: Db
  private readonly repo: Pick<ExchangeRepo, 'put' | 'did'>
  private readonly opts: OutboxOpts
  private timer: NodeJS.Timeout | null = null
  private running: Promise<void> | null = null
  private stopped = false

  constructor(db: Db, repo: Pick<ExchangeRepo, 'put' | 'did'>, opts: OutboxOpts = {}) {
    this.db = db
    this.repo = repo
    this.opts = opts
  }

  /** Adds a record to publish; inside the caller's transaction when there is one. False if `ref` is already queued. */
  enqueue(ref: string, collection: string, rkey: string, record: Record<string, unknown>): boolean {
    const now = new Date().toISOString()
    return (
      this.db.$client
        .prepare("INSERT INTO exchange_outbox (ref, collection, rkey, record, status, next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT (ref) DO NOTHING")
        .run(ref, collection, rkey, JSON.stringify(record), now, now).changes > 0
    )
  }

  get(ref: string): OutboxRow | null {
    const r = this.db.$client.prepare('SELECT * FROM exchange_outbox WHERE ref = ?').get(ref) as Record<string, unknown> | undefined
    return r ? toRow(r) : null
  }

  pending(): number {
    return this.db.$client.prepare("SELECT COUNT(*) FROM exchange_outbox WHERE status = 'pending'").pluck().get() as number
  }

  /** Publishes everything due now, one record at a time, oldest first. */
  async drain(): Promise<void> {
    if (this.running) return this.running
    const run = (async () => {
      for (;;) {
        if (this.stopped) return
        const due = this.db.$client
          .prepare("SELECT * FROM exchange_outbox WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY created_at, ref LIMIT 50")
          .all(new Date().toISOString()) as Record<string, unknown>[]
        if (due.length === 0) return
        for (const raw of due) {
          if (this.stopped) return
          await this.publish(toRow(raw))
        }
      }
    })()
    // Cleared after the assignment: a pass with nothing to do settles before `run` is even stored.
    this.running = run.finally(() => {
      this.running = null
    })
    return this.running
  }

  private async publish(row: OutboxRow): Promise<void> {
    let ref: { uri: string; cid: string }
    try {
      ref = await this.repo.put(row.collection, row.rkey, row.record)
    } catch (err) {
      const attempts = row.attempts + 1
      const { firstMs, maxMs } = this.opts.retry ?? { firstMs: 1_000, maxMs: 300_000 }
      const wait = Math.min(maxMs, firstMs * 2 ** Math.min(attempts - 1, 20))
      const message = (err as Error).message.slice(0, 500)
      this.db.$client
        .prepare('UPDATE exchange_outbox SET attempts = ?, last_error = ?, next_attempt_at = ? WHERE ref = ?')
        .run(attempts, message, new Date(Date.now() + wait).toISOString(), row.ref)
      log.warn('publication failed; will retry', { ref: row.ref, attempts, inMs: wait, err: message })
      return
    }
    this.opts.afterPublish?.(row.ref)
    this.db.$client
      .prepare("UPDATE exchange_outbox SET status = 'published', uri = ?, cid = ?, published_at = ?, last_error = NULL WHERE ref = ?")
      .run(ref.uri, ref.cid, new Date().toISOString(), row.ref)
  }

  /** Drains every `everyMs`, and at once after `kick()`. */
  start(everyMs = 1_000): void {
    this.stopped = false
    const loop = () => {
      this.timer = setTimeout(() => void this.drain().finally(() => !this.stopped && loop()), everyMs)
      this.timer.unref()
    }
    loop()
  }

  kick(): void {
    void this.drain()
  }

  async stop(): Promise<void> {
    this.stopped = true
    if (this.timer) clearTimeout(this.timer)
    await this.running
  }
}

function toRow(r: Record<string, unknown>): OutboxRow {
  return {
    ref: r.ref as string,
    collection: r.collection as string,
    rkey: r.rkey as string,
    record: JSON.parse(r.record as string) as Record<string, unknown>,
    status: r.status as OutboxRow['status'],
    attempts: r.attempts as number,
    lastError: (r.last_error as string | null) ?? null,
    uri: (r.uri as string | null) ?? null,
    cid: (r.cid as string | null) ?? null,
  }
}
