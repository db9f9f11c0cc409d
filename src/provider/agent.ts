/**
 * The reference provider agent (Linux): signs in to its PDS, publishes its
 * provider record and a signed attestation, connects to an exchange's
 * `/v1/agent` and serves the jobs it is sent (src/provider/jobs.ts).
 *
 * Registration proves the DID with a fresh service-auth token for the
 * exchange, and announces the encryption key of the published provider record;
 * the exchange refuses it until its AppView has indexed that record, so the
 * agent keeps retrying (as after any lost connection) with capped
 * exponential backoff.
 *
 * It speaks the network's protocol to any exchange, and announces our
 * extensions (`v`): an exchange that answers `registered` speaks them; one
 * that answers with the network's attestation challenge gets only the
 * network's frames. Both ends of stream resume are the network's: a job sent
 * with a `resume_token` survives a lost connection (src/provider/replay.ts),
 * the others are cancelled with it.
 */
import { EventEmitter } from 'node:events'
import { hostname } from 'node:os'
import { AtpAgent } from '@atproto/api'
import { TID } from '@atproto/common-web'
import { WebSocket, type RawData } from 'ws'
import pkg from '../../package.json' with { type: 'json' }
import { canonicalBytes } from '../crypto/canonical-json.ts'
import type { EncScheme } from '../crypto/enc-scheme.ts'
import type { P256Signer } from '../crypto/p256.ts'
import { ids } from '../lexicon/generated/ids.ts'
import {
  AGENT_PATH,
  attestationChallengePayload,
  base64Of,
  PROTOCOL_VERSION,
  isU32,
  REGISTER_LXM,
  STREAM_RESUME_VERSION,
  toWire,
  type AttestationChallengeFrame,
  type AttestationResponseFrame,
  type InferenceRequestFrame,
  type ProviderFrame,
  type ResumeStatus,
} from '../protocol/agent.ts'
import type { Engine } from './engine.ts'
import { JobRunner } from './jobs.ts'
import { loadOrCreateKeys, saveRecordKeys, type ProviderKeys } from './keys.ts'
import { log } from './log.ts'
import { machineFacts, type MachineFacts } from './machine.ts'
import { attestationRecord, attestsSameState, priceList, providerRecord, type ModelPrice } from './records.ts'
import { ReplayBuffer, RETENTION_MS } from './replay.ts'
import { isSwapConflict, RepoWriter, withRetry, type StrongRef } from './repo.ts'

export const AGENT_VERSION: string = pkg.version

/** Largest frame accepted from the exchange (a sealed prompt is the big one). */
const MAX_INBOUND_BYTES = 16 << 20
/** An attestation is replaced this long before it expires. */
const ATTESTATION_REFRESH_MARGIN_MS = 3600_000
/** After a failed attestation refresh, the next try. */
const ATTESTATION_RETRY_MS = 5 * 60_000
/** How long a closing connection may take before it is cut. */
const CLOSE_GRACE_MS = 2_000

export interface ProviderAgentOpts {
  pdsUrl: string
  /** Handle or DID to sign in with. */
  identifier: string
  password: string
  /** The exchange's base URL (http(s) or ws(s)); the agent connects to its /v1/agent. */
  exchangeUrl: string
  /** The exchange's DID: the audience of the registration token. */
  exchangeDid: string
  keyFile: string
  /** The scheme of a new encryption key (default x25519); an existing key file must hold one of this scheme. */
  encScheme?: EncScheme
  engine: Engine
  models: string[]
  /** Prices of some models; the others get DEFAULT_PRICE. */
  prices?: ModelPrice[]
  /** The provider record's machineLabel (default: the hostname). */
  label?: string
  /** Jobs run at once (default 4). */
  maxConcurrent?: number
  /** A heartbeat this often while registered (default 15 s). */
  heartbeatMs?: number
  /** No frame from the exchange for this long: the connection is presumed dead and replaced (default 60 s). */
  silenceMs?: number
  /** A keepalive for a job that has sent nothing this long (default 10 s, as on the network). */
  keepaliveMs?: number
  /** Reconnection backoff: the first pause, doubled per failure up to the cap (default 1 s to 60 s). */
  reconnect?: { initialMs: number; maxMs: number }
}

