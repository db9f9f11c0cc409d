/**
 * "Wipe all my data": a durable job that first freezes the account here (its
 * API keys revoked, its console sessions ended, so nothing acts for it
 * meanwhile), deletes every dev.cocore record of the account from its PDS
 * (the source of truth first), checks that none is left, then removes
 * everything this service holds about the account, and revokes the OAuth
 * session last (the deletes need it). Each step is
 * idempotent and its progress is saved, so a restarted process resumes where
 * it stopped. Never "done" on a partial run.
 */
import { randomBytes } from 'node:crypto'
import type { Db } from '../src/db/index.ts'
import { NSID_PREFIX } from '../src/lexicon/generated/ids.ts'
import { consoleLogger as log } from '../src/logger.ts'
import type { Publisher } from './publisher.ts'

/** The PDS's limit for one applyWrites call. */
const BATCH = 200
/** One PDS call may take this long before it counts as a (transient) failure. */
const ATTEMPT_TIMEOUT_MS = 30_000
/** Kept after the job ends so the user can read the report. */
export const REPORT_TTL_MS = 7 * 24 * 3600 * 1000

export interface WipeReport {
  /** Records deleted from the PDS, per collection. */
  removed: Record<string, number>
  /** Collections whose records could not all be deleted, with the reason. */
  failed: Record<string, string>
  /** Rows removed from this service, per kind. */
  local: Record<string, number>
  /** Records found after the deletes (must be none for "done"). */
  remaining: Record<string, number>
  kept: string[]
  error?: string
  /** The batch sent to the PDS and not yet counted: settled on resume, so a crash cannot skew the counts. */
  inFlight?: { collection: string; rkeys: string[] }
}

export interface WipeJob {
  id: string
  did: string
  status: 'running' | 'done' | 'incomplete'
  phase: 'pds' | 'verify' | 'local' | 'finished'
  report: WipeReport
  createdAt: string
  updatedAt: string
}

export interface WipeDeps {
  db: Db
  publisher: Publisher
  /** Removes the account's rows from the AppView index; null when this process has no AppView. */
  purgeIndex: ((did: string) => Promise<number> | number) | null
  revokeOAuth: (did: string) => Promise<void>
  /** Backoff for transient failures, and the time limit of one attempt; tests shorten them. */
  retry?: { firstMs: number; maxMs: number; giveUpAfterMs: number; attemptMs?: number }
}

const KEPT = [
  "Records about you in other people's repos (for example friend records that name you, or receipts of jobs you ran on someone's machine) live on their PDSes; only they can delete them.",
  "Settlements and grants the exchange published on its own repo stay there: they are its books. They hold your DID and amounts, not your prompts.",
  "The exchange's ledger keeps the token movements that name your DID (amounts and record links, no content): they are financial records, and removing one side of a movement would unbalance the books of the other accounts.",
  'This report (your DID and the counts above) is kept for 7 days so you can read it, then deleted.',
  'One activity entry saying that this wipe happened (when, and these counts; no content, no IP) is kept for security for the same 7 days, then deleted.',
]

/** Network failures, timeouts, 5xx and 429 are worth retrying; anything else is a verdict. */
function isTransient(err: unknown): boolean {
  const e = err as { status?: number; error?: string; message?: string; cause?: unknown; name?: string }
  if (e?.name === 'TimeoutError' || e?.name === 'AbortError' || (e?.cause as { name?: string })?.name === 'TimeoutError') return true
  if (typeof e?.status === 'number') return e.status >= 500 || e.status === 429 || e.status === 0
  return /fetch failed|ECONNREFUSED|ECONNRESET|socket|timeout|network|UpstreamFailure/i.test(`${e?.message} ${String(e?.cause ?? '')}`)
}

export class Wiper {
  private readonly deps: WipeDeps
  private readonly running = new Map<string, Promise<void>>()
  private stopped = false

  constructor(deps: WipeDeps) {
    this.deps = deps
  }

