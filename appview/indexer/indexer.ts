/**
 * Firehose -> validate -> index. One `@atproto/sync` Firehose per source (a
 * relay or a PDS). Commits are filtered to `dev.cocore.*` by their op paths
 * before any signature or MST-proof work; matching commits are verified by the
 * library against the DID's key (bounded cache, one refresh on failure).
 *
 * Per event, everything the event changes is collected while it is handled
 * (async work such as confirming an account deletion with its PDS happens
 * there), then applied in one transaction together with the cursor.
 */
import { TID } from '@atproto/common-web'
import { DidNotFoundError, type IdResolver } from '@atproto/identity'
import { cborToLex, RepoVerificationError } from '@atproto/repo'
import { Firehose, FirehoseParseError, FirehoseSubscriptionError, FirehoseValidationError, type Event } from '@atproto/sync'
import { installNativeSignatureVerification } from '../../src/crypto/native-verify.ts'
import { indexerLogger as log } from '../../src/logger.ts'
import { MAX_RECORD_BYTES, validateRecord } from '../../src/lexicon/validate.ts'
import { NSID_PREFIX, recordCollections } from '../../src/lexicon/generated/ids.ts'
import { OrderedRunner } from './runner.ts'
import { fetchRepo, getRepoStatus, RepoFetchError, type FetchedRepo } from './repo-fetch.ts'
import { prevDataOf, sinceOf, type CommitFrame } from './chain.ts'
import { readForeignCommit } from './raw-commit.ts'
import { peekRawFrames } from './subscription.ts'
import type { ChainLink, IndexOp, IndexStore, RecordWrite } from './store.ts'

const KNOWN = new Set<string>(recordCollections)

/**
 * The MST root CID of the commit block the frame points at, if that commit is
 * signed with the rev the frame claims; null if it is not.
 */
function signedCommitData(commitBlock: Uint8Array | undefined, rev: string): string | null {
  if (!commitBlock) return null
  try {
    const commit = cborToLex(commitBlock) as { rev?: unknown; data?: unknown }
    return commit.rev === rev ? String(commit.data) : null
  } catch {
    return null
  }
}

/** Milliseconds encoded in a TID rev; 0 for a malformed one. */
const revTime = (rev: string): number => (TID.is(rev) ? TID.fromStr(rev).timestamp() / 1000 : 0)
/** Revs more than this far ahead of our clock are refused (atproto sync spec). */
const MAX_CLOCK_SKEW_MS = 5 * 60_000
/** Events applied in the store's group transaction are committed within this (see IndexStore: group commit). */
const GROUP_COMMIT_MS = 10

type Change =
  | { kind: 'commit'; did: string; link: ChainLink; ops: IndexOp[]; rejects: Rejection[] }
  /** A commit of a tracked repo, of other collections only, that does not follow the repo's head. */
  | { kind: 'gap'; did: string }
  | { kind: 'reject-commit'; rejection: Rejection }
  | { kind: 'purge'; did: string }
  | { kind: 'status'; did: string; active: boolean; status: string | null }
  | { kind: 'handle'; did: string; handle: string | null }
  | { kind: 'replace'; repo: FetchedRepo }
  | { kind: 'needs-resync'; did: string }

export interface Rejection {
  reason: string
  collection: string
  uri: string | null
}

/**
 * Records found valid, by collection and CID, most recently found last.
 * Bounded. A CID names the record's bytes, so the verdict for the same
 * collection and CID cannot change while this process runs (its lexicons are
 * fixed): a resync, which reads every record of a repo again, validates only
 * the new ones.
 */
const validRecords = new Set<string>()
const VALID_RECORDS_MAX = 100_000

/** Checks one record before indexing: known collection, at most 1 MB, valid for its lexicon. `cid`, when given, lets a record found valid before skip validation. */
export function checkRecord(collection: string, uri: string, record: unknown, size: number, cid?: string): Rejection | null {
  if (!KNOWN.has(collection)) return { reason: 'unknown-collection', collection, uri }
  if (size > MAX_RECORD_BYTES) return { reason: 'too-large', collection, uri }
  const key = cid === undefined ? undefined : `${collection} ${cid}`
  if (key !== undefined && validRecords.has(key)) return null
  const v = validateRecord(collection, record)
  if (!v.success) {
    log.warn('invalid record not indexed', { uri, reason: v.reason, detail: v.message })
    return { reason: `invalid-${v.reason}`, collection, uri }
  }
  if (key !== undefined) {
    validRecords.add(key)
    if (validRecords.size > VALID_RECORDS_MAX) validRecords.delete(validRecords.values().next().value!)
  }
  return null
}

