/**
 * An `EventRunner` for `@atproto/sync`'s Firehose that makes the index
 * exactly-once: events of one repo run in order, repos run concurrently, and
 * each event's rows are committed together with the cursor, which is the
 * highest seq below which every event has completed.
 *
 * Why not MemoryRunner: it reports the cursor after the fact (`setCursor`),
 * outside the transaction of the rows, so a crash between the two either
 * loses events or applies them twice.
 */
import type { EventRunner } from '@atproto/sync'

/** Seqs in arrival order; completing one returns the new consecutive high-water mark, if it moved. */
class ConsecutiveSeqs {
  private readonly items: { seq: number; done: boolean }[] = []
  private head = 0
  push(seq: number) {
    const item = { seq, done: false }
    this.items.push(item)
    return item
  }
  /** The high-water mark completing `item` would give, without completing it. */
  peekComplete(item: { done: boolean }): number | undefined {
    let last: number | undefined
    for (let i = this.head; i < this.items.length; i++) {
      const it = this.items[i]!
      if (!it.done && it !== item) break
      last = it.seq
    }
    return last
  }
  complete(item: { done: boolean }): number | undefined {
    item.done = true
    let last: number | undefined
    while (this.head < this.items.length && this.items[this.head]!.done) last = this.items[this.head++]!.seq
    if (this.head > 1024) {
      this.items.splice(0, this.head)
      this.head = 0
    }
    return last
  }
  get pending(): number {
    return this.items.length - this.head
  }
}

const nothing = async (): Promise<void> => {}

export interface OrderedRunnerOpts {
  /** Cursor to resume from (read from the database at start). */
  startCursor: number | undefined
  /**
   * Runs after an event's handler: apply what it collected for `seq` and, in
   * the same transaction, persist `cursor` when defined.
   */
  commit: (seq: number, cursor: number | undefined) => void
  /** An event that will not be committed (runner closed or failed): drop what it collected. */
  discard: (seq: number) => void
  /**
   * A commit failed (disk full, database busy past its timeout...). The runner
   * stops committing, so the persisted cursor never passes the failed event;
   * the owner restarts the subscription from that cursor.
   */
  onFatal: (err: unknown) => void
  /** Events processed at once across repos. */
  concurrency?: number
}

export class OrderedRunner implements EventRunner {
  private cursor: number | undefined
  private readonly seqs = new ConsecutiveSeqs()
  private readonly partitions = new Map<string, Promise<void>>()
  private readonly opts: OrderedRunnerOpts
  private active = 0
  private readonly waiting: (() => void)[] = []
  private closed = false
  private idleWaiters: (() => void)[] = []

  constructor(opts: OrderedRunnerOpts) {
    this.opts = opts
    this.cursor = opts.startCursor
  }

  getCursor(): number | undefined {
    return this.cursor
  }

  get backlog(): number {
    return this.seqs.pending
  }

  trackEvent(did: string, seq: number, handler: () => Promise<void>): Promise<void> {
    if (this.closed) return Promise.resolve()
    const item = this.seqs.push(seq)
    const slot: { run?: Promise<void> } = {}
    // Never rejects: a failure of one event must not stall the rest of its repo's chain.
    const task = async () => {
      // Most events find a free slot: no promise is made for them.
      if (!this.tryAcquire()) await new Promise<void>((resolve) => this.waiting.push(resolve))
      try {
        if (this.closed) return this.opts.discard(seq)
        await handler()
        if (this.closed) return this.opts.discard(seq)
        this.commit(seq, item)
      } catch (err) {
        this.fail(seq, err)
      } finally {
        this.release()
        if (this.partitions.get(did) === slot.run) {
          this.partitions.delete(did)
          if (this.partitions.size === 0) for (const w of this.idleWaiters.splice(0)) w()
        }
      }
    }
    const prev = this.partitions.get(did)
    const run = prev ? prev.then(task) : task()
    slot.run = run
    this.partitions.set(did, run)
    return run
  }

  /**
   * An event with nothing to await (all it does is decided when it is
   * committed): committed at once, without a task, when its repo has no event
   * in flight; otherwise queued behind them like any event, so a repo's events
   * are still committed in order.
   */
  trackDone(did: string, seq: number): void {
    if (this.closed) return
    if (this.partitions.has(did)) {
      void this.trackEvent(did, seq, nothing)
      return
    }
    const item = this.seqs.push(seq)
    try {
      this.commit(seq, item)
    } catch (err) {
      this.fail(seq, err)
    }
  }

  /** Commits a finished event with the cursor it completes, if any, and moves the cursor. */
  private commit(seq: number, item: { done: boolean }): void {
    const cursor = this.seqs.peekComplete(item)
    this.opts.commit(seq, cursor)
    this.seqs.complete(item)
    if (cursor !== undefined) this.cursor = Math.max(this.cursor ?? cursor, cursor)
  }

  /** A commit failed: nothing more is committed, so the persisted cursor never passes the failed event. */
  private fail(seq: number, err: unknown): void {
    this.closed = true
    this.opts.discard(seq)
    this.opts.onFatal(err)
  }

  private tryAcquire(): boolean {
    if (this.active >= (this.opts.concurrency ?? 32)) return false
    this.active++
    return true
  }
  private release() {
    const next = this.waiting.shift()
    // The slot passes straight to the next waiting event.
    if (next) next()
    else this.active--
  }

  /** Resolves when every tracked event has finished. */
  async idle(): Promise<void> {
    if (this.partitions.size === 0) return
    await new Promise<void>((resolve) => this.idleWaiters.push(resolve))
  }

  /** Stops taking events and waits for those under way. */
  async close(): Promise<void> {
    this.closed = true
    await Promise.allSettled([...this.partitions.values()])
  }
}
