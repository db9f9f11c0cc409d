/**
 * The dispatch book: the exchange's own record of every job it admitted,
 * which is the contract its settlements are judged against. Nothing in it
 * comes from a provider's or requester's word alone: the job and
 * authorization are kept as the exchange built them, the machine is the one
 * it sent the job to, the attestation key is the one that answered that
 * connection's challenge, the witness is what its countersignature for that
 * machine signed, and the counts are what it relayed.
 *
 * Admission is one SQLite transaction: the daily-token reservation and the
 * balance check, the row, and a hold of the job's ceiling on the requester's
 * balance. N jobs admitted at once can never commit more than the balance
 * (and the ledger's CHECK refuses it anyway). The hold is released when the
 * job settles, is refused, never started, failed, or passes its deadline.
 */
import type { UsageCounters } from '../api-keys.ts'
import type { Db } from '../../src/db/index.ts'
import type { Witness } from './brokerage.ts'
import type { JobRecords } from '../publisher.ts'
import { AdmissionError } from './admission.ts'
import { InsufficientFundsError, type Ledger } from './ledger.ts'
import { maxPrice, type EconomyPolicy } from './policy.ts'

export type JobState = 'admitted' | 'running' | 'completed' | 'cancelled' | 'failed' | 'unstarted' | 'settled' | 'refused' | 'expired'

/** States in which a receipt may still come and the hold stays. */
export const OPEN_STATES: readonly JobState[] = ['admitted', 'running', 'completed', 'cancelled']

export interface DispatchRow {
  jobUri: string
  jobCid: string
  authUri: string
  authCid: string
  jobRecord: Record<string, unknown>
  authRecord: Record<string, unknown>
  requesterDid: string
  model: string
  providerDid: string | null
  machine: string | null
  providerRecordUri: string | null
  attestationKey: string | null
  /** What this exchange's countersignature for the job witnessed (its nonce among it); null when it signed none. */
  witness: Witness | null
  proBono: boolean
  inputBytes: number
  maxTokensOut: number
  ceiling: number
  hold: number
  reserved: number
  state: JobState
  recorded: boolean
  reportedIn: number | null
  reportedOut: number | null
  relayedChunks: number
  relayedBytes: number
  deadline: string
  createdAt: string
}

/** What the exchange relayed of one job: reply chunks and their plaintext bytes. */
export interface Relayed {
  chunks: number
  bytes: number
}

export interface AdmitInput {
  requesterDid: string
  model: string
  records: JobRecords
  proBono: boolean
  inputBytes: number
  maxTokensOut: number
  ceiling: number
  /** When the job's records expire: the deadline is this plus the settlement grace. */
  expiresAt: string
}

export interface DispatchBookOpts {
  db: Db
  policy: EconomyPolicy
  /** The ledger, when settlements run here: holds and the admission floor apply. */
  ledger: Ledger | null
  usage: UsageCounters
  /** Tokens (in + out) one account may use per UTC day. */
  dailyTokenLimit: number
  /** How long after a job's expiry its receipt may still arrive (index lag, a PDS outage). */
  graceMs?: number
}

/**
 * Tolerances of the token rules (docs: the settlement rules table). A token
 * is at least one byte of text for the tokenizers in use, so the bytes the
 * exchange counted bound the tokens; the slack covers what no byte shows:
 * the chat template around the prompt, and end-of-turn or reasoning markers
 * an engine counts but does not emit.
 */
export const TOKENS_IN_SLACK = 512
export const TOKENS_OUT_SLACK = 16

/** The most tokens a receipt may claim for a job, by what the exchange itself saw. */
export function tokenBounds(row: Pick<DispatchRow, 'inputBytes' | 'maxTokensOut' | 'reportedIn' | 'reportedOut' | 'relayedBytes'>): { in: number; out: number } {
  const counted = { in: row.inputBytes + TOKENS_IN_SLACK, out: row.relayedBytes + TOKENS_OUT_SLACK }
  return {
    in: Math.min(counted.in, row.reportedIn ?? counted.in),
    out: Math.min(row.maxTokensOut, counted.out, row.reportedOut ?? counted.out),
  }
}