const COMMIT_TYPE = 'com.atproto.sync.subscribeRepos#commit'
const SYNC_TYPE = 'com.atproto.sync.subscribeRepos#sync'

/** A commit frame none of whose ops touches a dev.cocore collection (checked on the raw, unvalidated value). */
export function isForeignCommit(v: unknown): boolean {
  const c = v as { $type?: unknown; seq?: unknown; repo?: unknown; ops?: unknown } | undefined
  if (c?.$type !== COMMIT_TYPE || !Number.isSafeInteger(c.seq) || typeof c.repo !== 'string' || !Array.isArray(c.ops)) return false
  for (const op of c.ops) {
    const path = (op as { path?: unknown } | null)?.path
    if (typeof path !== 'string' || path.startsWith(NSID_PREFIX)) return false
  }
  return true
}

/**
 * On a relay almost every commit is someone else's (posts, likes...). The
 * library validates each frame fully against its lexicon before it filters
 * ops by collection, and that validation is most of what a foreign commit
 * costs. A commit whose op paths are all outside dev.cocore is indexed by no
 * one here (the library would drop its ops right after), so it skips the
 * validation and only moves the cursor. Every other frame is validated as
 * before. The hook is the subscription's `validate` option of the pinned
 * @atproto/sync; if its shape ever differs, frames are simply all validated.
 */
export function skipValidationOfForeignCommits(firehose: Firehose): void {
  wrapFrameCheck(firehose, (full) => (value) => (isForeignCommit(value) ? value : full(value)))
}

type FrameCheck = (value: unknown) => unknown

/** Replaces the subscription's frame check (its `validate` option, which sees every decoded frame) with `wrap(current)`. */
function wrapFrameCheck(firehose: Firehose, wrap: (current: FrameCheck) => FrameCheck): boolean {
  const sub = (firehose as unknown as { sub?: { opts?: { validate?: FrameCheck } } }).sub
  const current = sub?.opts?.validate
  if (!sub?.opts || typeof current !== 'function') {
    log.warn('firehose internals changed: frames are checked by the library alone')
    return false
  }
  sub.opts.validate = wrap(current)
  return true
}

const MESSAGE_TYPES = new Set(['commit', 'sync', 'identity', 'account', 'info'].map((t) => `com.atproto.sync.subscribeRepos#${t}`))

/** The highest seq taken from a subscription so far, shared by the library's frame check and the raw-frame path. */
export interface SeqMark {
  highest: number
}

/**
 * Around the library's frame check:
 *  - a frame of a type this lexicon does not know passes the library's check
 *    (the union is open, for types added later) and is then ignored: it is
 *    dropped here and reported, so it is counted;
 *  - a valid frame whose seq is not above the highest valid one already taken
 *    is dropped. After a reconnect the library resubscribes from the applied
 *    cursor, so the source sends again the events still in the runner (or
 *    refused once, and counted then). Only valid frames of known types move
 *    the mark: a frame with a made-up seq must not blind the stream;
 *  - a commit frame that passes the check is reported (its `since` and
 *    `prevData` are in no event the library hands on), with the dev.cocore
 *    op paths it claims: the library drops, without a word, an op whose MST proof does not
 *    match, and the indexer counts those from the difference.
 */
export function watchFrames(
  firehose: Firehose,
  mark: SeqMark,
  on: { claims: (seq: number, repo: string, paths: string[]) => void; commit: (seq: number, frame: CommitFrame) => void; unknownType: (type: unknown) => void },
): void {
  wrapFrameCheck(firehose, (check) => (value) => {
    const out = check(value) as ({ $type?: unknown; seq?: unknown; repo: string; ops: { path: string }[] } & CommitFrame) | undefined
    if (out === undefined) return out
    if (typeof out.$type !== 'string' || !MESSAGE_TYPES.has(out.$type)) {
      on.unknownType(out.$type)
      return undefined
    }
    if (typeof out.seq !== 'number') return out
    if (out.seq <= mark.highest) return undefined
    mark.highest = out.seq
    if (out.$type === COMMIT_TYPE) {
      on.commit(out.seq, out)
      const paths = out.ops.map((op) => op.path).filter((p) => p.startsWith(NSID_PREFIX))
      if (paths.length) on.claims(out.seq, out.repo, paths)
    }
    return out
  })
}