  /** Starts a wipe for the account (or returns the one under way). */
  start(did: string): WipeJob {
    const existing = this.activeJob(did)
    if (existing) return existing
    const now = new Date().toISOString()
    const job: WipeJob = { id: randomBytes(16).toString('base64url'), did, status: 'running', phase: 'pds', report: { removed: {}, failed: {}, local: {}, remaining: {}, kept: KEPT }, createdAt: now, updatedAt: now }
    const c = this.deps.db.$client
    // @NOTE Order matters here: the freeze commits with the job, before any PDS call, so no key or
    // console session can act for the account during the wipe (sign-in is refused while it runs).
    c.transaction(() => {
      c.prepare('UPDATE api_keys SET revoked_at = ? WHERE did = ? AND revoked_at IS NULL').run(now, did)
      job.report.local.consoleSessions = c.prepare('DELETE FROM console_sessions WHERE did = ?').run(did).changes
      c.prepare('INSERT INTO wipe_jobs (id, did, status, phase, report, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)').run(job.id, did, job.status, job.phase, JSON.stringify(job.report), now, now)
    })()
    this.run(job.id)
    return job
  }

  get(id: string): WipeJob | null {
    const row = this.deps.db.$client.prepare('SELECT * FROM wipe_jobs WHERE id = ?').get(id) as
      | { id: string; did: string; status: WipeJob['status']; phase: WipeJob['phase']; report: string; created_at: string; updated_at: string }
      | undefined
    return row ? { id: row.id, did: row.did, status: row.status, phase: row.phase, report: JSON.parse(row.report), createdAt: row.created_at, updatedAt: row.updated_at } : null
  }

  activeJob(did: string): WipeJob | null {
    const id = this.deps.db.$client.prepare("SELECT id FROM wipe_jobs WHERE did = ? AND status = 'running'").pluck().get(did) as string | undefined
    return id ? this.get(id) : null
  }

  /** Forgets reports (and their wipe-end entries) older than 7 days. */
  purgeExpired(): void {
    const cutoff = new Date(Date.now() - REPORT_TTL_MS).toISOString()
    this.deps.db.$client.prepare("DELETE FROM wipe_jobs WHERE status != 'running' AND updated_at < ?").run(cutoff)
    this.deps.db.$client.prepare("DELETE FROM audit_log WHERE action = 'wipe-end' AND at < ?").run(cutoff)
  }

  /** Resumes every job a previous process left running, and forgets old reports. */
  resumeAll(): void {
    this.purgeExpired()
    for (const id of this.deps.db.$client.prepare("SELECT id FROM wipe_jobs WHERE status = 'running'").pluck().all() as string[]) this.run(id)
  }

  /** Resolves when the job ends (in this process). */
  async wait(id: string): Promise<WipeJob | null> {
    await this.running.get(id)
    return this.get(id)
  }

  async stop(): Promise<void> {
    this.stopped = true
    await Promise.allSettled(this.running.values())
  }

  private run(id: string): void {
    if (this.running.has(id)) return
    const p = this.execute(id)
      // The job id is the key to its report: not logged.
      .catch((err) => log.error('wipe job crashed; it resumes at next start', { err: err as Error }))
      .finally(() => this.running.delete(id))
    this.running.set(id, p)
  }

  private save(job: WipeJob): void {
    job.updatedAt = new Date().toISOString()
    this.deps.db.$client.prepare('UPDATE wipe_jobs SET status = ?, phase = ?, report = ?, updated_at = ? WHERE id = ?').run(job.status, job.phase, JSON.stringify(job.report), job.updatedAt, job.id)
  }

  private async execute(id: string): Promise<void> {
    const job = this.get(id)
    if (!job || job.status !== 'running') return
    try {
      await this.steps(job)
    } catch (err) {
      if (this.stopped) return
      // Not transient (e.g. the console's access to the PDS was revoked): say so, never "done".
      job.status = 'incomplete'
      job.report.error = `The wipe stopped: ${(err as Error).message}. Sign in again and start the wipe again to finish it.`
      this.save(job)
    }
  }