const today = () => new Date().toISOString().slice(0, 10)

export class DispatchBook {
  readonly policy: EconomyPolicy
  private readonly opts: DispatchBookOpts
  private readonly db: Db
  /** Told when a job can be judged: it completed (or was cancelled mid-reply) and its records are published. */
  onReady: ((jobUri: string) => void) | null = null

  constructor(opts: DispatchBookOpts) {
    this.opts = opts
    this.db = opts.db
    this.policy = opts.policy
  }

  get ledger(): Ledger | null {
    return this.opts.ledger
  }

  /** The most a job may cost under the policy's token rate: its input bytes bound its input tokens. */
  ceilingFor(inputBytes: number, maxTokensOut: number): number {
    return maxPrice(this.policy, { in: inputBytes, out: maxTokensOut })
  }

  /**
   * Admits a job: reserves its tokens of today's limit, checks and holds its
   * ceiling, and records it, all in one transaction. @throws AdmissionError
   */
  admit(a: AdmitInput): void {
    const c = this.db.$client
    const reserve = a.inputBytes + a.maxTokensOut
    const hold = a.proBono ? 0 : a.ceiling
    const now = new Date()
    const deadline = new Date(Date.parse(a.expiresAt) + (this.opts.graceMs ?? 3600_000)).toISOString()
    c.transaction(() => {
      this.checkQuota(a.requesterDid, reserve)
      this.checkFunds(a.requesterDid, hold)
      const ledger = this.opts.ledger
      c.prepare(
        `INSERT INTO exchange_jobs (job_uri, job_cid, auth_uri, auth_cid, job_record, auth_record, requester_did, model, pro_bono, input_bytes, max_tokens_out,
           ceiling, hold, reserved, state, deadline, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'admitted', ?, ?, ?)`,
      ).run(
        a.records.job.uri,
        a.records.job.cid,
        a.records.auth.uri,
        a.records.auth.cid,
        JSON.stringify(a.records.jobRecord),
        JSON.stringify(a.records.authRecord),
        a.requesterDid,
        a.model,
        a.proBono ? 1 : 0,
        a.inputBytes,
        a.maxTokensOut,
        a.ceiling,
        ledger ? hold : 0,
        reserve,
        deadline,
        now.toISOString(),
        now.toISOString(),
      )
      try {
        if (ledger) ledger.hold(a.requesterDid, hold)
      } catch (err) {
        if (err instanceof InsufficientFundsError) throw new AdmissionError('insufficient_quota', `this job may cost up to ${hold} tokens, more than your available balance`)
        throw err
      }
    })()
  }

  /**
   * Refuses a job that may use `reserve` tokens when today's usage and the
   * reservations of the account's jobs in flight leave fewer. @throws AdmissionError
   */
  checkQuota(did: string, reserve: number): void {
    const used = this.opts.usage.today(did)
    const pending = this.db.$client
      .prepare('SELECT COALESCE(SUM(reserved), 0) FROM exchange_jobs WHERE requester_did = ? AND reserved > 0 AND created_at >= ?')
      .pluck()
      .get(did, `${today()}T00:00:00.000Z`) as number
    const limit = this.opts.dailyTokenLimit
    const left = limit - used.tokensIn - used.tokensOut - pending
    if (reserve <= left) return
    throw new AdmissionError(
      'insufficient_quota',
      left <= 0 ? `this account used its ${limit} tokens for today (UTC)` : `this job may use up to ${reserve} tokens (its input and max_tokens), and this account has ${left} of its ${limit} left today (UTC)`,
    )
  }

  /** Refuses a job whose hold the account's available tokens cannot cover, or that would leave it under the admission floor. @throws AdmissionError */
  checkFunds(did: string, hold: number): void {
    const ledger = this.opts.ledger
    if (!ledger) return
    const available = ledger.available(did)
    if (available < this.policy.floor) throw new AdmissionError('insufficient_quota', `your available balance (${available} tokens) is under this exchange's admission floor of ${this.policy.floor}`)
    if (available < hold) throw new AdmissionError('insufficient_quota', `this job may cost up to ${hold} tokens, and your available balance is ${available}`)
  }