/**
 * Why the subscription broke, when the source sent something that ended it:
 * an error frame (op -1, which a host sends before closing), or a frame that
 * could not be decoded (not CBOR, cut short, a bad header or frame op). Null
 * for transport failures (the connection dropped, a timeout), which are not
 * the source's data.
 */
export function streamBreakReason(cause: unknown): 'error-frame' | 'malformed-frame' | null {
  if (!(cause instanceof Error)) return 'malformed-frame'
  // @atproto/ws-client's errors (close, socket, heartbeat, buffer overflow) classify themselves for retry.
  if (typeof (cause as { shouldRetry?: unknown }).shouldRetry === 'function') return null
  // An error frame surfaces as an XRPCError (success: false) named by the frame's error; undecodable frames as plain errors.
  const x = cause as { success?: unknown; error?: unknown }
  if (x.success === false && typeof x.error === 'string') return 'error-frame'
  return 'malformed-frame'
}

/**
 * Adds a rejection for each op a commit frame claimed that yielded no event
 * (its proof did not match the signed MST), unless the commit was refused or
 * left for a resync as a whole.
 */
function withUnverifiedOps(claimed: { repo: string; paths: string[] }, changes: Change[] | undefined): Change[] | undefined {
  if (changes?.some((c) => c.kind === 'reject-commit' || c.kind === 'needs-resync')) return changes
  const seen = new Set(changes?.flatMap((c) => (c.kind === 'commit' ? c.ops.map((op) => op.uri) : [])))
  const missing = claimed.paths.map((path) => `at://${claimed.repo}/${path}`).filter((uri) => !seen.has(uri))
  if (missing.length === 0) return changes
  log.warn('ops dropped: their MST proof does not match the signed commit', { did: claimed.repo, ops: missing.length })
  const rejects = missing.map((uri): Change => ({ kind: 'reject-commit', rejection: { reason: 'unverified-op', collection: uri.split('/')[3] ?? '', uri } }))
  return [...(changes ?? []), ...rejects]
}

interface Sub {
  source: string
  firehose: Firehose
  runner: OrderedRunner
  running: Promise<void> | null
  ended: boolean
  /** seq -> the repo and dev.cocore op paths its commit frame claims, until the event is committed. */
  claims: Map<number, { repo: string; paths: string[] }>
  /** seq -> its commit frame, until the event is committed: where the commit stands in its repo's chain. */
  frames: Map<number, CommitFrame>
}

export interface IndexerStats {
  events: number
  commitsApplied: number
  staleCommits: number
  recordsWritten: number
  recordsDeleted: number
  rejected: number
  purged: number
  resyncs: number
  /** Commits that did not follow their repo's last one (events were missed): the repo was resynced. */
  gaps: number
  /** Commits of other collections told from the raw frame bytes, never decoded (see raw-commit.ts). */
  rawForeignCommits: number
}

export interface IndexerOpts {
  store: IndexStore
  idResolver: IdResolver
  /** ws(s):// URLs of relays or PDSes. */
  sources: string[]
  fetch?: typeof fetch
  concurrency?: number
  /** Sources without a saved cursor start at seq 0 rather than the live head. */
  replayFromStart?: boolean
  /** Pause before resubscribing after the stream broke (an undecodable frame, an error frame); default 3 s. */
  reconnectDelayMs?: number
  /**
   * Tell commits of other collections from the raw frame bytes, without
   * decoding them (default true). False: the library decodes every frame, the
   * reference the ingest benchmark and the fuzz suite compare against.
   */
  rawCommitFilter?: boolean
}

export class Indexer implements AsyncDisposable {
  readonly stats: IndexerStats = { events: 0, commitsApplied: 0, staleCommits: 0, recordsWritten: 0, recordsDeleted: 0, rejected: 0, purged: 0, resyncs: 0, gaps: 0, rawForeignCommits: 0 }
  private readonly opts: IndexerOpts
  private readonly subs: Sub[]
  private readonly pending = new Map<string, Change[]>()
  private resyncTimer: NodeJS.Timeout | null = null
  private retrying: Promise<void> | null = null
  /** Repos were marked for a resync while a round of resyncs was under way: run another at once. */
  private retryAgain = false
  /** A gap was found in the transaction being applied: start its resync once committed. */
  private gapFound = false
  private stopping = false

