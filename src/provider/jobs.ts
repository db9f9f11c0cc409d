/**
 * The provider's job handler: one `inference_request` in, its frames out
 * through `send`. It opens the sealed prompt with the machine's key (in its
 * scheme, x25519 or p256-ecies-se), checks it against the job's input
 * commitment (or, from an exchange that sends none, computes it), runs the
 * engine, seals each piece back to the requester's ephemeral key, sends a
 * keepalive when nothing was sent for a while, and completes with the URI of
 * a signed receipt, written right after (the rkey is chosen up front, so the
 * exchange need not wait for the PDS). The dispatching brokerage's
 * countersignature, when the request carries one, goes onto the receipt as it
 * came, outside what this machine signs.
 *
 * A job it cannot run is refused with `inference_error` to an exchange with
 * our extensions; the network has no such frame, so to a reference exchange
 * the refusal is what its providers send: a sealed notice as the reply and a
 * completion counting nothing, without a receipt.
 *
 * Content stays in this module's memory for the length of a job: it is never
 * logged, stored or put in an event; only its hashes leave, in the receipt.
 */
import { createHash } from 'node:crypto'
import { EventEmitter } from 'node:events'
import { TID } from '@atproto/common-web'
import { fromWireCountersignature } from '../crypto/brokerage.ts'
import { providerChannel } from '../crypto/enc-scheme.ts'
import type { SealChannel } from '../crypto/seal.ts'
import { ids } from '../lexicon/generated/ids.ts'
import { validateRecord } from '../lexicon/validate.ts'
import type { FinishReason, InferenceErrorCode, InferenceRequestFrame, ProviderFrame } from '../protocol/agent.ts'
import { decodeMessages, inputCommitment, InputError, type InputMessage } from '../protocol/input.ts'
import { constraintHashes, constraintsOfFrame, type JobConstraints } from '../protocol/job-constraints.ts'
import { drain, generationParams, unsupported, type Engine } from './engine.ts'
import type { ProviderKeys } from './keys.ts'
import { log } from './log.ts'
import { receiptParams, receiptRecord, type ModelPrice, type ReceiptInput } from './records.ts'
import { withRetry, type RepoWriter, type StrongRef } from './repo.ts'

export interface JobRunnerOpts {
  did: string
  keys: ProviderKeys
  engine: Engine
  /** One price per served model: a request for a model not listed is refused (model_unavailable). */
  prices: ModelPrice[]
  /** The attestation in force, which receipts cite. */
  attestation: () => StrongRef
  /** Writes receipts to the provider's repo. */
  writer: RepoWriter
  /** Where the job's frames go (the exchange connection). */
  send: (frame: ProviderFrame) => void
  /** Jobs run at once; beyond it requests are refused with `busy` (default 4). */
  maxConcurrent?: number
  receiptRetry?: { attempts: number; firstDelayMs: number }
  /** The exchange speaks our extensions (default: yes); otherwise only the network's frames are sent. */
  extended?: () => boolean
  /** The owner's pro bono policy serves this requester: for a job whose request does not say (the network's exchanges leave it to the provider). */
  proBonoFor?: (requesterDid: string) => boolean
  /** A keepalive after this long without a chunk (default 10 s, as on the network). */
  keepaliveMs?: number
}

export interface JobStats {
  completed: number
  cancelled: number
  /** Refused (busy, undecryptable, bad input, unknown model) or failed in the engine. */
  failed: number
  receiptsPublished: number
  receiptsFailed: number
}

/** Events carry ids, URIs and counts, never content. */
export interface JobEvents {
  'job-complete': [{ sessionId: string; receiptUri: string; tokensIn: number; tokensOut: number; finishReason: FinishReason }]
  'job-cancelled': [{ sessionId: string; reason: string }]
  'job-failed': [{ sessionId: string; code: InferenceErrorCode }]
  'receipt-published': [{ sessionId: string; uri: string; cid: string }]
  'receipt-failed': [{ sessionId: string; uri: string }]
}

