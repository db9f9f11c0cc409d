/**
 * The exchange's inference path: choose providers for a job, publish the
 * requester's authorization and job records, send the sealed job, relay the
 * sealed reply, and fail over to another provider when one drops or refuses
 * before its first chunk. After the first chunk the reply cannot move (the
 * requester has part of it), so a failure then is an error to the requester.
 *
 * The requester's job records are written once a provider answers (and
 * before the reply completes), not before the job is sent.
 *
 * Every job is admitted into the dispatch book first (dispatch-book.ts): its
 * ceiling comes from the policy (a requester's own only lowers it), and the
 * book learns where the job was sent, what the exchange's brokerage
 * countersigned for it (brokerage.ts) and what was relayed, which is all that
 * settlement later trusts.
 *
 * The exchange never holds a prompt it could read here: callers hand it a
 * `seal` function that returns the prompt sealed to a given provider's
 * published key, and it relays ciphertext both ways.
 */
import type { IndexedProvider } from '../../appview/index.ts'
import { consoleLogger as log } from '../../src/logger.ts'
import { compareVersions, type ChunkChannel, type FinishReason, type GenerationParams } from '../../src/protocol/agent.ts'
import type { InputFormat } from '../../src/protocol/input.ts'
import { constraintFrameFields, type JobConstraints } from '../../src/protocol/job-constraints.ts'
import { encSchemeOf, sealedPlaintextBytes, type EncScheme } from '../../src/crypto/enc-scheme.ts'
import type { JobRecords, JobSpec } from '../publisher.ts'
import type { Brokerage } from './brokerage.ts'
import { tokenBounds, type DispatchBook, type Relayed } from './dispatch-book.ts'
import type { ConnectedProvider, JobCompletion, JobSink, ProviderGateway } from './gateway.ts'
import { CURRENCY } from './policy.ts'

export const TIERS = ['private', 'verified', 'probono'] as const
export type Tier = (typeof TIERS)[number]

export interface Route {
  model: string
  requesterDid: string
  tier?: Tier
  /** ISO 3166-1 alpha-2, matched against the provider record's `region`. */
  country?: string
  minProviderVersion?: string
  targetProviderDid?: string
  /** Only these machines (`machineId`s: a client that sealed to them itself). */
  onlyMachines?: string[]
}

export type ExchangeErrorCode =
  | 'no_providers_for_model'
  | 'no_providers_for_country'
  | 'no_providers_for_version'
  | 'no_private_providers'
  | 'no_verified_providers'
  | 'no_probono_providers'
  | 'provider_not_connected'
  | 'no_capacity'
  | 'sealed_input_refused'
  | 'provider_failed'
  | 'job_not_recorded'
  | 'invalid_ceiling'
  | 'verified_tier_unavailable'
  | 'requester_too_slow'

export class ExchangeError extends Error {
  override name = 'ExchangeError'
  readonly code: ExchangeErrorCode
  readonly status: number
  constructor(code: ExchangeErrorCode, status: number, message: string) {
    super(message)
    this.code = code
    this.status = status
  }
}

/** A prompt sealed to one provider: the box, and the requester's ephemeral key the reply is sealed to. */
export interface Envelope {
  ciphertext: string
  requesterPubKey: string
}

export type ExchangeEvent =
  | { kind: 'meta'; providerDid: string; encryptionPubKey: string; sessionId: string; jobUri: string; jobCid: string; authUri: string; inputCommitment: string }
  /** `channel` as the provider tagged it (reasoning, tool_call); absent: the answer. */
  | { kind: 'chunk'; seq: number; ciphertext: string; channel?: ChunkChannel }
  | { kind: 'complete'; tokensIn: number; tokensOut: number; finishReason: FinishReason; receiptUri?: string }

export interface JobInput {
  route: Route
  inputCommitment: string
  inputFormat: InputFormat
  /** Bytes of the sealed plaintext: an upper bound of its tokens, for the price ceiling. */
  inputBytes: number
  maxTokensOut: number
  params: GenerationParams
  /** Public constraints (structured output, tools): on the job record and the frame, never sealed. */
  constraints?: JobConstraints
  /** The requester's own ceiling: it may lower the policy's, never raise it; zero only for pro bono. */
  ceiling?: { amount: number; currency: string }
  /** The prompt sealed to `p`'s key; null when the caller has no envelope for it (it is skipped). */
  seal: (p: ConnectedProvider) => Envelope | null
  /** The requester sealed the prompt itself (the exchange only relays it): see `sealed_input_refused`. */
  sealedByRequester?: boolean
  /** The requester went away: the job is cancelled at the provider. */
  signal: AbortSignal
}