  /**
   * Cursors reached by events that wrote nothing (99% of a relay's traffic),
   * not yet persisted. Safe to persist late: every event at or below such a
   * cursor has completed, and the ones that wrote rows committed them already.
   * They are written with the next event that writes rows, or by a timer.
   */
  private readonly unsavedCursors = new Map<string, number>()
  private cursorTimer: NodeJS.Timeout | null = null
  private groupTimer: NodeJS.Timeout | null = null

  constructor(opts: IndexerOpts) {
    this.opts = opts
    installNativeSignatureVerification()
    this.subs = opts.sources.map((source) => this.makeSub(source))
    opts.store.onGroupLost = (err) => this.groupLost(err)
  }

  /**
   * The group transaction could not be committed: the events in it are gone
   * though their runners moved on. Every source stops at once and starts
   * again from its committed cursor; cursors not yet written may be past the
   * lost events, so they are dropped.
   */
  private groupLost(err: unknown): void {
    log.error('index write failed; resubscribing every source from its persisted cursor', { err: err as Error })
    this.unsavedCursors.clear()
    for (const sub of this.subs) {
      void sub.runner.close()
      this.restart(sub.source)
    }
  }

  /** Commits the group transaction soon (see IndexStore: group commit). */
  private commitGroupSoon(): void {
    this.groupTimer ??= setTimeout(() => {
      this.groupTimer = null
      this.commitGroup()
    }, GROUP_COMMIT_MS)
  }

  private commitGroup(): void {
    try {
      this.opts.store.commitGroup()
    } catch {
      // Handled by groupLost.
    }
  }

  /** A subscription to one source, resuming from that source's persisted cursor. */
  private makeSub(source: string): Sub {
    const { store, replayFromStart, concurrency } = this.opts
    const claims: Sub['claims'] = new Map()
    const frames: Sub['frames'] = new Map()
    const runner = new OrderedRunner({
      startCursor: store.getCursor(source) ?? (replayFromStart ? 0 : undefined),
      concurrency,
      commit: (seq, cursor) => this.commit(source, seq, cursor, claims, frames),
      discard: (seq) => {
        this.pending.delete(this.key(source, seq))
        claims.delete(seq)
        frames.delete(seq)
      },
      onFatal: (err) => {
        log.error('index write failed; resubscribing from the persisted cursor', { source, err: err as Error })
        this.restart(source)
      },
    })
    const firehose = new Firehose({
      service: source,
      idResolver: this.opts.idResolver,
      runner,
      filterCollections: [`${NSID_PREFIX}*`],
      unauthenticatedHandles: true,
      subscriptionReconnectDelay: this.opts.reconnectDelayMs,
      handleEvent: (evt) => this.handleEvent(source, evt),
      onError: (err) => this.onError(source, err),
    })
    const mark: SeqMark = { highest: -1 }
    skipValidationOfForeignCommits(firehose)
    if (this.opts.rawCommitFilter !== false) {
      peekRawFrames(firehose, (bytes) => {
        const frame = readForeignCommit(bytes)
        if (!frame) return false
        // Sent again after a reconnect: dropped, as the frame check drops it.
        if (frame.seq <= mark.highest) return true
        mark.highest = frame.seq
        this.stats.rawForeignCommits++
        // No handler: what the commit changes (the head of a repo we track) is decided when it is committed.
        frames.set(frame.seq, frame)
        runner.trackDone(frame.repo, frame.seq)
        return true
      })
    }
    watchFrames(firehose, mark, {
      claims: (seq, repo, paths) => claims.set(seq, { repo, paths }),
      commit: (seq, frame) => frames.set(seq, frame),
      unknownType: (type) => {
        this.opts.store.reject('unknown-frame-type', '', null)
        this.stats.rejected++
        log.warn('firehose frame of an unknown type ignored', { source, type: String(type) })
      },
    })
    return { source, firehose, runner, running: null, ended: false, claims, frames }
  }

  private launch(sub: Sub): void {
    sub.running = sub.firehose.start().then(() => {
      sub.ended = true
      // The loop also ends, without error, when the server closes normally: keep indexing.
      if (!this.stopping) this.restart(sub.source)
    })
  }

  private async closeSub(sub: Sub): Promise<void> {
    // destroy() waits for the subscription loop to end: only call it on a loop still running.
    if (sub.running && !sub.ended) await sub.firehose.destroy()
    await sub.runner.close()
  }

