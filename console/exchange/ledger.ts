/**
 * The token ledger: double entry in SQLite. Every movement is one
 * transaction of entries that sum to zero; a balance is the sum of an
 * account's entries. Tokens enter only through grants (welcome, refresh),
 * whose counterpart is `@issuance`, so every balance plus the issuance
 * account always sums to zero. Each transaction has a unique `ref`: the same
 * movement asked twice (a retry, a second delivery) is found and not made
 * again. No account but the system ones (`@...`) ever goes below zero, nor
 * below what is held for its jobs: a CHECK on `ledger_balances` refuses it.
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

/** A movement or hold refused because it would take an account's available tokens below zero. */
export class InsufficientFundsError extends LedgerError {
  override name = 'InsufficientFundsError'
}

/** Runs `f`, turning the balance table's CHECK refusal into an InsufficientFundsError. */
function guarded<T>(what: string, f: () => T): T {
  try {
    return f()
  } catch (err) {
    if ((err as { code?: string }).code === 'SQLITE_CONSTRAINT_CHECK') throw new InsufficientFundsError(`${what}: it would take an account's available tokens below zero`)
    throw err
  }
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
    // Credits first, so an account paid and charged in one movement is never below zero in between.
    const ordered = [...moving].sort((a, b) => b.amount - a.amount)
    return guarded(`transaction ${ref}`, () =>
      c.transaction(() => {
        const res = c.prepare('INSERT INTO ledger_txns (kind, ref, meta, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (ref) DO NOTHING').run(kind, ref, meta ? JSON.stringify(meta) : null, new Date().toISOString())
        if (res.changes === 0) return false
        const add = c.prepare('INSERT INTO ledger_entries (txn_id, account, amount) VALUES (?, ?, ?)')
        for (const e of ordered) add.run(res.lastInsertRowid, e.account, e.amount)
        return true
      })(),
    )
  }

  has(ref: string): boolean {
    return this.db.$client.prepare('SELECT 1 FROM ledger_txns WHERE ref = ?').get(ref) !== undefined
  }

  /** The sum of the account's entries (kept in `ledger_balances` by a trigger). */
  balance(account: string): number {
    return this.row(account).balance
  }

  /** Tokens held for the account's jobs in flight. */
  held(account: string): number {
    return this.row(account).held
  }

  /** What the account may still commit: its balance less what is held. */
  available(account: string): number {
    const r = this.row(account)
    return r.balance - r.held
  }

  private row(account: string): { balance: number; held: number } {
    return (this.db.$client.prepare('SELECT balance, held FROM ledger_balances WHERE account = ?').get(account) as { balance: number; held: number } | undefined) ?? { balance: 0, held: 0 }
  }

  /**
   * Holds `amount` of the account's tokens (a job's ceiling), inside the
   * caller's transaction. @throws InsufficientFundsError when its available
   * tokens are fewer.
   */
  hold(account: string, amount: number): void {
    if (!Number.isSafeInteger(amount) || amount < 0) throw new LedgerError(`a hold is a non-negative integer: ${amount}`)
    if (amount === 0) return
    const res = guarded(`a hold of ${amount}`, () => this.db.$client.prepare('UPDATE ledger_balances SET held = held + ? WHERE account = ?').run(amount, account))
    // No row: the account never had a token.
    if (res.changes === 0) throw new InsufficientFundsError(`a hold of ${amount}: the account has no balance`)
  }

  /** Gives back `amount` held (a job settled, refused or expired), inside the caller's transaction. */
  release(account: string, amount: number): void {
    if (amount === 0) return
    guarded(`a release of ${amount}`, () => this.db.$client.prepare('UPDATE ledger_balances SET held = held - ? WHERE account = ?').run(amount, account))
  }

  /** Tokens held over every account (equal to the holds of the jobs in flight, always). */
  heldTotal(): number {
    return this.db.$client.prepare('SELECT COALESCE(SUM(held), 0) FROM ledger_balances').pluck().get() as number
  }

  /** Accounts whose kept balance differs from the sum of their entries (none, always). */
  drift(): string[] {
    return this.db.$client
      .prepare(
        `SELECT b.account FROM ledger_balances b LEFT JOIN (SELECT account, SUM(amount) AS s FROM ledger_entries GROUP BY account) e ON e.account = b.account
         WHERE b.balance != COALESCE(e.s, 0)`,
      )
      .pluck()
      .all() as string[]
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
    return this.db.$client.prepare("SELECT account, balance FROM ledger_balances WHERE account NOT LIKE '@%'").all() as { account: string; balance: number }[]
  }
}
