/**
 * The settlement pipeline. A receipt is judged against the dispatch book
 * (dispatch-book.ts), the exchange's own record of the job, never against
 * what the requester or the provider says alone:
 *   1. the job is one this exchange dispatched, to the repo the receipt is
 *      in, and the receipt is signed by the attestation key that answered
 *      that connection's challenge;
 *   2. its tokens are within what the job allowed and what was relayed, its
 *      price within the policy's rate and the ceiling held;
 *   3. the job and authorization are the ones stored at dispatch, so a
 *      requester deleting them afterwards strands nothing;
 *   4. a brokerage countersignature it carries verifies against its
 *      authority's DID document (fetched for another brokerage's: the receipt
 *      waits for it), and one of this exchange's own is the one it signed for
 *      that job: the machine and nonce in the book. None is required.
 * Then, in one SQLite transaction: the decision row (unique per receipt, one
 * settled row per job and per authorization), the hold released, the ledger
 * movement, and the signed `settlement` record in the outbox, which
 * publishes it on the exchange's repo.
 *
 * The first receipt the dispatched provider publishes for a job decides it;
 * anyone else's receipt for it is refused and changes nothing. A receipt that
 * comes before its job completed (or before the job records were published)
 * is looked at again when the job is ready, not polled.
 */
import { TID } from '@atproto/common-web'
import type { DidDocument } from '@atproto/identity'
import type { ConsoleIndex } from '../../appview/index.ts'
import { verifyReceipt } from '../../appview/verify/receipt.ts'
import { uriDid } from '../../appview/indexer/columns.ts'
import { toBytes } from '../../src/crypto/p256.ts'
import { signDetached } from '../../src/crypto/signing.ts'
import type { AuthorityResolver } from '../../src/identity/authority.ts'
import { constraintHashes } from '../../src/protocol/job-constraints.ts'
import type { Db } from '../../src/db/index.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import type { ComputeAttestation, ComputeJob, ComputePaymentAuthorization, ComputeReceipt } from '../../src/lexicon/generated/types.ts'
import { consoleLogger as log } from '../../src/logger.ts'
import { tokenBounds, type DispatchBook, type DispatchRow } from './dispatch-book.ts'
import { InsufficientFundsError, type Ledger } from './ledger.ts'
import type { Outbox } from './outbox.ts'
import { CURRENCY, feeOf, maxPrice, type EconomyPolicy, type StrongRef } from './policy.ts'
import type { SigningKey } from './signing-key.ts'

export interface SettlerOpts {
  db: Db
  index: Pick<ConsoleIndex, 'receiptsAfter' | 'receiptsForJob' | 'record'>
  book: DispatchBook
  ledger: Ledger
  outbox: Outbox
  exchangeDid: string
  policy: EconomyPolicy
  /** The published policy and attestation the settlements cite. */
  refs: { policy: StrongRef; attestation: StrongRef }
  key: SigningKey
  /** This exchange's brokerage: its own countersignatures are checked with its key, against the book. */
  brokerage?: { did: string; document: DidDocument } | null
  /** Other brokerages' DID documents (absent: their countersignatures cannot be checked, and are refused). */
  authorities?: AuthorityResolver
  /** Test hook: runs after a decision is committed and before anything is published. */
  afterDecide?: (receiptUri: string) => void
}

export interface Finding {
  code: string
  message: string
}

type Indexed<T> = { uri: string; cid: string; did: string; body: T }

class JobDecided extends Error {
  override name = 'JobDecided'
}

/** The scan goes back this many rows each pass, so a rowid SQLite reuses after a delete is not missed. */
const RESCAN = 100
const BATCH = 500

/** States in which the job's receipt is judged now; in the others it is refused or waits for the job. */
const READY = new Set(['completed', 'cancelled'])

const sameKey = (a: unknown, b: unknown) => {
  const x = toBytes(a)
  const y = toBytes(b)
  return !!x && !!y && x.length === y.length && x.every((v, i) => v === y[i])
}

export class Settler {
  private readonly opts: SettlerOpts
  /** Jobs that became ready since the last pass: their receipts may have been indexed before. */
  private readonly ready = new Set<string>()

  constructor(opts: SettlerOpts) {
    this.opts = opts
    // After a restart: every job still open and ready is looked at once.
    for (const uri of opts.db.$client.prepare("SELECT job_uri FROM exchange_jobs WHERE state IN ('completed', 'cancelled') AND recorded = 1").pluck().all() as string[]) this.ready.add(uri)
  }