  /** Replaces a source's subscription with a fresh one from the persisted cursor, after a pause. */
  private restart(source: string): void {
    setTimeout(async () => {
      const i = this.subs.findIndex((s) => s.source === source)
      if (i < 0 || this.stopping) return
      await this.closeSub(this.subs[i]!)
      if (this.stopping) return
      const fresh = this.makeSub(source)
      this.subs[i] = fresh
      this.launch(fresh)
    }, 1_000).unref()
  }

  start(): void {
    for (const sub of this.subs) if (!sub.running) this.launch(sub)
    // Repos marked for resync (a #sync, or a fetch that failed) are retried until they succeed, across restarts.
    this.resyncTimer = setInterval(() => void this.retryResyncs(), 5_000)
    this.resyncTimer.unref()
    this.cursorTimer = setInterval(() => this.saveCursors(), 250)
    this.cursorTimer.unref()
    void this.retryResyncs()
  }

  /** Commits the group transaction and the cursors (and heads) reached by events that wrote nothing. */
  private saveCursors(): void {
    const { store } = this.opts
    try {
      if (this.unsavedCursors.size === 0) return store.commitGroup()
      store.tx(() => {
        for (const [source, seq] of this.unsavedCursors) store.setCursor(source, seq)
        store.flushHeads()
      })
      this.unsavedCursors.clear()
    } catch (err) {
      // A lost group was handled by groupLost; anything else is retried at the next tick.
      log.warn('cursors not saved; will retry', { err: err as Error })
    }
  }

  /** Highest seq of each source below which everything is applied. */
  cursors(): Record<string, number | undefined> {
    return Object.fromEntries(this.subs.map((s) => [s.source, s.runner.getCursor()]))
  }

  async stop(): Promise<void> {
    this.stopping = true
    if (this.resyncTimer) clearInterval(this.resyncTimer)
    if (this.cursorTimer) clearInterval(this.cursorTimer)
    await Promise.all(this.subs.map((s) => this.closeSub(s)))
    await this.retrying
    if (this.groupTimer) clearTimeout(this.groupTimer)
    this.groupTimer = null
    this.saveCursors()
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop()
  }

  private key(source: string, seq: number) {
    return `${seq}\u0000${source}`
  }

  private push(source: string, seq: number, change: Change) {
    const k = this.key(source, seq)
    const list = this.pending.get(k)
    if (list) list.push(change)
    else this.pending.set(k, [change])
  }

  private async handleEvent(source: string, evt: Event): Promise<void> {
    const { store } = this.opts
    switch (evt.event) {
      case 'create':
      case 'update':
      case 'delete': {
        const k = this.key(source, evt.seq)
        let change = this.pending.get(k)?.find((c): c is Extract<Change, { kind: 'commit' }> => c.kind === 'commit')
        if (!change) {
          // A rev from the future, or one that is not the signed commit's (it must not steer
          // the stale-rev rule): the whole commit is refused, once, and its ops are dropped.
          const data = signedCommitData(evt.blocks.get(evt.commit), evt.rev)
          const refused = revTime(evt.rev) > Date.now() + MAX_CLOCK_SKEW_MS ? 'rev-in-future' : data === null ? 'rev-mismatch' : null
          if (refused) {
            if (!this.pending.get(k)?.some((c) => c.kind === 'reject-commit')) {
              this.push(source, evt.seq, { kind: 'reject-commit', rejection: { reason: refused, collection: '', uri: `at://${evt.did}` } })
            }
            return
          }
          // `since` and `prevData` are not in the event: they are taken from the frame when the event is committed.
          change = { kind: 'commit', did: evt.did, link: { rev: evt.rev, prevData: null, data }, ops: [], rejects: [] }
          this.push(source, evt.seq, change)
          // First commit applied for this repo (it may be known already, only as marked for a resync).
          if (!store.getRev(evt.did)) this.push(source, evt.seq, { kind: 'handle', did: evt.did, handle: await this.verifiedHandle(evt.did) })
        }
        const uri = evt.uri.toString()
        if (evt.event === 'delete') {
          change.ops.push({ action: 'delete', uri })
          return
        }
        const rejection = checkRecord(evt.collection, uri, evt.record, evt.blocks.get(evt.cid)?.length ?? 0)
        if (rejection) {
          change.rejects.push(rejection)
          // The repo no longer holds a valid version of this record: drop any older one.
          change.ops.push({ action: 'delete', uri })
          return
        }
        change.ops.push({ action: evt.event, uri, did: evt.did, collection: evt.collection, rkey: evt.rkey, cid: evt.cid.toString(), record: evt.record })
        return
      }
      case 'account':
        return this.handleAccount(source, evt.seq, evt.did, evt.active, evt.status ?? null)
      case 'identity':
        // Handles are verified both ways by us (the library is told not to), with the DID cache refreshed.
        if (store.isKnown(evt.did)) this.push(source, evt.seq, { kind: 'handle', did: evt.did, handle: await this.verifiedHandle(evt.did, true) })
        return
      case 'sync':
        // A #sync frame is not signature-checked by the library: it is only a
        // trigger to fetch and verify the whole repo from its PDS. Only for
        // repos we index: the relay announces every new account this way.
        if (store.isKnown(evt.did)) await this.resyncInto(source, evt.seq, evt.did)
        return
    }
  }