interface CheckedRequest extends InferenceRequestFrame {
  messages: InputMessage[]
  /** The job's structured-output schema and tools, as the frame carries them. */
  constraints: JobConstraints
  /** sha256 hex of the opened prompt (the request's input_commitment when it has one). */
  commitment: string
  /** The channel key of this job (one key agreement for the prompt and every reply chunk). */
  channel: SealChannel
}

type Refusal = { code: InferenceErrorCode; message: string; channel?: SealChannel | null }

const HEX64 = /^[0-9a-f]{64}$/
const utf8 = new TextEncoder()

export class JobRunner extends EventEmitter<JobEvents> {
  readonly stats: JobStats = { completed: 0, cancelled: 0, failed: 0, receiptsPublished: 0, receiptsFailed: 0 }
  private readonly opts: JobRunnerOpts
  private readonly prices: Map<string, ModelPrice>
  private readonly maxConcurrent: number
  private readonly running = new Map<string, { ac: AbortController; done: Promise<void> }>()
  private readonly writes = new Set<Promise<void>>()

  constructor(opts: JobRunnerOpts) {
    super()
    this.opts = opts
    this.prices = new Map(opts.prices.map((p) => [p.modelId, p]))
    this.maxConcurrent = opts.maxConcurrent ?? 4
  }

  /** Jobs running now. */
  get active(): number {
    return this.running.size
  }

  /** Runs one job; resolves once its last frame is sent (its receipt is written after). Never rejects. */
  run(frame: InferenceRequestFrame): Promise<void> {
    const sessionId = frame.session_id
    if (typeof sessionId !== 'string' || !sessionId) {
      log.warn('inference_request without a session_id; ignored')
      return Promise.resolve()
    }
    if (this.running.has(sessionId)) {
      log.warn('inference_request for a session already running; ignored', { sessionId })
      return Promise.resolve()
    }
    if (this.running.size >= this.maxConcurrent) return Promise.resolve(this.refuse(frame, { code: 'busy', message: `this machine runs at most ${this.maxConcurrent} jobs at once` }))
    const checked = this.check(frame)
    if ('code' in checked) return Promise.resolve(this.refuse(frame, checked))
    const ac = new AbortController()
    const entry = { ac, done: Promise.resolve() }
    this.running.set(sessionId, entry)
    entry.done = this.execute(checked, ac.signal).finally(() => this.running.delete(sessionId))
    return entry.done
  }

  /** Stops a running job: nothing more is sent for it and no receipt is written. */
  cancel(sessionId: string, reason: string): boolean {
    const job = this.running.get(sessionId)
    if (!job) return false
    job.ac.abort(reason)
    return true
  }

  /** Cancels every running job but those `keep` names. */
  cancelAll(reason: string, keep: (sessionId: string) => boolean = () => false): void {
    for (const [sessionId, job] of this.running) if (!keep(sessionId)) job.ac.abort(reason)
  }

  /** Resolves once the running jobs have ended and pending receipt writes have settled. */
  async idle(): Promise<void> {
    while (this.running.size || this.writes.size) await Promise.allSettled([...[...this.running.values()].map((j) => j.done), ...this.writes])
  }

