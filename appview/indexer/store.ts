/**
 * The index writer: every change to the AppView's tables goes through here,
 * one SQLite transaction per firehose event (rows + cursor together).
 * Writes use prepared statements rather than the query builder because this is
 * the ingest hot path; reads elsewhere use drizzle.
 */
import { lexStringify } from '@atproto/lex-json'
import type { Statement } from 'better-sqlite3'
import type { Db } from '../../src/db/index.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import { columnsFor } from './columns.ts'

export interface RecordWrite {
  action: 'create' | 'update'
  uri: string
  did: string
  collection: string
  rkey: string
  cid: string
  record: Record<string, unknown>
}
export interface RecordDelete {
  action: 'delete'
  uri: string
}
export type IndexOp = RecordWrite | RecordDelete

export class IndexStore {
  readonly db: Db
  private readonly st: Record<
    'upsert' | 'del' | 'getRev' | 'setRev' | 'advanceRev' | 'needsResync' | 'setCursor' | 'getCursor' | 'reject' | 'ensureAccount' | 'setHandle' | 'setStatus' | 'purgeRecords' | 'purgeAccount' | 'clearResync' | 'urisOfDid' | 'markResync',
    Statement
  >

  constructor(db: Db) {
    this.db = db
    const c = db.$client
    this.st = {
      upsert: c.prepare(`INSERT INTO records (uri, did, collection, rkey, cid, body, sort_at, indexed_at, provider_did, requester_did, exchange_did, subject_did, job_uri, receipt_uri, attestation_uri, authorization_uri, model)
        VALUES (@uri, @did, @collection, @rkey, @cid, @body, @sortAt, @indexedAt, @providerDid, @requesterDid, @exchangeDid, @subjectDid, @jobUri, @receiptUri, @attestationUri, @authorizationUri, @model)
        ON CONFLICT (uri) DO UPDATE SET cid = excluded.cid, body = excluded.body, sort_at = excluded.sort_at, indexed_at = excluded.indexed_at,
          provider_did = excluded.provider_did, requester_did = excluded.requester_did, exchange_did = excluded.exchange_did, subject_did = excluded.subject_did,
          job_uri = excluded.job_uri, receipt_uri = excluded.receipt_uri, attestation_uri = excluded.attestation_uri, authorization_uri = excluded.authorization_uri, model = excluded.model
        WHERE records.cid IS NOT excluded.cid`),
      del: c.prepare('DELETE FROM records WHERE uri = ?'),
      getRev: c.prepare('SELECT rev FROM repos WHERE did = ?').pluck(),
      setRev: c.prepare('INSERT INTO repos (did, rev, needs_resync) VALUES (?, ?, 0) ON CONFLICT (did) DO UPDATE SET rev = excluded.rev, needs_resync = 0'),
      // A live commit moves the rev but leaves a pending resync pending: only a full snapshot clears it.
      advanceRev: c.prepare('INSERT INTO repos (did, rev, needs_resync) VALUES (?, ?, 0) ON CONFLICT (did) DO UPDATE SET rev = excluded.rev'),
      needsResync: c.prepare('SELECT needs_resync FROM repos WHERE did = ?').pluck(),
      markResync: c.prepare("INSERT INTO repos (did, rev, needs_resync) VALUES (?, '', 1) ON CONFLICT (did) DO UPDATE SET needs_resync = 1"),
      setCursor: c.prepare('INSERT INTO cursors (source, seq) VALUES (?, ?) ON CONFLICT (source) DO UPDATE SET seq = excluded.seq WHERE excluded.seq > cursors.seq'),
      getCursor: c.prepare('SELECT seq FROM cursors WHERE source = ?').pluck(),
      reject: c.prepare(`INSERT INTO rejections (reason, collection, count, last_uri, last_at) VALUES (?, ?, 1, ?, ?)
        ON CONFLICT (reason, collection) DO UPDATE SET count = count + 1, last_uri = excluded.last_uri, last_at = excluded.last_at`),
      ensureAccount: c.prepare('INSERT INTO accounts (did) VALUES (?) ON CONFLICT (did) DO NOTHING'),
      setHandle: c.prepare('INSERT INTO accounts (did, handle) VALUES (?, ?) ON CONFLICT (did) DO UPDATE SET handle = excluded.handle'),
      setStatus: c.prepare('INSERT INTO accounts (did, active, status) VALUES (?, ?, ?) ON CONFLICT (did) DO UPDATE SET active = excluded.active, status = excluded.status'),
      purgeRecords: c.prepare('DELETE FROM records WHERE did = ?'),
      purgeAccount: c.prepare('DELETE FROM accounts WHERE did = ?'),
      clearResync: c.prepare('UPDATE repos SET needs_resync = 0 WHERE did = ?'),
      urisOfDid: c.prepare('SELECT uri FROM records WHERE did = ?').pluck(),
    }
  }

  tx<T>(fn: () => T): T {
    return this.db.$client.transaction(fn)()
  }

  getCursor(source: string): number | undefined {
    return this.st.getCursor.get(source) as number | undefined
  }
  setCursor(source: string, seq: number): void {
    this.st.setCursor.run(source, seq)
  }
  getRev(did: string): string | undefined {
    return this.st.getRev.get(did) as string | undefined
  }
  isKnown(did: string): boolean {
    return this.getRev(did) !== undefined
  }

  /**
   * Applies one commit's ops if its rev is newer than the last applied one for
   * the repo; returns false for a stale (replayed or out-of-order) commit.
   * Must run inside `tx`.
   */
  applyCommit(did: string, rev: string, ops: IndexOp[]): boolean {
    const last = this.getRev(did)
    if (last !== undefined && last !== '' && rev <= last) return false
    this.st.ensureAccount.run(did)
    for (const op of ops) this.applyOp(op)
    this.st.advanceRev.run(did, rev)
    return true
  }