  private async handleAccount(source: string, seq: number, did: string, active: boolean, status: string | null) {
    const { store, idResolver } = this.opts
    // Accounts we hold nothing of cost nothing: the full relay carries many.
    if (!store.isKnown(did)) return
    if (active) {
      this.push(source, seq, { kind: 'status', did, active: true, status: null })
      return
    }
    if (status === 'deleted' || status === 'takendown') {
      // #account frames are unsigned: confirm with the account's PDS before purging.
      const confirmed = await getRepoStatus(idResolver, did, this.opts.fetch)
      if (!confirmed) {
        // Keep the state, and check again later through the resync path.
        log.warn('account event not confirmed (PDS unreachable); state kept, will recheck', { did, status })
        this.push(source, seq, { kind: 'needs-resync', did })
        return
      }
      if (!confirmed.exists || confirmed.status === 'deleted' || confirmed.status === 'takendown') {
        this.push(source, seq, { kind: 'purge', did })
      } else {
        this.push(source, seq, { kind: 'status', did, active: confirmed.active, status: confirmed.active ? null : (confirmed.status ?? status) })
      }
      return
    }
    // deactivated, suspended, or an unknown status: hide, keep.
    this.push(source, seq, { kind: 'status', did, active: false, status })
  }

  private async resyncInto(source: string, seq: number, did: string) {
    try {
      const repo = await fetchRepo(this.opts.idResolver, did, this.opts.fetch)
      this.push(source, seq, { kind: 'replace', repo })
    } catch (err) {
      log.warn('resync failed; will retry', { did, err })
      this.push(source, seq, { kind: 'needs-resync', did })
    }
  }

  /** The DID document's handle if it resolves back to the DID, else null. */
  async verifiedHandle(did: string, refresh = false): Promise<string | null> {
    try {
      const data = await this.opts.idResolver.did.resolveAtprotoData(did, refresh)
      const back = await this.opts.idResolver.handle.resolve(data.handle)
      return back === did ? data.handle : null
    } catch (err) {
      log.debug('handle not verified', { did, err })
      return null
    }
  }

  /** Applies what an event collected, and the cursor, in one transaction. */
  private commit(source: string, seq: number, cursor: number | undefined, claims: Sub['claims'], frames: Sub['frames']) {
    this.stats.events++
    const k = this.key(source, seq)
    let changes = this.pending.get(k)
    this.pending.delete(k)
    const claimed = claims.get(seq)
    if (claimed) {
      claims.delete(seq)
      changes = withUnverifiedOps(claimed, changes)
    }
    const frame = frames.get(seq)
    if (frame) {
      frames.delete(seq)
      changes = this.followChain(frame, changes, claimed !== undefined)
    }
    if (!changes) {
      if (cursor !== undefined) this.unsavedCursors.set(source, cursor)
      return
    }
    const { store } = this.opts
    const unsaved = this.unsavedCursors.get(source)
    const save = cursor === undefined ? unsaved : unsaved === undefined ? cursor : Math.max(cursor, unsaved)
    store.txGrouped(() => {
      for (const c of changes) this.apply(c)
      if (save !== undefined) {
        store.setCursor(source, save)
        store.flushHeads()
      }
    })
    this.commitGroupSoon()
    if (save !== undefined) this.unsavedCursors.delete(source)
    if (this.gapFound) {
      this.gapFound = false
      this.resyncSoon()
    }
  }