  /** The exchange tells the settler a job can now be judged (it completed, and its records are published). */
  jobReady(jobUri: string): void {
    this.ready.add(jobUri)
  }

  private get position(): number {
    const v = this.opts.db.$client.prepare("SELECT value FROM exchange_state WHERE key = 'receipt_position'").pluck().get() as string | undefined
    return v ? Number(v) : 0
  }

  private set position(rowid: number) {
    this.opts.db.$client.prepare("INSERT INTO exchange_state (key, value) VALUES ('receipt_position', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value").run(String(rowid))
  }

  /** One pass: holds past their deadline released, then the receipts indexed since the last pass and those of jobs just ready. Returns how many were decided. */
  pass(): number {
    this.opts.book.expire()
    let decided = 0
    const jobs = [...this.ready]
    this.ready.clear()
    for (const jobUri of jobs) for (const r of this.opts.index.receiptsForJob(jobUri)) if (this.consider(r as unknown as Indexed<ComputeReceipt>)) decided++
    let from = Math.max(0, this.position - RESCAN)
    for (;;) {
      const batch = this.opts.index.receiptsAfter(from, BATCH)
      for (const r of batch) if (this.consider(r as unknown as Indexed<ComputeReceipt>)) decided++
      if (batch.length === 0) break
      from = batch[batch.length - 1]!.rowid
      this.position = Math.max(this.position, from)
      if (batch.length < BATCH) break
    }
    return decided
  }

  private decidedAlready(uri: string): boolean {
    return this.opts.db.$client.prepare('SELECT 1 FROM settlements WHERE receipt_uri = ?').get(uri) !== undefined
  }

  /** Decides on one receipt if it is ours, not decided yet, and its job is ready; true when a decision was recorded. */
  private consider(receipt: Indexed<ComputeReceipt>): boolean {
    if (this.decidedAlready(receipt.uri)) return false
    const jobUri = receipt.body.job?.uri
    const row = typeof jobUri === 'string' ? this.opts.book.get(jobUri) : undefined
    if (!row) return this.notDispatched(receipt)
    // Anyone may publish a receipt naming any job: only the machine the job went to decides it.
    if (receipt.did !== row.providerDid) {
      return this.refuse(receipt, row, { code: 'not-dispatched-provider', message: `this exchange sent ${row.jobUri} to ${row.providerDid ?? 'no provider'}, not to ${receipt.did}` }, false)
    }
    switch (row.state) {
      case 'admitted':
      case 'running':
        return false // judged when the job completes (jobReady)
      case 'settled':
      case 'refused':
        return this.refuse(receipt, row, { code: 'job-already-decided', message: `${row.jobUri} was already decided on another receipt` }, false)
      case 'unstarted':
      case 'failed':
        return this.refuse(receipt, row, { code: 'job-not-completed', message: 'the exchange relayed no completed reply for this job (it failed, or its records were not published)' }, false)
      case 'expired':
        return this.refuse(receipt, row, { code: 'receipt-too-late', message: `the receipt came after the job's settlement deadline (${row.deadline})` }, false)
    }
    // Completed or cancelled, but the requester's records are not on its PDS yet: judged once they are.
    if (!READY.has(row.state) || !row.recorded) return false
    const attestation = this.opts.index.record(receipt.body.attestation?.uri ?? '') as unknown as Indexed<ComputeAttestation> | undefined
    const authorityDoc = this.authorityDoc(receipt, row)
    if (authorityDoc === undefined) return false // looked at again once the authority's document is in
    const finding = this.check(receipt, row, attestation, authorityDoc)
    return finding ? this.refuse(receipt, row, finding, true) : this.settle(receipt, row)
  }

  /**
   * The DID document of the receipt's countersigning brokerage: this
   * exchange's own, another's from the cache, or undefined while it is
   * fetched (the job is ready again when it is in); null without one.
   */
  private authorityDoc(receipt: Indexed<ComputeReceipt>, row: DispatchRow): DidDocument | null | undefined {
    const authority = receipt.body.brokerageCountersignature?.authority
    if (typeof authority !== 'string') return null
    const { brokerage, authorities } = this.opts
    if (brokerage && authority === brokerage.did) return brokerage.document
    if (!authorities) return null
    const doc = authorities.peek(authority)
    if (doc === undefined) void authorities.resolve(authority).then(() => this.ready.add(row.jobUri))
    return doc
  }