  /** The request opened and checked, or why it is refused. Runs before any content is produced. */
  private check(f: InferenceRequestFrame): CheckedRequest | Refusal {
    const bad = (message: string) => ({ code: 'bad_input' as const, message })
    if (typeof f.model !== 'string' || !this.prices.has(f.model)) return { code: 'model_unavailable', message: `this machine does not serve ${String(f.model).slice(0, 256)}` }
    // Without a job_cid the job is served without a receipt (a receipt cites both halves of the job's strong ref), as on the network.
    if (typeof f.job_uri !== 'string' || !f.job_uri.startsWith('at://') || (f.job_cid !== undefined && (typeof f.job_cid !== 'string' || !f.job_cid))) return bad('job_uri and job_cid must name the job record')
    if (typeof f.requester_did !== 'string' || !f.requester_did.startsWith('did:')) return bad('requester_did must be a DID')
    if (!Number.isSafeInteger(f.max_tokens_out) || f.max_tokens_out < 0) return bad('max_tokens_out must be a non-negative integer')
    if (f.input_commitment !== undefined && (typeof f.input_commitment !== 'string' || !HEX64.test(f.input_commitment))) return bad('input_commitment must be 64 lowercase hex characters')
    if (typeof f.ciphertext !== 'string' || typeof f.requester_pub_key !== 'string') return { code: 'decrypt_failed', message: 'ciphertext and requester_pub_key must be base64 strings' }
    let plaintext: Uint8Array | null
    let channel: SealChannel | null = null
    try {
      // The prompt's key is the reply's: the same key pair, both ways.
      const { scheme, secretKey } = this.opts.keys.encryption
      channel = providerChannel(scheme, f.requester_pub_key, secretKey)
      plaintext = channel.open(f.ciphertext)
    } catch {
      // A malformed requester key, or one of another scheme (low-order X25519, not on P-256, the wrong length).
      plaintext = null
    }
    if (!plaintext || !channel) return { code: 'decrypt_failed', message: "the prompt does not open with this machine's key", channel }
    const commitment = inputCommitment(plaintext)
    if (f.input_commitment !== undefined && commitment !== f.input_commitment) return { ...bad('the prompt does not match its input_commitment'), channel }
    try {
      const messages = decodeMessages(plaintext, f.input_format)
      const constraints = constraintsOfFrame(f)
      if (typeof constraints === 'string') return { ...bad(constraints), channel }
      // A job this engine would have to serve without its images, tools or schema is refused (it fails over).
      const missing = unsupported(this.opts.engine, { messages, constraints })
      if (missing) return { code: 'model_unavailable', message: missing, channel }
      return { ...f, messages, constraints, commitment, channel }
    } catch (err) {
      if (err instanceof InputError || err instanceof TypeError) return { ...bad(err instanceof InputError ? err.message : 'the prompt is not UTF-8'), channel }
      throw err
    }
  }

  private async execute(req: CheckedRequest, signal: AbortSignal): Promise<void> {
    const { did, keys, engine } = this.opts
    const sessionId = req.session_id
    const rkey = TID.nextStr()
    const jobCid = req.job_cid
    const receiptUri = jobCid ? `at://${did}/${ids.ComputeReceipt}/${rkey}` : ''
    const params = generationParams(req.params)
    const startedAt = new Date().toISOString()
    const output = createHash('sha256')
    let seq = 0
    // "Still generating": a long prefill or a slow stretch must not look like a silent job.
    let quiet = true
    const keepalive = setInterval(() => {
      if (quiet && !signal.aborted) this.opts.send({ type: 'inference_keepalive', session_id: sessionId })
      quiet = true
    }, this.opts.keepaliveMs ?? 10_000)
    try {
      const done = await drain(engine.generate({ model: req.model, messages: req.messages, maxTokens: req.max_tokens_out, params, signal, constraints: req.constraints }), (piece, channel) => {
        // Nothing more is sent for a cancelled job, even a piece already made.
        signal.throwIfAborted()
        const bytes = utf8.encode(piece)
        // The output commitment covers the answer, as on the network (reasoning and tool calls ride their own channels).
        if (channel === 'content') output.update(bytes)
        quiet = false
        this.opts.send({ type: 'inference_chunk', session_id: sessionId, seq: seq++, ...(channel !== 'content' ? { channel } : {}), ciphertext: req.channel.seal(bytes) })
      })
      // Cancelled as the engine finished: the exchange has already let the job go.
      signal.throwIfAborted()
      this.opts.send({
        type: 'inference_complete',
        session_id: sessionId,
        tokens_in: done.tokensIn,
        tokens_out: done.tokensOut,
        finish_reason: done.finishReason,
        receipt_uri: receiptUri,
        final_seq: seq,
      })
      this.stats.completed++
      this.emit('job-complete', { sessionId, receiptUri, tokensIn: done.tokensIn, tokensOut: done.tokensOut, finishReason: done.finishReason })
      if (!jobCid) return
      const countersignature = fromWireCountersignature(req.brokerage_countersignature)
      const proBono = req.pro_bono ?? (!this.extended() && this.opts.proBonoFor?.(req.requester_did) === true)
      const receipt: ReceiptInput = {
        job: { uri: req.job_uri, cid: jobCid },
        requester: req.requester_did,
        model: req.model,
        inputCommitment: req.commitment,
        outputCommitment: output.digest('hex'),
        tokens: { in: done.tokensIn, out: done.tokensOut },
        startedAt,
        completedAt: new Date().toISOString(),
        price: this.prices.get(req.model)!,
        attestation: this.opts.attestation(),
        // With the hashes of the schema and tools it served under, as the network's receipts carry them.
        params: { ...receiptParams(req.max_tokens_out, params), ...constraintHashes(req.constraints) },
        proBono,
        // The dispatching brokerage's witness, copied as it came (the network's agent does the same).
        ...(countersignature ? { brokerageCountersignature: countersignature } : {}),
      }
      const write = this.publish(sessionId, rkey, receipt).finally(() => this.writes.delete(write))
      this.writes.add(write)
    } catch (err) {
      if (signal.aborted) {
        this.stats.cancelled++
        this.emit('job-cancelled', { sessionId, reason: String(signal.reason) })
        return
      }
      log.warn('engine failed', { sessionId, model: req.model, err: err as Error })
      this.refuse(req, { code: 'engine_error', message: 'the engine failed', channel: req.channel }, seq)
    } finally {
      clearInterval(keepalive)
    }
  }