  /**
   * Places a commit frame in its repo's chain. A commit we apply carries the
   * frame's `since` and `prevData` to the store, which judges it in the
   * event's transaction. A commit of a tracked repo with no op of ours moves
   * only the repo's head (in memory, written with the cursor), or, when it
   * does not follow the head, becomes a gap: without this every commit of
   * ours after one of another collection would look like a gap.
   */
  private followChain(frame: CommitFrame, changes: Change[] | undefined, claimed: boolean): Change[] | undefined {
    const commit = changes?.find((c): c is Extract<Change, { kind: 'commit' }> => c.kind === 'commit')
    if (commit) {
      commit.link.since = sinceOf(frame)
      commit.link.prevData = prevDataOf(frame)
      return changes
    }
    // A commit touching dev.cocore refused whole, or none of whose ops was proven: no link of the chain.
    if (claimed || changes) return changes
    const { repo, rev } = frame
    const { store } = this.opts
    // Most commits on a relay are of repos we do not index: they cost a set lookup.
    if (typeof repo !== 'string' || !store.isTracked(repo)) return changes
    // Not validated by the library (see skipValidationOfForeignCommits): a garbled frame moves nothing.
    if (typeof rev !== 'string' || !TID.is(rev) || revTime(rev) > Date.now() + MAX_CLOCK_SKEW_MS) return changes
    const verdict = store.followForeignCommit(repo, rev, sinceOf(frame), () => prevDataOf(frame))
    return verdict === 'gap' ? [{ kind: 'gap', did: repo }] : changes
  }

  private apply(c: Change) {
    const { store } = this.opts
    switch (c.kind) {
      case 'commit': {
        const verdict = store.applyLinkedCommit(c.did, c.link, c.ops)
        if (verdict === 'stale') {
          // Replayed or out of order: not applied, and counted (replays after a restart count too).
          this.stats.staleCommits++
          this.reject({ reason: 'stale-rev', collection: '', uri: `at://${c.did}` })
          return
        }
        this.stats.commitsApplied++
        for (const op of c.ops) op.action === 'delete' ? this.stats.recordsDeleted++ : this.stats.recordsWritten++
        for (const r of c.rejects) this.reject(r)
        // Applied (it is signed and verified), but what it was built on was not seen here.
        if (verdict === 'gap') this.gap(c.did)
        return
      }
      case 'gap':
        return this.gap(c.did)
      case 'reject-commit':
        return this.reject(c.rejection)
      case 'purge':
        this.stats.purged += store.purge(c.did)
        log.info('account purged', { did: c.did })
        return
      case 'status':
        return store.setStatus(c.did, c.active, c.status)
      case 'handle':
        return store.setHandle(c.did, c.handle)
      case 'replace':
        return this.applyRepo(c.repo)
      case 'needs-resync':
        return store.markResync(c.did)
    }
  }

  /** Events of the repo were missed: counted, and the repo is fetched whole from its PDS (`retryOnce`). */
  private gap(did: string) {
    this.stats.gaps++
    this.reject({ reason: 'gap', collection: '', uri: `at://${did}` })
    this.opts.store.markResync(did)
    this.gapFound = true
    log.warn('gap in a repo\'s commits (events missed); resyncing it from its PDS', { did })
  }

  private reject(r: Rejection) {
    this.stats.rejected++
    this.opts.store.reject(r.reason, r.collection, r.uri)
  }

  /** Replaces a repo's rows with a verified snapshot. Must run inside a transaction. */
  applyRepo(repo: FetchedRepo): void {
    const { store } = this.opts
    const last = store.getRev(repo.did)
    // Live commits newer than the snapshot already landed: the snapshot is stale.
    if (last && repo.rev < last) return
    const writes: RecordWrite[] = []
    for (const r of repo.records) {
      const rejection = checkRecord(r.collection, r.uri, r.record, r.size, r.cid)
      if (rejection) this.reject(rejection)
      else writes.push(r)
    }
    store.replaceRepo(repo.did, repo.rev, repo.data, writes)
    this.stats.resyncs++
  }

  private retryResyncs(): Promise<void> {
    this.retrying ??= (async () => {
      do {
        this.retryAgain = false
        await this.retryOnce()
      } while (this.retryAgain && !this.stopping)
    })().finally(() => (this.retrying = null))
    return this.retrying
  }

  /** Resyncs marked repos now rather than at the next tick, after the round under way if there is one. */
  private resyncSoon(): void {
    if (this.stopping) return
    if (this.retrying) this.retryAgain = true
    else void this.retryResyncs()
  }

