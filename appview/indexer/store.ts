/**
 * The index writer: every change to the AppView's tables goes through here.
 * Each firehose event's rows are written with its cursor, atomically. Writes
 * use prepared statements rather than the query builder because this is the
 * ingest hot path; reads elsewhere use drizzle.
 *
 * Group commit: a transaction's fixed cost (every page it dirties is written
 * to the WAL at COMMIT, each index of `records` included) was a large part of
 * what an event of ours cost. The indexer applies each event in a savepoint of one
 * open transaction (`txGrouped`) and commits that transaction a few
 * milliseconds later (`commitGroup`): events are still all-or-nothing, each
 * with its cursor, and a crash loses only events whose cursor was not
 * committed either. Any other write (`tx`) commits the group with it, so it
 * is durable when it returns.
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

/** A commit as a link of its repo's chain: its rev, and what the frame says came before it. */
export interface ChainLink {
  rev: string
  /** The frame's `since`: the rev of the repo's previous commit (null for a repo's first); undefined when not known (no gap is judged). */
  since?: string | null
  /** The frame's `prevData` (sync 1.1): the MST root CID of the previous commit, when the frame carries it. */
  prevData: string | null
  /** This commit's MST root CID, when known: the next commit's `prevData` must name it. */
  data: string | null
}

/** What the index knows of a repo's sync state. */
export interface RepoState {
  /** The last commit applied (signed and verified); '' for a repo known only as marked for a resync. */
  rev: string
  /** The newest commit seen, of any collection (see `repos.head`); null until one is seen after the rows were written without it. */
  head: string | null
  headData: string | null
  needsResync: boolean
}

/**
 * Whether a commit newer than the repo's head does not follow it: its `since`
 * is not the head's rev, or its `prevData` is not the head's MST root (checked
 * when both are known). Events were missed. Not judged while a resync is
 * pending (the hole is known already) or before a head is known.
 */
export function isGap(state: RepoState, link: ChainLink): boolean {
  if (link.since === undefined || state.needsResync || state.head === null || link.rev <= state.head) return false
  if (link.since !== state.head) return true
  return link.prevData !== null && state.headData !== null && link.prevData !== state.headData
}

/** Repos whose sync state the store keeps in memory (each entry is a few hundred bytes). */
const CHAIN_CACHE_MAX = 50_000