export interface ExchangeOpts {
  gateway: ProviderGateway
  exchangeDid: string
  /** Admission, holds and the record of where each job went. */
  book: DispatchBook
  /** Countersigns each job at dispatch (absent: jobs go without). */
  brokerage?: Brokerage | null
  prepareJob: (did: string, spec: JobSpec) => Promise<JobRecords>
  /** Runs before a job of `did` is admitted (the economy credits a refresh that is due). */
  beforeAdmit?: (did: string) => void
  isFriend: (owner: string, subject: string) => boolean
  /** A provider that sends nothing this long after the request is passed over. */
  firstChunkTimeoutMs?: number
  /** Providers tried per job. */
  maxAttempts?: number
  /** How long the authorization and job records stay valid. */
  jobTtlMs?: number
}

type Step = { t: 'chunk'; seq: number; ciphertext: string; channel?: ChunkChannel } | { t: 'complete'; tokensIn: number; tokensOut: number; finishReason: FinishReason; receiptUri?: string } | { t: 'fail'; code: string; message: string } | { t: 'timeout' }

/**
 * Most reply data a job may have waiting for its requester. Past it the job
 * ends (`requester_too_slow`): a slow reader never grows the exchange's memory.
 */
export const MAX_QUEUED_STEPS = 1024
export const MAX_QUEUED_BYTES = 4 << 20

/**
 * The steps of one job on one provider, awaited one at a time. One timer for
 * the first step and one abort listener serve the whole job: nothing is set up
 * and torn down per wait, and the timer is cleared after the turn in which the
 * first step came, not on the first chunk's way to the requester.
 */
class StepQueue implements JobSink {
  private readonly items: Step[] = []
  private wake: (() => void) | null = null
  private readonly signal: AbortSignal
  private readonly timer: NodeJS.Timeout
  private answered = false
  private queuedBytes = 0
  private overflowed = false
  /** Told at once when the queue overflows: the requester may not come back to read the failure for a long time. */
  onOverflow: (() => void) | null = null
  private readonly poke = () => {
    const w = this.wake
    this.wake = null
    w?.()
  }
  constructor(signal: AbortSignal, firstStepTimeoutMs: number) {
    this.signal = signal
    this.timer = setTimeout(() => this.answered || this.push({ t: 'timeout' }), firstStepTimeoutMs)
    signal.addEventListener('abort', this.poke)
  }
  chunk(seq: number, ciphertext: string, channel?: ChunkChannel) {
    this.push({ t: 'chunk', seq, ciphertext, ...(channel ? { channel } : {}) })
  }
  /** Still working (a long prefill): the wait for its first step starts again. */
  keepalive() {
    if (!this.answered) this.timer.refresh()
  }
  complete(f: JobCompletion) {
    this.push({ t: 'complete', tokensIn: f.tokens_in, tokensOut: f.tokens_out, finishReason: f.finish_reason, ...(typeof f.receipt_uri === 'string' ? { receiptUri: f.receipt_uri } : {}) })
  }
  fail(code: string, message: string) {
    this.push({ t: 'fail', code, message })
  }
  push(s: Step) {
    if (this.overflowed) return
    if (!this.answered && s.t !== 'timeout') {
      this.answered = true
      setImmediate(() => clearTimeout(this.timer))
    }
    if (s.t === 'chunk') this.queuedBytes += s.ciphertext.length
    if (this.items.length >= MAX_QUEUED_STEPS || this.queuedBytes > MAX_QUEUED_BYTES) {
      // What is queued is dropped: the job ends here, and the provider is told to stop.
      this.overflowed = true
      this.items.length = 0
      this.queuedBytes = 0
      this.items.push({ t: 'fail', code: 'requester_too_slow', message: 'the requester did not read the reply as fast as it came' })
      this.onOverflow?.()
    } else this.items.push(s)
    this.poke()
  }
  async next(): Promise<Step> {
    while (this.items.length === 0) {
      this.signal.throwIfAborted()
      await new Promise<void>((resolve) => (this.wake = resolve))
    }
    const s = this.items.shift()!
    if (s.t === 'chunk') this.queuedBytes -= s.ciphertext.length
    return s
  }
  /** Steps waiting for the requester now. */
  get queued(): number {
    return this.items.length
  }
  /** The job is over on this provider. */
  close(): void {
    clearTimeout(this.timer)
    this.signal.removeEventListener('abort', this.poke)
  }
}