  private applyOp(op: IndexOp): void {
    if (op.action === 'delete') {
      this.st.del.run(op.uri)
      return
    }
    this.st.upsert.run({
      uri: op.uri,
      did: op.did,
      collection: op.collection,
      rkey: op.rkey,
      cid: op.cid,
      body: lexStringify(op.record as never),
      indexedAt: new Date().toISOString(),
      ...columnsFor(op.collection, op.did, op.record),
    })
  }

  /**
   * Makes the index hold exactly `ops` (all creates) for the repo: the result
   * of a verified full-repo fetch (backfill, #sync, desynchronized repo).
   * Must run inside `tx`.
   */
  replaceRepo(did: string, rev: string, writes: RecordWrite[]): { upserted: number; removed: number } {
    const keep = new Set(writes.map((w) => w.uri))
    let removed = 0
    for (const uri of this.st.urisOfDid.all(did) as string[]) {
      if (!keep.has(uri)) {
        this.st.del.run(uri)
        removed++
      }
    }
    this.st.ensureAccount.run(did)
    for (const w of writes) this.applyOp(w)
    this.st.setRev.run(did, rev)
    return { upserted: writes.length, removed }
  }

  markResync(did: string): void {
    this.st.markResync.run(did)
  }
  needsResync(did: string): boolean {
    return this.st.needsResync.get(did) === 1
  }
  reposNeedingResync(): string[] {
    return this.db.$client.prepare('SELECT did FROM repos WHERE needs_resync = 1').pluck().all() as string[]
  }

  /** Invalid records and refused events are counted by reason (and collection). */
  reject(reason: string, collection: string, uri: string | null): void {
    this.st.reject.run(reason, collection, uri, new Date().toISOString())
  }

  setHandle(did: string, handle: string | null): void {
    this.st.setHandle.run(did, handle)
  }
  setStatus(did: string, active: boolean, status: string | null): void {
    this.st.setStatus.run(did, active ? 1 : 0, status)
  }
  /**
   * Removes every row of an account (deleted or taken down). The repo's sync
   * row stays, rev included: replays of older commits (after a crash, or from
   * a lagging second source) remain stale and cannot bring the rows back.
   */
  purge(did: string): number {
    const n = this.st.purgeRecords.run(did).changes
    this.st.purgeAccount.run(did)
    this.st.clearResync.run(did)
    return n
  }

  /** The encryption keys an account's visible provider records publish. */
  /** The account's indexed (validated, signed) provider records, newest first; none while the account is deactivated. */
  providerRecords(did: string): { uri: string; cid: string; body: Record<string, unknown> }[] {
    return (
      this.db.$client
        .prepare(`SELECT uri, cid, body FROM records WHERE did = ? AND collection = ? AND did NOT IN (SELECT did FROM accounts WHERE active = 0) ORDER BY sort_at DESC, uri DESC`)
        .all(did, ids.ComputeProvider) as { uri: string; cid: string; body: string }[]
    ).map((r) => ({ uri: r.uri, cid: r.cid, body: JSON.parse(r.body) as Record<string, unknown> }))
  }

  /** Indexed receipts after a position (the SQLite rowid, which only grows), in index order: the settlement pipeline's feed. */
  receiptsAfter(rowid: number, limit: number): { rowid: number; uri: string; cid: string; did: string; body: Record<string, unknown> }[] {
    return (
      this.db.$client.prepare('SELECT rowid, uri, cid, did, body FROM records WHERE collection = ? AND rowid > ? ORDER BY rowid LIMIT ?').all(ids.ComputeReceipt, rowid, limit) as {
        rowid: number
        uri: string
        cid: string
        did: string
        body: string
      }[]
    ).map((r) => ({ ...r, body: JSON.parse(r.body) as Record<string, unknown> }))
  }

  /** One indexed record of a visible account, or undefined. */
  record(uri: string): { uri: string; cid: string; did: string; collection: string; body: Record<string, unknown> } | undefined {
    const r = this.db.$client.prepare('SELECT uri, cid, did, collection, body FROM records WHERE uri = ? AND did NOT IN (SELECT did FROM accounts WHERE active = 0)').get(uri) as
      | { uri: string; cid: string; did: string; collection: string; body: string }
      | undefined
    return r ? { ...r, body: JSON.parse(r.body) as Record<string, unknown> } : undefined
  }

  /** Whether `owner` publishes a friend record naming `subject`. */
  isFriend(owner: string, subject: string): boolean {
    return !!this.db.$client.prepare('SELECT 1 FROM records WHERE did = ? AND collection = ? AND subject_did = ? LIMIT 1').get(owner, ids.AccountFriend, subject)
  }

  /** Every indexed record of an account (for its data export). */
  recordsOf(did: string): { uri: string; cid: string; collection: string; indexedAt: string; body: unknown }[] {
    return (this.db.$client.prepare('SELECT uri, cid, collection, indexed_at AS indexedAt, body FROM records WHERE did = ? ORDER BY collection, uri').all(did) as { uri: string; cid: string; collection: string; indexedAt: string; body: string }[]).map(
      (r) => ({ ...r, body: JSON.parse(r.body) }),
    )
  }

  rejectionCounts(): { reason: string; collection: string; count: number }[] {
    return this.db.$client.prepare('SELECT reason, collection, count FROM rejections ORDER BY reason, collection').all() as never
  }
}