export class ProviderAgentError extends Error {
  override name = 'ProviderAgentError'
}

/** Events carry no content: DIDs, URIs, refusal codes. */
export interface AgentEvents {
  registered: [{ exchange: string }]
  refused: [{ code: string; message: string }]
  disconnected: [{ code: number }]
  'attestation-answered': [{ nonce: string }]
}

/** What exists once the agent has signed in and published. */
interface Live {
  did: string
  atp: AtpAgent
  writer: RepoWriter
  facts: MachineFacts
  jobs: JobRunner
  provider: StrongRef
  attestation: StrongRef & { expiresAt: string }
}

/**
 * The answer to an attestation challenge: the attestation key's DER signature
 * over the canonical payload, base64. No SIP on Linux (sip_enabled false); no
 * claim about a hypervisor either way (the field is left out, as the network
 * allows).
 */
export function answerChallenge(f: Pick<AttestationChallengeFrame, 'nonce' | 'timestamp'>, signer: P256Signer): AttestationResponseFrame {
  const signed = { nonce: f.nonce, timestamp: f.timestamp, sip_enabled: false }
  return { type: 'attestation_response', ...signed, signature: Buffer.from(signer.signDer(canonicalBytes(attestationChallengePayload(signed)))).toString('base64') }
}

type Frame = Record<string, unknown> & { type: string }

/** A resumable job's kept frames, and the timer that lets it go if it is not resumed (or its completion not acknowledged). */
interface Replay {
  buffer: ReplayBuffer
  expiry?: NodeJS.Timeout
}

export class ProviderAgent extends EventEmitter<AgentEvents> {
  readonly opts: ProviderAgentOpts
  readonly keys: ProviderKeys
  private live: Live | null = null
  private ws: WebSocket | null = null
  private registeredOn: WebSocket | null = null
  /** The registered exchange speaks our extensions (null until it has answered the register). */
  private extended: boolean | null = null
  /** The owner's pro bono policy as last published, for an exchange that leaves the decision to the provider. */
  private proBono: { mode?: unknown; dids?: unknown } | null = null
  /** Jobs sent with a resume_token, by session. */
  private readonly replays = new Map<string, Replay>()
  private stopping = false
  private failures = 0
  private lastHeard = 0
  private reconnectTimer: NodeJS.Timeout | null = null
  private heartbeatTimer: NodeJS.Timeout | null = null
  private attestationTimer: NodeJS.Timeout | null = null

  /** Loads (or creates) the key file at once: a bad one fails here, before anything is published. */
  constructor(opts: ProviderAgentOpts) {
    super()
    if (opts.models.length === 0) throw new ProviderAgentError('at least one model is needed')
    this.opts = opts
    this.keys = loadOrCreateKeys(opts.keyFile, { encScheme: opts.encScheme })
  }

  private need(): Live {
    if (!this.live) throw new ProviderAgentError('the agent is not started')
    return this.live
  }

  get did(): string {
    return this.need().did
  }

  /** The records in force: the provider record and the attestation receipts cite. */
  get published(): { provider: StrongRef; attestation: StrongRef } {
    const { provider, attestation } = this.need()
    return { provider, attestation: { uri: attestation.uri, cid: attestation.cid } }
  }

  get jobs(): JobRunner {
    return this.need().jobs
  }

  /** Registered with the exchange on the current connection. */
  get registered(): boolean {
    return this.registeredOn !== null && this.registeredOn === this.ws
  }

