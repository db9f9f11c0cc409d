/**
 * The token ledger: double entry in SQLite. Every movement is one
 * transaction of entries that sum to zero; a balance is the sum of an
 * account's entries. Tokens enter only through grants (welcome, refresh),
 * whose counterpart is `@issuance`, so every balance plus the issuance
 * account always sums to zero. Each transaction has a unique `ref`: the same
 * movement asked twice (a retry, a second delivery) is found and not made
 * again.
 */
import type { Db } from '../../src/db/index.ts'

/** Counterpart of every grant: minus the tokens ever granted. */
export const ISSUANCE = '@issuance'

export type TxnKind = 'grant' | 'refresh' | 'settlement' | 'patronage'

export interface Entry {
  account: string
  amount: number
}

export interface HistoryRow {
  txnId: number
  kind: TxnKind
  ref: string
  amount: number
  meta: Record<string, unknown> | null
  createdAt: string
}

export class LedgerError extends Error {
  override name = 'LedgerError'
}

export class Ledger {
  private readonly db: Db
  constructor(db: Db) {
    this.db = db
  }

  /**
   * Posts a balanced transaction, unless one with `ref` exists (then nothing
   * moves and false is returned). Runs inside the caller's transaction when
   * there is one, so a settlement and its outbox row commit together.
   */
  post(kind: TxnKind, ref: string, entries: Entry[], meta?: Record<string, unknown>): boolean {
    const moving = entries.filter((e) => e.amount !== 0)
    for (const e of moving) if (!Number.isSafeInteger(e.amount)) throw new LedgerError(`amounts are integers: ${e.amount}`)
    if (moving.reduce((s, e) => s + e.amount, 0) !== 0) throw new LedgerError(`transaction ${ref} does not balance`)
    const c = this.db.$client
    return c.transaction(() => {
      const res = c.prepare('INSERT INTO ledger_txns (kind, ref, meta, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (ref) DO NOTHING').run(kind, ref, meta ? JSON.stringify(meta) : null, new Date().toISOString())
      if (res.changes === 0) return false
      const add = c.prepare('INSERT INTO ledger_entries (txn_id, account, amount) VALUES (?, ?, ?)')
      for (const e of moving) add.run(res.lastInsertRowid, e.account, e.amount)
      return true
    })()
  }

  has(ref: string): boolean {
    return this.db.$client.prepare('SELECT 1 FROM ledger_txns WHERE ref = ?').get(ref) !== undefined
  }

  balance(account: string): number {
    return (this.db.$client.prepare('SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE account = ?').pluck().get(account) as number) ?? 0
  }

  /** The account's movements, newest first, `limit` per page after the `before` transaction id. */
  history(account: string, limit: number, before?: number): HistoryRow[] {
    const rows = this.db.$client
      .prepare(
        `SELECT t.id AS txnId, t.kind, t.ref, SUM(e.amount) AS amount, t.meta, t.created_at AS createdAt
         FROM ledger_entries e JOIN ledger_txns t ON t.id = e.txn_id
         WHERE e.account = ? AND (? IS NULL OR t.id < ?) GROUP BY t.id ORDER BY t.id DESC LIMIT ?`,
      )
      .all(account, before ?? null, before ?? null, limit) as (Omit<HistoryRow, 'meta'> & { meta: string | null })[]
    return rows.map((r) => ({ ...r, meta: r.meta ? (JSON.parse(r.meta) as Record<string, unknown>) : null }))
  }

  /** Sum of every entry: zero, always (tests check it; anything else is a bug). */
  total(): number {
    return (this.db.$client.prepare('SELECT COALESCE(SUM(amount), 0) FROM ledger_entries').pluck().get() as number) ?? 0
  }

  /** Transactions whose entries do not sum to zero (none, always). */
  unbalanced(): number[] {
    return this.db.$client.prepare('SELECT txn_id FROM ledger_entries GROUP BY txn_id HAVING SUM(amount) != 0').pluck().all() as number[]
  }

  /** Tokens ever granted (minus the issuance account). */
  issued(): number {
    return -this.balance(ISSUANCE)
  }

  /** Accounts with their balances (for periodic refresh and patronage). */
  accounts(): { account: string; balance: number }[] {
    return this.db.$client.prepare("SELECT account, SUM(amount) AS balance FROM ledger_entries WHERE account NOT LIKE '@%' GROUP BY account").all() as { account: string; balance: number }[]
  }
}