export class IndexStore {
  readonly db: Db
  private readonly st: Record<
    'upsert' | 'del' | 'getRev' | 'repoState' | 'setRev' | 'advanceRev' | 'setHead' | 'needsResync' | 'setCursor' | 'getCursor' | 'reject' | 'ensureAccount' | 'setHandle' | 'setStatus' | 'purgeRecords' | 'purgeAccount' | 'clearResync' | 'cidsOfDid' | 'markResync',
    Statement
  >
  /**
   * The repos the index knows (rows of `repos` are never deleted): a commit
   * of another collection of any other repo, most of a relay's traffic, costs
   * no query. Repos another process (a backfill) adds are not seen until this
   * one writes them too: their commits of other collections leave the head
   * behind, and the next commit of ours is then taken for a gap and resynced.
   */
  private readonly tracked: Set<string>
  /**
   * Sync state of tracked repos whose commits of other collections were seen,
   * read once and kept, with the head those commits move: writing each would
   * cost a transaction per event. An `unsaved` head is written with the next
   * cursor (`flushHeads`), so a persisted cursor never passes a head left
   * unwritten. Writes of the repo's row (`applyLinkedCommit`, `replaceRepo`)
   * write the head too and leave the entry as written.
   */
  private readonly chain = new Map<string, RepoState & { unsaved: boolean }>()
  /** The open group transaction (see the module comment), if any. */
  private groupOpen = false

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
      repoState: c.prepare('SELECT rev, head, head_data AS headData, needs_resync AS needsResync FROM repos WHERE did = ?'),
      setRev: c.prepare(
        'INSERT INTO repos (did, rev, needs_resync, head, head_data) VALUES (?, ?, 0, ?, ?) ON CONFLICT (did) DO UPDATE SET rev = excluded.rev, needs_resync = 0, head = excluded.head, head_data = excluded.head_data',
      ),
      // A live commit moves the rev but leaves a pending resync pending: only a full snapshot clears it.
      advanceRev: c.prepare(
        'INSERT INTO repos (did, rev, needs_resync, head, head_data) VALUES (?, ?, 0, ?, ?) ON CONFLICT (did) DO UPDATE SET rev = excluded.rev, head = excluded.head, head_data = excluded.head_data',
      ),
      // Heads only move forward (two sources may deliver the same commits at different times).
      setHead: c.prepare('UPDATE repos SET head = ?, head_data = ? WHERE did = ? AND (head IS NULL OR head < ?)'),
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
      cidsOfDid: c.prepare('SELECT uri, cid FROM records WHERE did = ?').raw(),
    }
    this.tracked = new Set(c.prepare('SELECT did FROM repos').pluck().all() as string[])
  }

  /** Runs `fn` in a transaction of its own, durable when this returns (an open group is committed first). */
  tx<T>(fn: () => T): T {
    this.commitGroup()
    return this.atomically(fn)
  }

  /**
   * Runs `fn` atomically inside the group transaction, opening it if none is
   * open: durable once `commitGroup` has run.
   */
  txGrouped<T>(fn: () => T): T {
    // Inside someone's transaction already: a savepoint of it.
    if (!this.groupOpen && !this.db.$client.inTransaction) {
      this.db.$client.exec('BEGIN IMMEDIATE')
      this.groupOpen = true
    }
    return this.atomically(fn)
  }

  /**
   * Called when a group transaction could not be committed: everything
   * written in it is gone, and whoever wrote it must start again from the
   * committed cursors. The error is also thrown to the caller of the commit.
   */
  onGroupLost: ((err: unknown) => void) | null = null

  /** Commits the group transaction, if one is open. */
  commitGroup(): void {
    if (!this.groupOpen) return
    this.groupOpen = false
    const c = this.db.$client
    try {
      c.exec('COMMIT')
    } catch (err) {
      if (c.inTransaction) c.exec('ROLLBACK')
      this.forgetWrittenStates()
      this.onGroupLost?.(err)
      throw err
    }
  }

  /** A transaction, or a savepoint of the group's. */
  private atomically<T>(fn: () => T): T {
    try {
      return this.db.$client.transaction(fn)()
    } catch (err) {
      this.forgetWrittenStates()
      throw err
    }
  }

  /** After a rollback: states read or changed inside may be wrong; only heads not yet written are kept (they are ahead of the database). */
  private forgetWrittenStates(): void {
    for (const [did, c] of this.chain) if (!c.unsaved) this.chain.delete(did)
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
  /** Whether the index knows the repo, without a query (see `tracked`). */
  isTracked(did: string): boolean {
    return this.tracked.has(did)
  }
  isKnown(did: string): boolean {
    return this.getRev(did) !== undefined
  }

  /** The repo's sync state (heads not yet written included); undefined for a repo the index does not know. */
  repoState(did: string): RepoState | undefined {
    const row = this.st.repoState.get(did) as { rev: string; head: string | null; headData: string | null; needsResync: number } | undefined
    if (!row) return undefined
    const cached = this.chain.get(did)
    const unsaved = cached?.unsaved ? cached : undefined
    return {
      rev: row.rev,
      head: unsaved ? unsaved.head : row.head,
      headData: unsaved ? unsaved.headData : row.headData,
      needsResync: row.needsResync === 1,
    }
  }

  /**
   * Applies one commit's ops if its rev is newer than the last applied one for
   * the repo; false for a stale one. For writers without the commit's chain
   * (tools, tests): no gap is judged. Must run inside `tx`.
   */
  applyCommit(did: string, rev: string, ops: IndexOp[]): boolean {
    return this.applyLinkedCommit(did, { rev, prevData: null, data: null }, ops) !== 'stale'
  }

  /**
   * Applies one commit's ops if its rev is newer than the last applied one for
   * the repo: 'stale' (replayed or out of order: nothing applied), else
   * 'applied', or 'gap' when it does not follow the repo's head (applied too:
   * it is signed and verified, but the caller must resync the repo).
   * Must run inside `tx`.
   */
  applyLinkedCommit(did: string, link: ChainLink, ops: IndexOp[]): 'stale' | 'applied' | 'gap' {
    const state = this.repoState(did)
    if (state && state.rev !== '' && link.rev <= state.rev) return 'stale'
    const gap = state !== undefined && isGap(state, link)
    this.st.ensureAccount.run(did)
    for (const op of ops) this.applyOp(op)
    // The head stays where it is if commits of other collections took it past this one.
    const ahead = state?.head != null && state.head > link.rev
    const head = ahead ? state.head : link.rev
    const headData = ahead ? state.headData : link.data
    this.st.advanceRev.run(did, link.rev, head, headData)
    this.cacheWritten(did, { rev: link.rev, head, headData, needsResync: state?.needsResync ?? false })
    return gap ? 'gap' : 'applied'
  }

  /**
   * A commit of a tracked repo none of whose ops is ours: only the head moves
   * (in memory until `flushHeads`). 'untracked' for a repo the index does not
   * know, 'stale' when the head is already at or past it, 'gap' when it does
   * not follow the head. Its MST root is not read (that would decode a block
   * of every such commit): the next commit's `prevData` is checked only
   * after a commit we applied, or a snapshot.
   */
  followForeignCommit(did: string, rev: string, since: string | null, prevData: () => string | null): 'untracked' | 'stale' | 'next' | 'gap' {
    if (!this.tracked.has(did)) return 'untracked'
    let state = this.chain.get(did)
    if (!state) {
      const read = this.repoState(did)
      if (!read) return 'untracked'
      this.remember(did, (state = { ...read, unsaved: false }))
    }
    if (state.head !== null && rev <= state.head) return 'stale'
    // prevData only counts after a head whose MST root is known.
    const gap = isGap(state, { rev, since, prevData: state.headData === null ? null : prevData(), data: null })
    state.head = rev
    state.headData = null
    state.unsaved = true
    return gap ? 'gap' : 'next'
  }

  /** The state just written for a repo (head included): the next commit of another collection needs no query. */
  private cacheWritten(did: string, state: RepoState): void {
    this.tracked.add(did)
    this.remember(did, { ...state, unsaved: false })
  }

  /**
   * Keeps a repo's state, most recently used last. Bounded: past
   * CHAIN_CACHE_MAX the least recently used written entries go (they are in
   * the database); heads not yet written stay until `flushHeads`.
   */
  private remember(did: string, entry: RepoState & { unsaved: boolean }): void {
    this.chain.delete(did)
    this.chain.set(did, entry)
    if (this.chain.size <= CHAIN_CACHE_MAX) return
    for (const [k, v] of this.chain) {
      if (v.unsaved) continue
      this.chain.delete(k)
      if (this.chain.size <= CHAIN_CACHE_MAX) break
    }
  }

  /** Writes the heads kept in memory. Must run inside `tx`, with the cursors that cover them. */
  flushHeads(): void {
    for (const [did, c] of this.chain) {
      if (!c.unsaved) continue
      this.st.setHead.run(c.head, c.headData, did, c.head)
      c.unsaved = false
    }
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
  replaceRepo(did: string, rev: string, data: string | null, writes: RecordWrite[]): { upserted: number; removed: number } {
    const stored = new Map(this.st.cidsOfDid.all(did) as [string, string][])
    const keep = new Set(writes.map((w) => w.uri))
    let removed = 0
    for (const uri of stored.keys()) {
      if (!keep.has(uri)) {
        this.st.del.run(uri)
        removed++
      }
    }
    this.st.ensureAccount.run(did)
    // A record stored with the same CID is the same record: the upsert would change nothing (it keeps the row as it
    // is), so it is not run, nor its body serialized. A resync of an unchanged repo writes no row.
    for (const w of writes) if (stored.get(w.uri) !== w.cid) this.applyOp(w)
    // The snapshot's commit is the head, unless live commits seen meanwhile are newer.
    const state = this.repoState(did)
    const ahead = state?.head != null && state.head > rev
    const head = ahead ? state.head : rev
    const headData = ahead ? state.headData : data
    this.st.setRev.run(did, rev, head, headData)
    this.cacheWritten(did, { rev, head, headData, needsResync: false })
    return { upserted: writes.length, removed }
  }

  markResync(did: string): void {
    this.st.markResync.run(did)
    this.tracked.add(did)
    const cached = this.chain.get(did)
    if (cached) cached.needsResync = true
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
    const cached = this.chain.get(did)
    if (cached) cached.needsResync = false
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

  /** Indexed receipts naming `jobUri`, of visible accounts. */
  receiptsForJob(jobUri: string): { uri: string; cid: string; did: string; body: Record<string, unknown> }[] {
    return (
      this.db.$client
        .prepare('SELECT r.uri, r.cid, r.did, r.body FROM records r WHERE r.job_uri = ? AND r.collection = ? AND NOT EXISTS (SELECT 1 FROM accounts a WHERE a.did = r.did AND a.active = 0)')
        .all(jobUri, ids.ComputeReceipt) as { uri: string; cid: string; did: string; body: string }[]
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

  /** The account's own index rows besides its records, for its data export: hosting status and sync state. */
  accountRows(did: string): { account: { handle: string | null; active: boolean; status: string | null } | null; repo: { rev: string; needsResync: boolean; head: string | null; headData: string | null } | null } {
    const account = this.db.$client.prepare('SELECT handle, active, status FROM accounts WHERE did = ?').get(did) as { handle: string | null; active: number; status: string | null } | undefined
    const repo = this.db.$client.prepare('SELECT rev, needs_resync AS needsResync, head, head_data AS headData FROM repos WHERE did = ?').get(did) as
      | { rev: string; needsResync: number; head: string | null; headData: string | null }
      | undefined
    return {
      account: account ? { ...account, active: account.active === 1 } : null,
      repo: repo ? { ...repo, needsResync: repo.needsResync === 1 } : null,
    }
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