  /** Signs in, publishes the records, and starts connecting to the exchange (registration follows in the background). */
  async start(): Promise<void> {
    if (this.live) throw new ProviderAgentError('the agent is already started')
    const { pdsUrl, identifier, password } = this.opts
    const atp = new AtpAgent({ service: pdsUrl })
    // A PDS that is down or failing as the agent starts is waited for (about a minute, backing off);
    // credentials it refuses are not.
    const startup = (what: string) => ({ attempts: 8, firstDelayMs: 500, onRetry: (err: unknown) => log.warn(`${what} failed; retrying`, { err: err as Error }) })
    try {
      const refused = (err: unknown) => [400, 401].includes((err as { status?: unknown }).status as number)
      await withRetry(() => atp.login({ identifier, password }), { ...startup('signing in'), permanent: refused })
    } catch (err) {
      throw new ProviderAgentError(`could not sign in to ${pdsUrl} as ${identifier}: ${(err as Error).message}`)
    }
    const did = atp.session!.did
    const writer = new RepoWriter(atp, did)
    const facts = machineFacts()
    const prices = priceList(this.opts.models, this.opts.prices)
    const retry = startup('publishing')
    const provider = await withRetry(() => this.publishProvider(writer, facts, prices), retry)
    const attestation = await withRetry(() => this.publishAttestation(writer, facts, false), retry)
    const jobs = new JobRunner({
      did,
      keys: this.keys,
      engine: this.opts.engine,
      prices,
      attestation: () => this.published.attestation,
      writer,
      send: (frame) => this.send(frame),
      maxConcurrent: this.opts.maxConcurrent,
      keepaliveMs: this.opts.keepaliveMs,
      extended: () => this.extended !== false,
      proBonoFor: (requester) => this.proBono?.mode === 'any' || (this.proBono?.mode === 'direct' && Array.isArray(this.proBono.dids) && this.proBono.dids.includes(requester)),
    })
    // A job that ends without a completion (cancelled) has nothing left to resume.
    jobs.on('job-cancelled', ({ sessionId }) => {
      const r = this.replays.get(sessionId)
      if (r && !r.buffer.completed) this.dropReplay(sessionId)
    })
    this.live = { did, atp, writer, facts, jobs, provider, attestation }
    log.info('provider records published', { did, provider: provider.uri, attestation: attestation.uri })
    // stop() may have come while publishing: then nothing more is started.
    if (this.stopping) return
    this.scheduleAttestationRefresh()
    this.connect()
  }

