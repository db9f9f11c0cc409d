/**
 * The settlement pipeline. For each receipt the AppView indexes whose job's
 * payment authorization names this exchange:
 *   1. verify it: the AppView's receipt checks (signature, attestation, job,
 *      ceiling, expiry at completion time), the authorization (this exchange,
 *      the requester's, its ceiling, its expiry at the receipt's completion
 *      time, not now), and the policy (currency, token rate);
 *   2. in one SQLite transaction: the decision row (unique per receipt, and
 *      per authorization: requester DID + nonce), the ledger movement, and the
 *      signed `settlement` record in the outbox;
 *   3. the outbox publishes it on the exchange's repo and marks it published.
 * A refused receipt gets a row with the finding and moves nothing. Receipts
 * of other exchanges are left alone. A receipt whose job or authorization is
 * not indexed yet waits (it is looked at again each pass) for up to an hour.
 */
import { TID } from '@atproto/common-web'
import type { ConsoleIndex } from '../../appview/index.ts'
import { verifyReceipt } from '../../appview/verify/receipt.ts'
import { uriDid } from '../../appview/indexer/columns.ts'
import { signDetached } from '../../src/crypto/signing.ts'
import type { Db } from '../../src/db/index.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import type { ComputeAttestation, ComputeJob, ComputePaymentAuthorization, ComputeReceipt } from '../../src/lexicon/generated/types.ts'
import { consoleLogger as log } from '../../src/logger.ts'
import type { Ledger } from './ledger.ts'
import type { Outbox } from './outbox.ts'
import { CURRENCY, feeOf, maxPrice, type EconomyPolicy, type StrongRef } from './policy.ts'
import type { SigningKey } from './signing-key.ts'

export interface SettlerOpts {
  db: Db
  index: Pick<ConsoleIndex, 'receiptsAfter' | 'record'>
  ledger: Ledger
  outbox: Outbox
  exchangeDid: string
  policy: EconomyPolicy
  /** The published policy and attestation the settlements cite. */
  refs: { policy: StrongRef; attestation: StrongRef }
  key: SigningKey
  /** How long a receipt may wait for its job and authorization to be indexed. */
  waitMs?: number
  /** Test hook: runs after a decision is committed and before anything is published. */
  afterDecide?: (receiptUri: string) => void
}

export interface Finding {
  code: string
  message: string
}

type Indexed<T> = { uri: string; cid: string; did: string; body: T }

/** The scan goes back this many rows each pass, so a rowid SQLite reuses after a delete is not missed. */
const RESCAN = 100
const BATCH = 500

export class Settler {
  private readonly opts: SettlerOpts
  /** Receipts waiting for their job or authorization, with when they were first seen. */
  private readonly waiting = new Map<string, number>()

  constructor(opts: SettlerOpts) {
    this.opts = opts
  }

  private get position(): number {
    const v = this.opts.db.$client.prepare("SELECT value FROM exchange_state WHERE key = 'receipt_position'").pluck().get() as string | undefined
    return v ? Number(v) : 0
  }

  private set position(rowid: number) {
    this.opts.db.$client.prepare("INSERT INTO exchange_state (key, value) VALUES ('receipt_position', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value").run(String(rowid))
  }