export const routeErrorMessages: Record<string, (r: Route) => string> = {
  no_providers_for_model: (r) => `no provider connected now serves the model "${r.model}"`,
  provider_not_connected: (r) =>
    r.targetProviderDid ? `the provider ${r.targetProviderDid} is not connected or does not serve "${r.model}"` : `none of the providers the prompt was sealed to is connected and serves "${r.model}"`,
  no_private_providers: (r) => `no provider of "${r.model}" whose owner lists you as a friend is connected`,
  no_verified_providers: (r) => `no hardware-attested provider of "${r.model}" is connected`,
  no_probono_providers: (r) => `no provider serves "${r.model}" pro bono to you now`,
  no_providers_for_country: (r) => `no provider of "${r.model}" in ${r.country} is connected`,
  no_providers_for_version: (r) => `no provider of "${r.model}" at version ${r.minProviderVersion} or newer is connected`,
}

const active = (p: ConnectedProvider) => p.record.body.active !== false

function servesProBono(record: IndexedProvider, requester: string): boolean {
  const policy = record.body.proBono as { mode?: string; dids?: unknown } | undefined
  if (!policy) return false
  if (policy.mode === 'any') return true
  return policy.mode === 'direct' && Array.isArray(policy.dids) && policy.dids.includes(requester)
}

export class Exchange {
  private readonly opts: ExchangeOpts
  constructor(opts: ExchangeOpts) {
    this.opts = opts
  }

  get gateway(): ProviderGateway {
    return this.opts.gateway
  }

  get book(): DispatchBook {
    return this.opts.book
  }

  /** The providers a job may go to, best first; an ExchangeError naming the filter that left none. */
  route(r: Route): ConnectedProvider[] {
    const fail = (code: keyof typeof routeErrorMessages): never => {
      throw new ExchangeError(code as ExchangeErrorCode, 404, routeErrorMessages[code]!(r))
    }
    let ps = this.opts.gateway.connected(r.model).filter(active)
    if (ps.length === 0) fail('no_providers_for_model')
    if (r.targetProviderDid) {
      ps = ps.filter((p) => p.did === r.targetProviderDid)
      if (ps.length === 0) fail('provider_not_connected')
    }
    if (r.onlyMachines) {
      const only = new Set(r.onlyMachines)
      ps = ps.filter((p) => only.has(p.machine))
      if (ps.length === 0) fail('provider_not_connected')
    }
    if (r.tier === 'private') {
      // Your own machines count as friends.
      ps = ps.filter((p) => p.did === r.requesterDid || this.opts.isFriend(p.did, r.requesterDid))
      if (ps.length === 0) fail('no_private_providers')
    } else if (r.tier === 'verified') {
      // The network routes its confidential tier (its advisor's recomputeConfidential, ADRs 0004-0006)
      // only to a machine whose signed build answered a live code-identity challenge (APNs, a known-good
      // cdHash), with SIP re-verified and, once enforced, a Secure Enclave key; the brokerage
      // countersignature then ties that machine to the job. This exchange challenges the key live and
      // countersigns, but has no code-identity leg: a machine's secureEnclaveAvailable, encScheme and
      // tier are signed by the very key whose residency they claim, its own word. Not offered.
      throw new ExchangeError(
        'verified_tier_unavailable',
        503,
        "the verified tier needs a live code-identity check of the machine's signed build, which this exchange cannot run; a machine's attestation of its own Secure Enclave key is its own word, and no machine is offered on it",
      )
    } else if (r.tier === 'probono') {
      ps = ps.filter((p) => servesProBono(p.record, r.requesterDid))
      if (ps.length === 0) fail('no_probono_providers')
    }
    if (r.country) {
      const want = r.country.toUpperCase()
      ps = ps.filter((p) => typeof p.record.body.region === 'string' && p.record.body.region.toUpperCase() === want)
      if (ps.length === 0) fail('no_providers_for_country')
    }
    if (r.minProviderVersion) {
      const min = r.minProviderVersion
      ps = ps.filter((p) => p.version !== undefined && compareVersions(p.version, min) >= 0)
      if (ps.length === 0) fail('no_providers_for_version')
    }
    // Least busy first, then the one that waited longest for a job (round-robin among equals).
    return ps.sort((a, b) => a.jobs.size - b.jobs.size || a.lastJobAt - b.lastJobAt)
  }

  /** Models served now (by providers routable for `requesterDid` on `tier`), with how many providers serve each. */
  models(requesterDid: string, tier?: Tier): { id: string; providers: number }[] {
    const counts = new Map<string, number>()
    for (const p of this.opts.gateway.connected()) {
      for (const m of p.models) {
        try {
          if (!this.route({ model: m, requesterDid, tier, targetProviderDid: p.did }).length) continue
        } catch {
          continue
        }
        counts.set(m, (counts.get(m) ?? 0) + 1)
      }
    }
    return [...counts].map(([id, providers]) => ({ id, providers })).sort((a, b) => a.id.localeCompare(b.id))
  }