  /**
   * A receipt for a job this exchange has no record of: if the job's
   * authorization names this exchange, it is refused (nothing was sent, so
   * nothing is owed); otherwise it belongs to another exchange.
   */
  private notDispatched(receipt: Indexed<ComputeReceipt>): boolean {
    const job = this.opts.index.record(receipt.body.job?.uri ?? '') as unknown as Indexed<ComputeJob> | undefined
    const auth = job ? (this.opts.index.record(job.body.paymentAuthorization?.uri ?? '') as unknown as Indexed<ComputePaymentAuthorization> | undefined) : undefined
    if (auth?.body.exchange !== this.opts.exchangeDid) return false
    return this.refuse(receipt, null, { code: 'job-not-dispatched', message: `this exchange never dispatched ${job!.uri}` }, false)
  }

  /** The first reason this receipt of the dispatched provider cannot be settled, or null. */
  check(receipt: Indexed<ComputeReceipt>, row: DispatchRow, attestation: Indexed<ComputeAttestation> | undefined, authorityDoc: DidDocument | null = null): Finding | null {
    const r = receipt.body
    if (r.job.cid !== row.jobCid) return { code: 'job-cid-mismatch', message: 'the receipt names another version of the job than the one dispatched' }
    // The stored job, not the requester's repo: deleting it afterwards changes nothing.
    const job: Indexed<ComputeJob> = { uri: row.jobUri, cid: row.jobCid, did: row.requesterDid, body: row.jobRecord as unknown as ComputeJob }
    // Whom a verifier trusts decides nothing here: the exchange pays whatever the tier (as the network's does).
    const verdict = verifyReceipt(receipt, job, attestation, { trusted: new Set(), authorityDoc })
    if (!verdict.ok) return verdict.findings.find((f) => f.severity === 'error')!
    if (!row.attestationKey || !sameKey(attestation!.body.publicKey, row.attestationKey)) {
      return { code: 'attestation-key-mismatch', message: "the receipt is not signed by the attestation key that answered the dispatched connection's challenge" }
    }
    // Ours verified above: it must also be the one signed for this job's machine, not another dispatch's.
    const cs = r.brokerageCountersignature
    const w = row.witness
    if (cs && cs.authority === this.opts.brokerage?.did && (!w || cs.machineId !== w.machineId || cs.nonce !== w.nonce)) {
      return { code: 'brokerage-witness-mismatch', message: "the receipt's countersignature by this exchange is not the one it signed for the machine it sent this job to" }
    }
    const a = row.authRecord as unknown as ComputePaymentAuthorization
    if (uriDid(row.authUri) !== r.requester) return { code: 'requester-mismatch', message: "the authorization is not on the receipt requester's repo" }
    // At the time the work was done, not now: a late settlement of timely work is valid.
    if (Date.parse(r.completedAt) > Date.parse(a.expiresAt)) return { code: 'authorization-expired', message: `the receipt completed at ${r.completedAt}, after the authorization expired at ${a.expiresAt}` }
    if (r.price.currency !== CURRENCY) return { code: 'currency-unsupported', message: `this exchange settles in ${CURRENCY} only` }
    const bounds = tokenBounds(row)
    if (r.tokens.out > bounds.out) {
      return { code: 'tokens-out-over-relayed', message: `the receipt claims ${r.tokens.out} output tokens; the job allowed ${row.maxTokensOut} and the exchange relayed at most ${bounds.out}` }
    }
    if (r.tokens.in > bounds.in) return { code: 'tokens-in-over-counted', message: `the receipt claims ${r.tokens.in} input tokens; the exchange counted at most ${bounds.in}` }
    // A receipt that names the constraints it served must name the job's (older providers name none).
    const expected = constraintHashes(job.body)
    const named = (r.params ?? {}) as { outputSchemaHash?: string; toolSchemaHash?: string }
    for (const field of ['outputSchemaHash', 'toolSchemaHash'] as const) {
      if (named[field] !== undefined && named[field] !== expected[field]) return { code: 'constraints-mismatch', message: `the receipt's ${field} is not the hash of the job's ${field === 'outputSchemaHash' ? 'outputSchema' : 'tools'}` }
    }
    if (row.proBono && (r.proBono !== true || r.price.amount !== 0)) return { code: 'pro-bono-charged', message: 'the job was dispatched pro bono: its receipt carries no charge' }
    if (r.price.amount > row.ceiling) return { code: 'over-ceiling', message: `price ${r.price.amount} exceeds the ceiling ${row.ceiling} held for the job` }
    const most = maxPrice(this.opts.policy, r.tokens)
    if (r.price.amount > most) return { code: 'over-token-rate', message: `price ${r.price.amount} exceeds the policy's token rate for ${r.tokens.in} + ${r.tokens.out} tokens (${most})` }
    return null
  }