  /** One pass over the receipts indexed since the last one (and those still waiting). Returns how many were decided. */
  pass(): number {
    let decided = 0
    for (const uri of [...this.waiting.keys()]) {
      const r = this.opts.index.record(uri)
      if (!r) this.waiting.delete(uri)
      else if (this.consider(r as unknown as Indexed<ComputeReceipt>)) decided++
    }
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

  /** Decides on one receipt if it is ours and not decided yet; true when a decision was recorded. */
  private consider(receipt: Indexed<ComputeReceipt>): boolean {
    if (this.decidedAlready(receipt.uri)) {
      this.waiting.delete(receipt.uri)
      return false
    }
    const { index, exchangeDid } = this.opts
    const r = receipt.body
    const job = index.record(r.job?.uri ?? '') as unknown as Indexed<ComputeJob> | undefined
    const auth = job ? (index.record(job.body.paymentAuthorization?.uri ?? '') as unknown as Indexed<ComputePaymentAuthorization> | undefined) : undefined
    if (!job || !auth) {
      // Not ours, or not indexed yet: records arrive from different repos in any order.
      const first = this.waiting.get(receipt.uri) ?? Date.now()
      if (Date.now() - first < (this.opts.waitMs ?? 3600_000)) this.waiting.set(receipt.uri, first)
      else this.waiting.delete(receipt.uri)
      return false
    }
    this.waiting.delete(receipt.uri)
    // Another exchange's job: not ours to settle, not ours to judge.
    if (auth.body.exchange !== exchangeDid) return false
    const attestation = index.record(r.attestation?.uri ?? '') as unknown as Indexed<ComputeAttestation> | undefined
    const finding = this.check(receipt, job, auth, attestation)
    return finding ? this.refuse(receipt, finding) : this.settle(receipt, auth)
  }

  /** The first reason this receipt cannot be settled, or null. */
  check(receipt: Indexed<ComputeReceipt>, job: Indexed<ComputeJob>, auth: Indexed<ComputePaymentAuthorization>, attestation: Indexed<ComputeAttestation> | undefined): Finding | null {
    const r = receipt.body
    const verdict = verifyReceipt(receipt, job, attestation)
    if (!verdict.ok) return verdict.findings[0]!
    const a = auth.body
    const completed = Date.parse(r.completedAt)
    if (auth.cid !== job.body.paymentAuthorization.cid) return { code: 'authorization-cid-mismatch', message: 'the indexed authorization is not the version the job references' }
    if (uriDid(auth.uri) !== r.requester) return { code: 'requester-mismatch', message: "the authorization is not on the receipt requester's repo" }
    // At the time the work was done, not now: a late settlement of timely work is valid.
    if (completed > Date.parse(a.expiresAt)) return { code: 'authorization-expired', message: `the receipt completed at ${r.completedAt}, after the authorization expired at ${a.expiresAt}` }
    if (r.price.currency !== CURRENCY || a.ceiling.currency !== CURRENCY) return { code: 'currency-unsupported', message: `this exchange settles in ${CURRENCY} only` }
    if (r.price.amount > a.ceiling.amount) return { code: 'over-ceiling', message: `price ${r.price.amount} exceeds the authorization ceiling ${a.ceiling.amount}` }
    const most = maxPrice(this.opts.policy, r.tokens)
    if (r.price.amount > most) return { code: 'over-token-rate', message: `price ${r.price.amount} exceeds the policy's token rate for ${r.tokens.in} + ${r.tokens.out} tokens (${most})` }
    return null
  }

  private refuse(receipt: Indexed<ComputeReceipt>, f: Finding): boolean {
    const res = this.opts.db.$client
      .prepare("INSERT INTO settlements (receipt_uri, receipt_cid, requester_did, provider_did, outcome, finding_code, finding_message, decided_at) VALUES (?, ?, ?, ?, 'refused', ?, ?, ?) ON CONFLICT DO NOTHING")
      .run(receipt.uri, receipt.cid, receipt.body.requester, receipt.did, f.code, f.message.slice(0, 500), new Date().toISOString())
    if (res.changes) log.info('receipt refused', { receipt: receipt.uri, code: f.code })
    return res.changes > 0
  }

  private settle(receipt: Indexed<ComputeReceipt>, auth: Indexed<ComputePaymentAuthorization>): boolean {
    const { db, ledger, outbox, policy, refs, key, exchangeDid } = this.opts
    const r = receipt.body
    const requester = r.requester
    const provider = receipt.did
    const amount = r.proBono ? 0 : r.price.amount
    const selfLoop = requester === provider
    const fee = feeOf(policy, amount, selfLoop)
    const treasury = policy.treasuryDid ?? exchangeDid
    const ref = `settlement:${receipt.uri}`
    const record = signDetached(
      {
        $type: ids.ComputeSettlement,
        receipt: { uri: receipt.uri, cid: receipt.cid },
        requesterAuthorization: { uri: auth.uri, cid: auth.cid },
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
    const decided = db.$client.transaction(() => {
      const row = db.$client
        .prepare(
          "INSERT INTO settlements (receipt_uri, receipt_cid, requester_did, provider_did, authorization_key, outcome, amount, fee, outbox_ref, decided_at) VALUES (?, ?, ?, ?, ?, 'settled', ?, ?, ?, ?) ON CONFLICT (receipt_uri) DO NOTHING",
        )
        .run(receipt.uri, receipt.cid, requester, provider, `${requester} ${auth.body.nonce}`, amount, fee, ref, new Date().toISOString())
      if (row.changes === 0) return false
      // A self-loop pays itself (nothing moves); pro bono moves nothing.
      ledger.post(
        'settlement',
        ref,
        [
          { account: requester, amount: -amount },
          { account: provider, amount: amount - fee },
          { account: treasury, amount: fee },
        ],
        { receipt: receipt.uri, amount, fee },
      )
      outbox.enqueue(ref, ids.ComputeSettlement, TID.nextStr(), record)
      return true
    })
    let ok: boolean
    try {
      ok = decided()
    } catch (err) {
      // The authorization already paid for another receipt.
      if ((err as { code?: string }).code === 'SQLITE_CONSTRAINT_UNIQUE') return this.refuse(receipt, { code: 'authorization-reused', message: `authorization ${auth.uri} already settled another receipt` })
      throw err
    }
    if (!ok) return false
    log.info('receipt settled', { receipt: receipt.uri, amount, fee })
    this.opts.afterDecide?.(receipt.uri)
    outbox.kick()
    return true
  }
}