  private async steps(job: WipeJob): Promise<void> {
    if (job.report.inFlight) await this.settleInFlight(job)
    for (let round = 0; round < 3 && (job.phase === 'pds' || job.phase === 'verify'); round++) {
      if (job.phase === 'pds') {
        await this.deleteFromPds(job)
        job.phase = 'verify'
        this.save(job)
      }
      if (this.stopped) return
      job.report.remaining = await this.withRetry((signal) => this.countRemaining(job.did, signal))
      // Anything left (written meanwhile, or a failed batch): another round of deletes.
      job.phase = Object.keys(job.report.remaining).length === 0 ? 'local' : 'pds'
      this.save(job)
    }
    if (job.phase !== 'local') {
      job.status = 'incomplete'
      job.report.error = 'Some records could not be deleted from your PDS; nothing else was removed. Start the wipe again to retry.'
      this.save(job)
      return
    }
    await this.removeLocal(job)
    job.phase = 'finished'
    job.status = 'done'
    this.save(job)
  }

  /** Deletes every record of every dev.cocore collection the repo actually has, 200 per call. */
  private async deleteFromPds(job: WipeJob): Promise<void> {
    const did = job.did
    const collections = await this.withRetry((signal) => this.collections(did, signal))
    for (const collection of collections) {
      delete job.report.failed[collection]
      try {
        const { firstMs, maxMs, giveUpAfterMs } = this.retryOpts()
        let wait = firstMs
        let failingSince = 0
        for (;;) {
          if (this.stopped) return
          // A batch whose outcome is unknown (the response was lost): count what of it is gone,
          // then list again. Resending it would ask the PDS to delete records that are gone.
          if (job.report.inFlight) await this.settleInFlight(job)
          const rkeys = await this.withRetry((signal) => this.listRkeys(did, collection, BATCH, signal))
          if (rkeys.length === 0) break
          job.report.inFlight = { collection, rkeys }
          this.save(job)
          try {
            await this.attempt(async (signal) => {
              const agent = await this.deps.publisher.agent(did)
              await agent.com.atproto.repo.applyWrites(
                { repo: did, writes: rkeys.map((rkey) => ({ $type: 'com.atproto.repo.applyWrites#delete', collection, rkey })) },
                { signal },
              )
            })
          } catch (err) {
            failingSince ||= Date.now()
            if (!isTransient(err) || Date.now() - failingSince > giveUpAfterMs) throw err
            log.info('wipe: batch failed, will check and retry', { waitMs: wait, err: err as Error })
            await new Promise((r) => setTimeout(r, wait))
            wait = Math.min(maxMs, wait * 2)
            continue
          }
          job.report.removed[collection] = (job.report.removed[collection] ?? 0) + rkeys.length
          delete job.report.inFlight
          this.save(job)
          wait = firstMs
          failingSince = 0
        }
      } catch (err) {
        job.report.failed[collection] = (err as Error).message
        this.save(job)
      }
    }
  }

  /** A batch a previous process sent without recording the outcome: count what is gone. */
  private async settleInFlight(job: WipeJob): Promise<void> {
    const { collection, rkeys } = job.report.inFlight!
    let gone = 0
    // One look-up per record of the batch (at most 200): bounded, whatever the collection's size.
    for (const rkey of rkeys) {
      const exists = await this.withRetry(async (signal) => {
        const agent = await this.deps.publisher.agent(job.did)
        try {
          await agent.com.atproto.repo.getRecord({ repo: job.did, collection, rkey }, { signal })
          return true
        } catch (err) {
          if ((err as { error?: string }).error === 'RecordNotFound') return false
          throw err
        }
      })
      if (!exists) gone++
    }
    if (gone) job.report.removed[collection] = (job.report.removed[collection] ?? 0) + gone
    delete job.report.inFlight
    this.save(job)
  }

  private async collections(did: string, signal?: AbortSignal): Promise<string[]> {
    const agent = await this.deps.publisher.agent(did)
    const res = await agent.com.atproto.repo.describeRepo({ repo: did }, { signal })
    return res.data.collections.filter((c) => c.startsWith(NSID_PREFIX))
  }