  /**
   * At start: jobs the last process was running when it stopped can never
   * complete here (their requesters' streams were cut), so they end as
   * failed and their holds come back. Returns how many.
   */
  recoverInterrupted(): number {
    const c = this.db.$client
    return c.transaction(() => {
      // Also a job that ended while its records' publication was still in flight: the exchange never saw them land.
      const rows = c
        .prepare("SELECT job_uri AS jobUri, requester_did AS requesterDid, hold FROM exchange_jobs WHERE state IN ('admitted', 'running') OR (state IN ('completed', 'cancelled') AND recorded = 0)")
        .all() as { jobUri: string; requesterDid: string; hold: number }[]
      const mark = c.prepare("UPDATE exchange_jobs SET state = 'failed', hold = 0, reserved = 0, updated_at = ? WHERE job_uri = ?")
      for (const r of rows) {
        mark.run(new Date().toISOString(), r.jobUri)
        this.opts.ledger?.release(r.requesterDid, r.hold)
      }
      return rows.length
    })()
  }

  /** The job is sent to this machine (again on a failover: the last one is the contract). */
  dispatched(jobUri: string, p: { did: string; machine: string; recordUri: string; attestationKey: string | null; witness?: Witness | null }): void {
    this.db.$client
      .prepare("UPDATE exchange_jobs SET provider_did = ?, machine = ?, provider_record_uri = ?, attestation_key = ?, witness = ?, state = 'running', updated_at = ? WHERE job_uri = ? AND state IN ('admitted', 'running')")
      .run(p.did, p.machine, p.recordUri, p.attestationKey, p.witness ? JSON.stringify(p.witness) : null, new Date().toISOString(), jobUri)
  }

  /** The job's records are on the requester's PDS. */
  recorded(jobUri: string): void {
    this.db.$client.prepare('UPDATE exchange_jobs SET recorded = 1, updated_at = ? WHERE job_uri = ?').run(new Date().toISOString(), jobUri)
    this.readyIf(jobUri)
  }

  private readyIf(jobUri: string): void {
    const r = this.db.$client.prepare("SELECT 1 FROM exchange_jobs WHERE job_uri = ? AND recorded = 1 AND state IN ('completed', 'cancelled')").get(jobUri)
    if (r) this.onReady?.(jobUri)
  }

  /** The provider completed the job: its reported counts and what was relayed. The reservation is reconciled (usage counts the actual tokens). */
  completed(jobUri: string, reported: { in: number; out: number }, relayed: Relayed): void {
    this.db.$client
      .prepare(
        "UPDATE exchange_jobs SET state = 'completed', reported_in = ?, reported_out = ?, relayed_chunks = ?, relayed_bytes = ?, reserved = 0, updated_at = ? WHERE job_uri = ? AND state IN ('admitted', 'running')",
      )
      .run(reported.in, reported.out, relayed.chunks, relayed.bytes, new Date().toISOString(), jobUri)
    this.readyIf(jobUri)
  }

  /**
   * The job ended without a completion. `unstarted` (no provider answered)
   * and `failed` (the provider failed, or its records were not published)
   * release the hold now: nothing is owed. `cancelled` (the requester went
   * away mid-reply) keeps it until a receipt, bounded by what was relayed.
   */
  ended(jobUri: string, how: 'unstarted' | 'failed' | 'cancelled', relayed: Relayed): void {
    const c = this.db.$client
    c.transaction(() => {
      const row = this.get(jobUri)
      if (!row || !(['admitted', 'running'] as JobState[]).includes(row.state)) return
      const release = how !== 'cancelled'
      c.prepare('UPDATE exchange_jobs SET state = ?, relayed_chunks = ?, relayed_bytes = ?, reserved = 0, hold = ?, updated_at = ? WHERE job_uri = ?').run(
        how,
        relayed.chunks,
        relayed.bytes,
        release ? 0 : row.hold,
        new Date().toISOString(),
        jobUri,
      )
      if (release) this.opts.ledger?.release(row.requesterDid, row.hold)
    })()
    if (how === 'cancelled') this.readyIf(jobUri)
  }