  /** Closes the connection, cancels running jobs (no receipts for them), and waits for pending receipt writes. */
  async stop(): Promise<void> {
    if (this.stopping) return
    this.stopping = true
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer)
    if (this.attestationTimer) clearTimeout(this.attestationTimer)
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer)
    this.live?.jobs.cancelAll('the provider is shutting down')
    for (const id of [...this.replays.keys()]) this.dropReplay(id)
    const ws = this.ws
    if (ws) await closeSocket(ws)
    await this.live?.jobs.idle()
    log.info('provider agent stopped')
  }

  // ---- records ---------------------------------------------------------------

  /** The provider record at its stable rkey, keeping createdAt and the owner's fields; a concurrent edit by the owner is re-read, not overwritten. */
  private async publishProvider(writer: RepoWriter, facts: MachineFacts, prices: ModelPrice[]): Promise<StrongRef> {
    let rkey = this.keys.records.provider
    if (!rkey) {
      // Kept before the first write: a crash after it still finds the record again.
      rkey = TID.nextStr()
      saveRecordKeys(this.keys, { ...this.keys.records, provider: rkey })
    }
    for (let attempt = 1; ; attempt++) {
      const existing = await writer.get(ids.ComputeProvider, rkey)
      const record = providerRecord({
        keys: this.keys,
        facts,
        did: writer.did,
        models: this.opts.models,
        prices,
        label: this.opts.label ?? hostname(),
        version: AGENT_VERSION,
        existing: existing?.value,
      })
      try {
        const ref = await writer.put(ids.ComputeProvider, rkey, record, existing?.cid ?? null)
        this.proBono = (record.proBono as typeof this.proBono) ?? null
        return ref
      } catch (err) {
        if (!isSwapConflict(err) || attempt >= 3) throw err
      }
    }
  }

  /**
   * The attestation in force: the published one when it states this machine's
   * present state and is not about to expire, else a new one under a new rkey.
   * Old ones stay: receipts cite them by cid, so they are never rewritten.
   */
  private async publishAttestation(writer: RepoWriter, facts: MachineFacts, forceNew: boolean): Promise<StrongRef & { expiresAt: string }> {
    const rkey = this.keys.records.attestation
    const current = rkey && !forceNew ? await writer.get(ids.ComputeAttestation, rkey) : null
    if (current && attestsSameState(current.value, this.keys, facts, writer.did)) {
      const expiresAt = String(current.value.expiresAt)
      if (Date.parse(expiresAt) - Date.now() > ATTESTATION_REFRESH_MARGIN_MS) return { uri: current.uri, cid: current.cid, expiresAt }
    }
    const fresh = TID.nextStr()
    const record = attestationRecord(this.keys, facts, writer.did)
    const ref = await writer.put(ids.ComputeAttestation, fresh, record, null)
    saveRecordKeys(this.keys, { ...this.keys.records, attestation: fresh })
    return { ...ref, expiresAt: record.expiresAt }
  }

  private scheduleAttestationRefresh(inMs?: number): void {
    const live = this.need()
    const due = inMs ?? Math.max(60_000, Date.parse(live.attestation.expiresAt) - ATTESTATION_REFRESH_MARGIN_MS - Date.now())
    this.attestationTimer = setTimeout(() => {
      this.publishAttestation(live.writer, live.facts, true).then(
        (att) => {
          live.attestation = att
          log.info('attestation renewed', { uri: att.uri })
          if (!this.stopping) this.scheduleAttestationRefresh()
        },
        (err: unknown) => {
          log.error('attestation renewal failed; receipts keep citing the current one', { err: err as Error })
          if (!this.stopping) this.scheduleAttestationRefresh(ATTESTATION_RETRY_MS)
        },
      )
    }, due)
    this.attestationTimer.unref()
  }

  // ---- the exchange connection -------------------------------------------------

  private agentUrl(): string {
    const base = this.opts.exchangeUrl.replace(/^http/, 'ws').replace(/\/+$/, '')
    return base.endsWith(AGENT_PATH) ? base : base + AGENT_PATH
  }

  private connect(): void {
    const ws = new WebSocket(this.agentUrl(), { handshakeTimeout: 10_000, maxPayload: MAX_INBOUND_BYTES })
    this.ws = ws
    this.extended = null
    ws.on('open', () => void this.register(ws))
    ws.on('message', (data, isBinary) => this.onMessage(ws, data, isBinary))
    // The network's exchange keeps a quiet connection alive with WebSocket pings: hearing one is hearing from it.
    ws.on('ping', () => ws === this.ws && (this.lastHeard = Date.now()))
    // 'close' follows every error; it decides what happens next.
    ws.on('error', (err) => log.info('exchange connection error', { err }))
    ws.on('close', (code) => this.onClose(ws, code))
  }

  /** The network's register frame, with `v` announcing our extensions. */
  private async register(ws: WebSocket): Promise<void> {
    const live = this.need()
    let token: string
    try {
      token = (await live.atp.com.atproto.server.getServiceAuth({ aud: this.opts.exchangeDid, lxm: REGISTER_LXM })).data.token
    } catch (err) {
      log.warn('could not get a service-auth token from the PDS', { err: err as Error })
      return void ws.terminate()
    }
    if (ws !== this.ws) return
    this.lastHeard = Date.now()
    const rkey = this.keys.records.provider
    sendOn(ws, true, {
      type: 'register',
      provider_did: live.did,
      auth_jwt: token,
      ...(rkey ? { machine_id: rkey } : {}),
      machine_label: (this.opts.label ?? hostname()).slice(0, 128),
      chip: live.facts.chip,
      ram_gb: live.facts.ramGB,
      supported_models: this.opts.models,
      encryption_pub_key: Buffer.from(this.keys.encryption.publicKey).toString('base64'),
      attestation_pub_key: Buffer.from(this.keys.signer.rawPublicKey()).toString('base64'),
      attestation_uri: live.attestation.uri,
      binary_version: AGENT_VERSION,
      enc_scheme: this.keys.encryption.scheme,
      // A software key on a machine without hardware evidence.
      tier: 'best-effort',
      stream_resume_version: STREAM_RESUME_VERSION,
    })
  }

  private onMessage(ws: WebSocket, data: RawData, isBinary: boolean): void {
    if (ws !== this.ws) return
    this.lastHeard = Date.now()
    let frame: Frame
    try {
      frame = JSON.parse(isBinary ? '' : data.toString()) as Frame
      if (!frame || typeof frame.type !== 'string') throw new Error('no type')
    } catch {
      return log.warn('unreadable frame from the exchange; ignored')
    }
    // Frames of the network carry no `v`; ours carry this version.
    if (frame.v !== undefined && frame.v !== PROTOCOL_VERSION) return log.warn('frame of another protocol version; ignored', { type: frame.type, v: frame.v })
    const extended = frame.v === PROTOCOL_VERSION
    switch (frame.type) {
      case 'registered':
        if (extended) this.onRegistered(ws, true, typeof frame.exchange === 'string' ? frame.exchange : this.opts.exchangeDid)
        return
      case 'error': {
        if (!extended) return
        // The exchange closes the connection after a refusal; the close handler retries.
        const code = String(frame.code)
        const message = String(frame.message)
        const waiting = code === 'encryption_key_mismatch'
        log[waiting ? 'info' : 'warn'](waiting ? 'exchange has not indexed the provider record yet' : 'exchange refused the connection', { code, message })
        return void this.emit('refused', { code, message })
      }
      case 'ping':
        return sendOn(ws, extended, { type: 'pong', ...(typeof frame.nonce === 'string' ? { nonce: frame.nonce } : {}), ...(extended && typeof frame.t === 'number' ? { t: frame.t } : {}) })
      case 'attestation_challenge':
        this.onChallenge(ws, extended, frame)
        // The network's exchange accepts a register by challenging it.
        if (!extended && this.registeredOn !== ws) this.onRegistered(ws, false, this.opts.exchangeDid)
        return
      case 'inference_request':
        return this.onRequest(frame)
      case 'inference_cancel':
        if (extended && typeof frame.session_id === 'string') this.need().jobs.cancel(frame.session_id, typeof frame.reason === 'string' ? frame.reason : 'cancelled by the exchange')
        return
      case 'inference_ack':
        return this.onAck(frame)
      case 'inference_resume_result':
        return this.onResumeResult(frame)
      default:
        // pong, and the network's frames this agent does not act on (health_notice, control_changed, recover_request).
        log.debug('frame not acted on', { type: frame.type })
    }
  }

  private onRegistered(ws: WebSocket, extended: boolean, exchange: string): void {
    this.registeredOn = ws
    this.extended = extended
    this.failures = 0
    this.startHeartbeat(ws)
    log.info('registered with the exchange', { exchange, extended })
    this.emit('registered', { exchange })
    // The jobs a lost connection left running, asked back.
    for (const { buffer } of this.replays.values()) {
      if (!buffer.attached) sendOn(ws, extended, { type: 'inference_resume', session_id: buffer.sessionId, resume_token: buffer.token, produced_seq: buffer.producedSeq })
    }
  }

  private onChallenge(ws: WebSocket, extended: boolean, f: Frame): void {
    const ok = (s: unknown): s is string => typeof s === 'string' && s.length > 0 && s.length <= 256
    if (!ok(f.nonce) || !ok(f.timestamp)) return log.warn('malformed attestation challenge; ignored')
    sendOn(ws, extended, answerChallenge({ nonce: f.nonce, timestamp: f.timestamp }, this.keys.signer))
    this.emit('attestation-answered', { nonce: f.nonce })
  }

  private onRequest(frame: Frame): void {
    // Byte fields arrive as base64 from an exchange with our extensions, as arrays of byte values from the network's.
    const ciphertext = base64Of(frame.ciphertext)
    const request = { ...frame, ciphertext: ciphertext ?? undefined } as unknown as InferenceRequestFrame
    const { session_id: sessionId, resume_token: token } = request
    if (typeof token === 'string' && token && typeof sessionId === 'string') {
      // A duplicate would end the one running on the exchange: ignored, unanswered.
      if (this.replays.has(sessionId)) return log.warn('inference_request for a session already running; ignored', { sessionId })
      this.replays.set(sessionId, { buffer: new ReplayBuffer(sessionId, token) })
    }
    void this.need().jobs.run(request)
  }

  private replayOf(f: Frame): Replay | null {
    const r = typeof f.session_id === 'string' ? this.replays.get(f.session_id) : undefined
    return r && f.resume_token === r.buffer.token ? r : null
  }

  private onAck(f: Frame): void {
    const r = this.replayOf(f)
    if (!r || !isU32(f.next_seq)) return
    if (r.buffer.ack(f.next_seq, f.completed === true)) this.dropReplay(r.buffer.sessionId)
  }

  private onResumeResult(f: Frame): void {
    const r = this.replayOf(f)
    if (!r || !isU32(f.next_seq) || !['resume', 'completed', 'rejected'].includes(f.status as string)) return
    const sessionId = r.buffer.sessionId
    if (r.buffer.resumed(f.status as ResumeStatus, f.next_seq) === 'end') {
      if (f.status !== 'completed') log.info('job not resumed', { sessionId, status: f.status, reason: f.reason })
      this.dropReplay(sessionId)
      return void this.need().jobs.cancel(sessionId, 'the exchange did not resume it')
    }
    // Running again: it expires only once its completion waits unacknowledged.
    clearTimeout(r.expiry)
    if (r.buffer.completed) this.expireLater(r)
    this.flush(r)
  }

  /** Lets a resumable job go (and stops it) if nothing settles it within RETENTION_MS. */
  private expireLater(r: Replay): void {
    clearTimeout(r.expiry)
    const sessionId = r.buffer.sessionId
    r.expiry = setTimeout(() => {
      if (this.replays.get(sessionId) !== r) return
      this.dropReplay(sessionId)
      this.live?.jobs.cancel(sessionId, 'not resumed in time')
    }, RETENTION_MS)
    r.expiry.unref()
  }

  private dropReplay(sessionId: string): void {
    clearTimeout(this.replays.get(sessionId)?.expiry)
    this.replays.delete(sessionId)
  }

  private onClose(ws: WebSocket, code: number): void {
    if (ws !== this.ws) return
    const wasRegistered = this.registeredOn === ws
    this.ws = null
    this.registeredOn = null
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer)
    this.heartbeatTimer = null
    // Their frames could no longer reach the requester: the exchange fails them over. Resumable ones wait to be asked back.
    this.live?.jobs.cancelAll('the exchange connection closed', (sessionId) => this.replays.has(sessionId))
    for (const r of this.replays.values()) {
      r.buffer.detach()
      this.expireLater(r)
    }
    this.emit('disconnected', { code })
    if (this.stopping) return
    const delay = this.reconnectDelay()
    log[wasRegistered ? 'warn' : 'info']('exchange connection closed; reconnecting', { code, inMs: delay })
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null
      if (!this.stopping) this.connect()
    }, delay)
  }

  /** Capped exponential backoff with ±20% jitter, so many agents do not reconnect in step. */
  private reconnectDelay(): number {
    const { initialMs, maxMs } = this.opts.reconnect ?? { initialMs: 1000, maxMs: 60_000 }
    const base = Math.min(maxMs, initialMs * 2 ** Math.min(this.failures++, 30))
    return Math.round(base * (0.8 + Math.random() * 0.4))
  }

  private startHeartbeat(ws: WebSocket): void {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer)
    const silenceMs = this.opts.silenceMs ?? 60_000
    this.heartbeatTimer = setInterval(() => {
      if (Date.now() - this.lastHeard > silenceMs) {
        log.warn('exchange silent; reconnecting', { silentMs: Date.now() - this.lastHeard })
        return void ws.terminate()
      }
      const running = this.need().jobs.active
      this.send({ type: 'heartbeat', load: running, queue_depth: running, at: new Date().toISOString(), active: true })
    }, this.opts.heartbeatMs ?? 15_000)
  }

  /**
   * Frames go out on the registered connection only, in its dialect. A
   * resumable job's output is kept (replay.ts) and leaves from there while
   * its job is attached to this connection.
   */
  private send(frame: ProviderFrame): void {
    const r = 'session_id' in frame ? this.replays.get(frame.session_id) : undefined
    if (r && (frame.type === 'inference_chunk' || frame.type === 'inference_complete')) {
      if (r.buffer.push(frame) === 'overflow') {
        // Unacknowledged past the bounds: the job ends with what it has.
        r.buffer.truncate()
        this.live?.jobs.cancel(frame.session_id, 'its unacknowledged output outgrew the replay buffer')
      }
      if (frame.type === 'inference_complete' || r.buffer.completed) this.expireLater(r)
      return this.flush(r)
    }
    // Ours: an error ends the job on the exchange, nothing to resume.
    if (r && frame.type === 'inference_error') this.dropReplay(frame.session_id)
    // A keepalive for a job not yet resumed here would be for a session the exchange holds aside.
    if (r && !r.buffer.attached) return
    if (this.registered && this.ws) sendBatched(this.ws, toWire(frame, this.extended !== false))
  }

  private flush(r: Replay): void {
    if (!this.registered || !this.ws) return
    for (const frame of r.buffer.drain()) sendBatched(this.ws, toWire(frame, this.extended !== false))
  }
}