  private async listRkeys(did: string, collection: string, max: number, signal?: AbortSignal): Promise<string[]> {
    const agent = await this.deps.publisher.agent(did)
    const out: string[] = []
    let cursor: string | undefined
    while (out.length < max) {
      const page = await agent.com.atproto.repo.listRecords({ repo: did, collection, limit: Math.min(100, max - out.length), cursor }, { signal })
      out.push(...page.data.records.map((r) => r.uri.split('/').pop()!))
      if (page.data.records.length === 0 || !page.data.cursor) break
      cursor = page.data.cursor
    }
    return out
  }

  private async countRemaining(did: string, signal?: AbortSignal): Promise<Record<string, number>> {
    const left: Record<string, number> = {}
    for (const c of await this.collections(did, signal)) {
      const n = (await this.listRkeys(did, c, 100, signal)).length
      if (n > 0) left[c] = n
    }
    return left
  }

  /** Everything the service holds about the account, then the OAuth session. */
  private async removeLocal(job: WipeJob): Promise<void> {
    const did = job.did
    if (this.deps.purgeIndex) job.report.local.indexedRecords = await this.deps.purgeIndex(did)
    const c = this.deps.db.$client
    c.transaction(() => {
      job.report.local.apiKeys = c.prepare('DELETE FROM api_keys WHERE did = ?').run(did).changes
      // Ended when the wipe started; none since (sign-in is refused during a wipe).
      job.report.local.consoleSessions = (job.report.local.consoleSessions ?? 0) + c.prepare('DELETE FROM console_sessions WHERE did = ?').run(did).changes
      job.report.local.usageCounters = c.prepare('DELETE FROM usage_daily WHERE did = ?').run(did).changes
      job.report.local.auditEntries = c.prepare('DELETE FROM audit_log WHERE did = ?').run(did).changes
    })()
    this.save(job)
    // Counted before the revoke, which removes the stored session itself.
    const held = c.prepare('SELECT count(*) FROM oauth_sessions WHERE did = ?').pluck().get(did) as number
    await this.deps.revokeOAuth(did).catch((err) => log.warn('OAuth revoke at the PDS failed; the local session is deleted anyway', { err: err as Error }))
    c.prepare('DELETE FROM oauth_sessions WHERE did = ?').run(did)
    job.report.local.oauthSessions = held
    // After every earlier entry is gone: the one record that the wipe ran.
    c.prepare("INSERT INTO audit_log (did, action, detail, ip_hash, at) VALUES (?, 'wipe-end', ?, NULL, ?)").run(
      did,
      JSON.stringify({ job: job.id, removed: job.report.removed }),
      new Date().toISOString(),
    )
  }

  private retryOpts() {
    return { firstMs: 500, maxMs: 10_000, giveUpAfterMs: 3600_000, attemptMs: ATTEMPT_TIMEOUT_MS, ...this.deps.retry }
  }

  /** One try of a PDS call, with a time limit (raced as well: not every step, e.g. a token refresh, takes the signal). */
  private attempt<T>(fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
    const signal = AbortSignal.timeout(this.retryOpts().attemptMs)
    return Promise.race([fn(signal), new Promise<never>((_, reject) => signal.addEventListener('abort', () => reject(signal.reason), { once: true }))])
  }

  /** Runs `fn` until it succeeds, backing off on transient failures. For idempotent reads. */
  private async withRetry<T>(fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
    const { firstMs, maxMs, giveUpAfterMs } = this.retryOpts()
    const deadline = Date.now() + giveUpAfterMs
    for (let wait = firstMs; ; wait = Math.min(maxMs, wait * 2)) {
      try {
        return await this.attempt(fn)
      } catch (err) {
        if (!isTransient(err) || Date.now() + wait > deadline || this.stopped) throw err
        log.info('wipe: transient failure, retrying', { waitMs: wait, err: err as Error })
        await new Promise((r) => setTimeout(r, wait))
      }
    }
  }
}