  /** A completed job whose records never reached the requester's PDS: no consent on record, nothing owed. */
  notRecorded(jobUri: string): void {
    const c = this.db.$client
    c.transaction(() => {
      const row = this.get(jobUri)
      if (!row || row.state !== 'completed' || row.recorded) return
      c.prepare("UPDATE exchange_jobs SET state = 'failed', hold = 0, updated_at = ? WHERE job_uri = ?").run(new Date().toISOString(), jobUri)
      this.opts.ledger?.release(row.requesterDid, row.hold)
    })()
  }

  /**
   * Closes a job (settled or refused) and releases its hold, inside the
   * caller's transaction. False when it is no longer open (decided already).
   */
  close(row: DispatchRow, state: 'settled' | 'refused'): boolean {
    const res = this.db.$client
      .prepare(`UPDATE exchange_jobs SET state = ?, hold = 0, reserved = 0, updated_at = ? WHERE job_uri = ? AND state IN (${OPEN_STATES.map(() => '?').join(', ')}) RETURNING hold`)
      .pluck()
      .all(state, new Date().toISOString(), row.jobUri, ...OPEN_STATES) as number[]
    if (res.length === 0) return false
    this.opts.ledger?.release(row.requesterDid, row.hold)
    return true
  }

  /** Jobs past their deadline with no decision: holds released, state `expired`. Returns how many. */
  expire(now = Date.now()): number {
    const c = this.db.$client
    return c.transaction(() => {
      const due = c
        .prepare(`SELECT job_uri AS jobUri, requester_did AS requesterDid, hold FROM exchange_jobs WHERE state IN (${OPEN_STATES.map(() => '?').join(', ')}) AND deadline < ?`)
        .all(...OPEN_STATES, new Date(now).toISOString()) as { jobUri: string; requesterDid: string; hold: number }[]
      const mark = c.prepare("UPDATE exchange_jobs SET state = 'expired', hold = 0, reserved = 0, updated_at = ? WHERE job_uri = ?")
      for (const r of due) {
        mark.run(new Date(now).toISOString(), r.jobUri)
        this.opts.ledger?.release(r.requesterDid, r.hold)
      }
      return due.length
    })()
  }

  get(jobUri: string): DispatchRow | undefined {
    const r = this.db.$client.prepare('SELECT * FROM exchange_jobs WHERE job_uri = ?').get(jobUri) as Record<string, unknown> | undefined
    return r ? toRow(r) : undefined
  }

  /** Tokens held over every open job (equal to the ledger's held total, always). */
  holdsTotal(): number {
    return this.db.$client.prepare('SELECT COALESCE(SUM(hold), 0) FROM exchange_jobs').pluck().get() as number
  }
}

function toRow(r: Record<string, unknown>): DispatchRow {
  return {
    jobUri: r.job_uri as string,
    jobCid: r.job_cid as string,
    authUri: r.auth_uri as string,
    authCid: r.auth_cid as string,
    jobRecord: JSON.parse(r.job_record as string) as Record<string, unknown>,
    authRecord: JSON.parse(r.auth_record as string) as Record<string, unknown>,
    requesterDid: r.requester_did as string,
    model: r.model as string,
    providerDid: (r.provider_did as string | null) ?? null,
    machine: (r.machine as string | null) ?? null,
    providerRecordUri: (r.provider_record_uri as string | null) ?? null,
    attestationKey: (r.attestation_key as string | null) ?? null,
    witness: r.witness ? (JSON.parse(r.witness as string) as Witness) : null,
    proBono: r.pro_bono === 1,
    inputBytes: r.input_bytes as number,
    maxTokensOut: r.max_tokens_out as number,
    ceiling: r.ceiling as number,
    hold: r.hold as number,
    reserved: r.reserved as number,
    state: r.state as JobState,
    recorded: r.recorded === 1,
    reportedIn: (r.reported_in as number | null) ?? null,
    reportedOut: (r.reported_out as number | null) ?? null,
    relayedChunks: r.relayed_chunks as number,
    relayedBytes: r.relayed_bytes as number,
    deadline: r.deadline as string,
    createdAt: r.created_at as string,
  }
}