function sendOn(ws: WebSocket, extended: boolean, frame: ProviderFrame): void {
  if (ws.readyState === WebSocket.OPEN) ws.send(toWire(frame, extended))
}

/** Sockets whose writes are held until the end of the current turn. */
const corked = new WeakSet<object>()

/**
 * Job frames: the first one of a turn goes out at once, the ones sent after
 * it in the same turn (the pieces an engine delivered together) leave
 * together in one write at the end of the turn, not one system call and one
 * packet each, which the exchange would then read one by one.
 */
function sendBatched(ws: WebSocket, text: string): void {
  if (ws.readyState !== WebSocket.OPEN) return
  ws.send(text)
  // ws keeps its socket as _socket (the library has no cork of its own); without one, frames go one by one.
  const socket = (ws as unknown as { _socket?: { cork(): void; uncork(): void; destroyed: boolean } })._socket
  if (!socket || corked.has(socket)) return
  corked.add(socket)
  socket.cork()
  process.nextTick(() => {
    corked.delete(socket)
    if (!socket.destroyed) socket.uncork()
  })
}

/** Closes politely, and cuts the connection if the other side does not answer in time. */
async function closeSocket(ws: WebSocket): Promise<void> {
  if (ws.readyState === WebSocket.CLOSED) return
  const closed = new Promise<void>((resolve) => ws.once('close', () => resolve()))
  if (ws.readyState === WebSocket.CONNECTING) ws.terminate()
  else if (ws.readyState === WebSocket.OPEN) ws.close(1000, 'provider shutting down')
  const timer = setTimeout(() => ws.terminate(), CLOSE_GRACE_MS)
  await closed
  clearTimeout(timer)
}