  /**
   * The job's ceiling: the policy's token rate for its input bytes (which
   * bound its input tokens) and `maxTokensOut`. A requester's own ceiling may
   * lower it, never raise it; zero is the pro bono tier's alone.
   */
  private ceilingOf(input: JobInput, proBono: boolean): number {
    if (proBono) return 0
    const most = this.opts.book.ceilingFor(input.inputBytes, input.maxTokensOut)
    const asked = input.ceiling
    if (!asked) return most
    if (asked.currency !== CURRENCY) throw new ExchangeError('invalid_ceiling', 400, `this exchange settles in ${CURRENCY} only, not ${asked.currency}`)
    if (!Number.isSafeInteger(asked.amount) || asked.amount <= 0) throw new ExchangeError('invalid_ceiling', 400, 'the ceiling must be a positive integer: a job that pays nothing goes through the pro bono tier')
    return Math.min(asked.amount, most)
  }

  /**
   * Runs one job: the events a requester sees, in order (`meta` once a
   * provider answers, its `chunk`s, `complete`). Throws ExchangeError, and
   * AdmissionError when the job is not admitted.
   */
  async *run(input: JobInput): AsyncGenerator<ExchangeEvent> {
    const { route, signal } = input
    const { book } = this.opts
    // A machine that cannot read the job's input format (a reference provider older than messages-v1) is not tried.
    const readers = this.route(route).filter((p) => p.inputFormats.includes(input.inputFormat))
    if (readers.length === 0) throw new ExchangeError('no_providers_for_version', 404, `no provider of "${route.model}" connected now reads ${input.inputFormat} input`)
    const candidates = readers.slice(0, this.opts.maxAttempts ?? 3)
    const proBono = route.tier === 'probono'
    const ceiling = this.ceilingOf(input, proBono)
    const records = await this.opts.prepareJob(route.requesterDid, {
      exchangeDid: this.opts.exchangeDid,
      model: route.model,
      inputCommitment: input.inputCommitment,
      inputFormat: input.inputFormat,
      maxTokensOut: input.maxTokensOut,
      ceiling: { amount: ceiling, currency: CURRENCY },
      acceptedTrustLevel: 'self-attested',
      ttlMs: this.opts.jobTtlMs ?? 3600_000,
      ...(input.constraints ? { constraints: input.constraints } : {}),
    })
    this.opts.beforeAdmit?.(route.requesterDid)
    book.admit({
      requesterDid: route.requesterDid,
      model: route.model,
      records,
      proBono,
      inputBytes: input.inputBytes,
      maxTokensOut: input.maxTokensOut,
      ceiling,
      expiresAt: records.jobRecord.expiresAt as string,
    })
    const jobUri = records.job.uri
    const relayed: Relayed = { chunks: 0, bytes: 0 }
    /** How the job ended, for the book: null while it runs, or once it completed. */
    let ending: 'unstarted' | 'failed' | 'cancelled' | null = 'unstarted'
    const failures: string[] = []
    /** Providers that refused the prompt itself (it did not open, or is no valid input). */
    let inputRefusals = 0
    try {
      for (const p of candidates) {
        const env = input.seal(p)
        if (!env) continue
        // The reply's framing (its overhead per chunk) for the exchange's own count of what it relayed.
        let scheme: EncScheme
        try {
          scheme = encSchemeOf({ encryptionPubKey: p.encryptionPubKey, encScheme: p.record.body.encScheme })
        } catch {
          continue
        }
        const steps = new StepQueue(signal, this.opts.firstChunkTimeoutMs ?? 60_000)
        const signed = this.opts.brokerage?.countersign(p, { uri: jobUri, cid: records.job.cid, requester: route.requesterDid }) ?? null
        // Before the job leaves: whatever this machine sends for it is judged against this entry.
        book.dispatched(jobUri, { did: p.did, machine: p.encryptionPubKey, recordUri: p.record.uri, attestationKey: p.attestationKey, witness: signed?.witness ?? null })
        const start = () => this.opts.gateway.startJob(
          p,
          {
            job_uri: jobUri,
            job_cid: records.job.cid,
            requester_did: route.requesterDid,
            requester_pub_key: env.requesterPubKey,
            model: route.model,
            max_tokens_out: input.maxTokensOut,
            ciphertext: env.ciphertext,
            input_format: input.inputFormat,
            input_commitment: input.inputCommitment,
            params: input.params,
            ...(proBono ? { pro_bono: true } : {}),
            ...constraintFrameFields(input.constraints),
            ...(signed ? { brokerage_countersignature: signed.countersignature } : {}),
          },
          steps,
        )
        let job: ReturnType<typeof start>
        try {
          job = start()
        } catch (err) {
          steps.close()
          throw err
        }
        // The provider stops now, not when the stalled requester's stream next moves.
        steps.onOverflow = () => job.cancel('the requester did not read the reply as fast as it came')
        // The records are written once a provider has answered: the PDS commit (tens of ms of CPU on a
        // small machine) must not delay the first token, and a job no provider took leaves no records.
        let written: Promise<void> | null = null
        const publish = () => {
          if (!written) {
            written = records.publish().then(() => book.recorded(jobUri))
            // A job whose records could not be published does not run on.
            written.catch((err: Error) => steps.fail('job_not_recorded', err.message))
          }
          return written
        }
        const meta: ExchangeEvent = { kind: 'meta', providerDid: p.did, encryptionPubKey: p.encryptionPubKey, sessionId: job.sessionId, jobUri, jobCid: records.job.cid, authUri: records.auth.uri, inputCommitment: input.inputCommitment }
        let started = false
        let ended = false
        let nextSeq = 0
        try {
          for (;;) {
            const s = await steps.next()
            if (s.t === 'timeout') {
              failures.push(`${p.did}: no answer in time`)
              break
            }
            if (s.t === 'fail') {
              if (s.code === 'requester_too_slow') {
                ending = 'cancelled'
                throw new ExchangeError('requester_too_slow', 502, s.message)
              }
              if (s.code === 'job_not_recorded') {
                ending = 'failed'
                throw new ExchangeError('job_not_recorded', 502, `your job records could not be published on your PDS: ${s.message}`)
              }
              if (started) {
                ending = 'failed'
                throw new ExchangeError('provider_failed', 502, `the provider failed after the reply began (${s.code}): ${s.message}`)
              }
              failures.push(`${p.did}: ${s.code}`)
              if (s.code === 'decrypt_failed' || s.code === 'bad_input') inputRefusals++
              log.info('job failed over', { provider: p.did, code: s.code })
              break
            }
            if (!started) {
              started = true
              ending = 'cancelled'
              yield meta
              // Once this turn's writes are out: the commit's work (OAuth token, DPoP proof, the XRPC call)
              // runs after the first chunk has been flushed to the requester, not before its socket write.
              setImmediate(() => void publish())
            }
            if (s.t === 'chunk') {
              if (s.seq !== nextSeq) {
                ending = 'failed'
                throw new ExchangeError('provider_failed', 502, `the provider sent chunk ${s.seq} where ${nextSeq} was due`)
              }
              nextSeq++
              relayed.chunks++
              relayed.bytes += sealedPlaintextBytes(s.ciphertext, scheme)
              yield { kind: 'chunk', seq: s.seq, ciphertext: s.ciphertext, ...(s.channel ? { channel: s.channel } : {}) }
              continue
            }
            ended = true
            // What the provider reported, beside what was relayed: the receipt is held to both.
            book.completed(jobUri, { in: s.tokensIn, out: s.tokensOut }, relayed)
            ending = null
            try {
              await publish()
            } catch (err) {
              book.notRecorded(jobUri)
              throw new ExchangeError('job_not_recorded', 502, `your job records could not be published on your PDS: ${(err as Error).message}`)
            }
            // The requester is told (and its daily limit charged) no more than the exchange can vouch for.
            const counted = tokenBounds({ inputBytes: input.inputBytes, maxTokensOut: input.maxTokensOut, reportedIn: s.tokensIn, reportedOut: s.tokensOut, relayedBytes: relayed.bytes })
            yield { kind: 'complete', tokensIn: counted.in, tokensOut: counted.out, finishReason: s.finishReason, ...(s.receiptUri ? { receiptUri: s.receiptUri } : {}) }
            return
          }
        } finally {
          steps.close()
          if (!ended) job.cancel(signal.aborted ? 'the requester went away' : 'failed over')
        }
      }
    } finally {
      if (ending) book.ended(jobUri, ending, relayed)
    }
    // Sealed by the requester to the keys the providers published, and refused by every one of them:
    // the envelopes are what is wrong (the exchange never saw the prompt), not the capacity.
    if (input.sealedByRequester && inputRefusals > 0 && inputRefusals === failures.length) {
      throw new ExchangeError('sealed_input_refused', 400, `every provider tried refused the sealed prompt: ${failures.join('; ')}`)
    }
    throw new ExchangeError('no_capacity', 503, failures.length ? `every provider tried failed: ${failures.join('; ')}` : 'no provider could take the job')
  }
}