  /** Records a refusal; `close` ends the job (its hold released): the dispatched provider's receipt decides it. */
  private refuse(receipt: Indexed<ComputeReceipt>, row: DispatchRow | null, f: Finding, close: boolean): boolean {
    const { db, book } = this.opts
    const done = db.$client.transaction(() => {
      const res = db.$client
        .prepare(
          "INSERT INTO settlements (receipt_uri, receipt_cid, requester_did, provider_did, job_uri, outcome, finding_code, finding_message, decided_at) VALUES (?, ?, ?, ?, ?, 'refused', ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        // The requester the exchange knows (the job's owner), not the one a stranger's receipt names.
        .run(receipt.uri, receipt.cid, row?.requesterDid ?? uriDid(receipt.body.job?.uri ?? null) ?? '', receipt.did, row?.jobUri ?? null, f.code, f.message.slice(0, 500), new Date().toISOString())
      if (res.changes && close && row) book.close(row, 'refused')
      return res.changes > 0
    })()
    if (done) log.info('receipt refused', { receipt: receipt.uri, code: f.code })
    return done
  }

  private settle(receipt: Indexed<ComputeReceipt>, row: DispatchRow): boolean {
    const { db, ledger, outbox, policy, refs, key, exchangeDid, book } = this.opts
    const r = receipt.body
    const requester = row.requesterDid
    const provider = row.providerDid!
    const amount = r.proBono ? 0 : r.price.amount
    // Fee-free only when the exchange itself sent the job to the requester's own machine.
    const fee = feeOf(policy, amount, requester === provider)
    const treasury = policy.treasuryDid ?? exchangeDid
    const ref = `settlement:${receipt.uri}`
    const record = signDetached(
      {
        $type: ids.ComputeSettlement,
        receipt: { uri: receipt.uri, cid: receipt.cid },
        requesterAuthorization: { uri: row.authUri, cid: row.authCid },
        amountCharged: { amount, currency: CURRENCY },
        providerPayout: { amount: amount - fee, currency: CURRENCY },
        exchangeFee: { amount: fee, currency: CURRENCY },
        processorReference: 'ledger',
        status: 'settled',
        policy: refs.policy,
        exchangeAttestation: refs.attestation,
        settledAt: new Date().toISOString(),
      },
      key.signer,
    )
    const nonce = (row.authRecord as { nonce?: unknown }).nonce
    const decided = db.$client.transaction(() => {
      const res = db.$client
        .prepare(
          "INSERT INTO settlements (receipt_uri, receipt_cid, requester_did, provider_did, authorization_key, job_uri, outcome, amount, fee, outbox_ref, decided_at) VALUES (?, ?, ?, ?, ?, ?, 'settled', ?, ?, ?, ?) ON CONFLICT (receipt_uri) DO NOTHING",
        )
        .run(receipt.uri, receipt.cid, requester, provider, `${requester} ${String(nonce)}`, row.jobUri, amount, fee, ref, new Date().toISOString())
      if (res.changes === 0) return false
      // The hold goes first: the charge is at most what was held, so the requester never goes below zero.
      if (!book.close(row, 'settled')) throw new JobDecided()
      // A self-loop pays itself (nothing moves); pro bono moves nothing.
      ledger.post(
        'settlement',
        ref,
        [
          { account: requester, amount: -amount },
          { account: provider, amount: amount - fee },
          { account: treasury, amount: fee },
        ],
        { receipt: receipt.uri, job: row.jobUri, amount, fee },
      )
      outbox.enqueue(ref, ids.ComputeSettlement, TID.nextStr(), record)
      return true
    })
    try {
      if (!decided()) return false
    } catch (err) {
      // Another decision on this job or authorization won: nothing of this one was written.
      if (err instanceof JobDecided || (err as { code?: string }).code === 'SQLITE_CONSTRAINT_UNIQUE') return this.refuse(receipt, row, { code: 'job-already-decided', message: `${row.jobUri} was already decided on another receipt` }, false)
      // The ledger's CHECK: never expected (the charge is at most the hold), and refused rather than retried forever.
      if (err instanceof InsufficientFundsError) return this.refuse(receipt, row, { code: 'insufficient-funds', message: err.message }, true)
      throw err
    }
    log.info('receipt settled', { receipt: receipt.uri, amount, fee })
    this.opts.afterDecide?.(receipt.uri)
    outbox.kick()
    return true
  }
}