  private async retryOnce(): Promise<void> {
    const { store, idResolver } = this.opts
    for (const did of store.reposNeedingResync()) {
      if (this.stopping) return
      try {
        const repo = await fetchRepo(idResolver, did, this.opts.fetch)
        // Re-check inside the transaction: a purge may have happened while fetching.
        store.tx(() => {
          if (store.needsResync(did)) this.applyRepo(repo)
        })
      } catch (err) {
        if (err instanceof RepoFetchError && err.gone) await this.confirmGone(did)
        else log.debug('resync retry failed', { did, err })
      }
    }
  }

  /** A repo its PDS no longer serves: purge once the PDS confirms the account is deleted or taken down. */
  private async confirmGone(did: string): Promise<void> {
    const status = await getRepoStatus(this.opts.idResolver, did, this.opts.fetch)
    if (status && (!status.exists || status.status === 'deleted' || status.status === 'takendown')) {
      this.opts.store.tx(() => this.apply({ kind: 'purge', did }))
    }
  }

  private onError(source: string, err: Error) {
    if (err instanceof FirehoseParseError) {
      // Called within the event's handler: what is pushed here lands in the event's transaction.
      const evt = err.event as { $type?: unknown; repo?: string; did?: string; seq?: number; ops?: { path?: unknown }[] }
      if (typeof evt.seq !== 'number') return log.warn('unparsable event', { source, err: err.cause as Error })
      if (evt.$type === SYNC_TYPE && evt.did) {
        // A #sync whose blocks do not parse: refused, yet it still announces a new state of the
        // repo, so a repo we index is fetched and verified from its PDS, as for any #sync.
        this.push(source, evt.seq, { kind: 'reject-commit', rejection: { reason: 'unverifiable-sync', collection: '', uri: `at://${evt.did}` } })
        if (this.opts.store.isKnown(evt.did)) this.push(source, evt.seq, { kind: 'needs-resync', did: evt.did })
        return log.warn('#sync could not be parsed', { source, did: evt.did, err: err.cause as Error })
      }
      const did = evt.repo
      // Identity events fail to parse when the DID does not resolve now: not the event's fault.
      if (!did) return log.warn('event could not be parsed', { source, err: err.cause as Error })
      // Someone else's commit (a malformed op path fails before the library filters ops): not ours to count or
      // resync, nor a link of the repo's chain.
      if (!evt.ops?.some((op) => typeof op?.path === 'string' && op.path.startsWith(NSID_PREFIX))) {
        this.subs.find((s) => s.source === source)?.frames.delete(evt.seq)
        return log.debug('foreign commit could not be parsed', { source, did, err: err.cause as Error })
      }
      const uri = `at://${did}`
      if (err.cause instanceof RepoVerificationError) {
        // The signature (after one key refresh) or the commit's DID is wrong: rejected.
        this.push(source, evt.seq, { kind: 'reject-commit', rejection: { reason: 'bad-commit', collection: '', uri } })
        log.warn('commit failed verification; rejected', { source, did, err: err.cause })
      } else if (err.cause instanceof DidNotFoundError) {
        // The DID directory says positively that this DID does not exist: nothing to fetch later either.
        this.push(source, evt.seq, { kind: 'reject-commit', rejection: { reason: 'unresolvable-did', collection: '', uri } })
        log.warn('commit of a DID that does not exist; rejected', { source, did })
      } else {
        // Blocks missing, tampered or undecodable, or the DID's key could not be resolved:
        // refused now, and the whole repo is fetched and verified later, so a genuine
        // commit damaged on the way is not lost.
        this.push(source, evt.seq, { kind: 'reject-commit', rejection: { reason: 'unverifiable-commit', collection: '', uri } })
        this.push(source, evt.seq, { kind: 'needs-resync', did })
        log.warn('commit could not be verified; repo marked for resync', { source, did, err: err.cause as Error })
      }
    } else if (err instanceof FirehoseValidationError) {
      // Decoded, but not a valid event (a known type with missing or malformed fields).
      this.opts.store.reject('invalid-frame', '', null)
      this.stats.rejected++
      log.warn('invalid firehose frame refused', { source })
    } else if (err instanceof FirehoseSubscriptionError) {
      // The stream broke; the library resubscribes from the cursor after a pause.
      const reason = streamBreakReason(err.cause)
      if (reason) {
        this.opts.store.reject(reason, '', null)
        this.stats.rejected++
      }
      log.warn('firehose stream broke; resubscribing', { source, reason, err: err.cause as Error })
    } else {
      log.warn('firehose error', { source, err })
    }
  }
}