  private async publish(sessionId: string, rkey: string, input: ReceiptInput): Promise<void> {
    const uri = `at://${this.opts.did}/${ids.ComputeReceipt}/${rkey}`
    try {
      let receipt = receiptRecord(input, this.opts.keys)
      // A countersignature the lexicon refuses would spoil the whole receipt: it is left off instead.
      if (receipt.brokerageCountersignature && !validateRecord(ids.ComputeReceipt, receipt).success) {
        log.warn('brokerage countersignature left off the receipt: not a valid one', { sessionId })
        receipt = receiptRecord({ ...input, brokerageCountersignature: undefined }, this.opts.keys)
      }
      // Same rkey and bytes on every attempt: a write that did land is not duplicated.
      const ref = await withRetry(() => this.opts.writer.put(ids.ComputeReceipt, rkey, receipt), {
        ...(this.opts.receiptRetry ?? { attempts: 4, firstDelayMs: 1000 }),
        onRetry: (err, attempt) => log.warn('receipt write failed; retrying', { sessionId, uri, attempt, err: err as Error }),
      })
      this.stats.receiptsPublished++
      this.emit('receipt-published', { sessionId, ...ref })
    } catch (err) {
      this.stats.receiptsFailed++
      log.error('receipt not published', { sessionId, uri, err: err as Error })
      this.emit('receipt-failed', { sessionId, uri })
    }
  }

  private extended(): boolean {
    return this.opts.extended?.() ?? true
  }

  /**
   * The job cannot run (or stopped): `inference_error` to an exchange with our
   * extensions; to a reference exchange a sealed notice after the `seq` chunks
   * already sent (when the requester's key makes a channel) and a completion
   * counting nothing, with no receipt.
   */
  private refuse(f: InferenceRequestFrame, r: Refusal, seq = 0): void {
    const sessionId = f.session_id
    this.stats.failed++
    if (this.extended()) this.opts.send({ type: 'inference_error', session_id: sessionId, code: r.code, message: r.message })
    else {
      const channel = r.channel ?? this.channelFor(f)
      if (channel) this.opts.send({ type: 'inference_chunk', session_id: sessionId, seq: seq++, ciphertext: channel.seal(utf8.encode(`[provider] this job could not run: ${r.message}`)) })
      this.opts.send({ type: 'inference_complete', session_id: sessionId, tokens_in: 0, tokens_out: 0, receipt_uri: '', final_seq: seq })
    }
    this.emit('job-failed', { sessionId, code: r.code })
  }

  /** The reply channel to the request's ephemeral key, when it makes one. */
  private channelFor(f: InferenceRequestFrame): SealChannel | null {
    try {
      const { scheme, secretKey } = this.opts.keys.encryption
      return typeof f.requester_pub_key === 'string' ? providerChannel(scheme, f.requester_pub_key, secretKey) : null
    } catch {
      return null
    }
  }
}
