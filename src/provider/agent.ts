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
  PROTOCOL_VERSION,
  REGISTER_LXM,
  type AttestationChallengeFrame,
  type AttestationResponseFrame,
  type ExchangeFrame,
  type InferenceCancelFrame,
  type InferenceRequestFrame,
  type ProviderFrame,
} from '../protocol/agent.ts'
import type { Engine } from './engine.ts'
import { JobRunner } from './jobs.ts'
import { loadOrCreateKeys, saveRecordKeys, type ProviderKeys } from './keys.ts'
import { log } from './log.ts'
import { machineFacts, type MachineFacts } from './machine.ts'
import { attestationRecord, attestsSameState, priceList, providerRecord, type ModelPrice } from './records.ts'
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

/** The answer to an attestation challenge: the attestation key's DER signature over the canonical payload, base64. */
export function answerChallenge(f: Pick<AttestationChallengeFrame, 'nonce' | 'timestamp'>, signer: P256Signer): AttestationResponseFrame {
  const signed = { nonce: f.nonce, timestamp: f.timestamp, sip_enabled: false }
  return { type: 'attestation_response', v: PROTOCOL_VERSION, ...signed, signature: Buffer.from(signer.signDer(canonicalBytes(attestationChallengePayload(signed)))).toString('base64') }
}

export class ProviderAgent extends EventEmitter<AgentEvents> {
  readonly opts: ProviderAgentOpts
  readonly keys: ProviderKeys
  private live: Live | null = null
  private ws: WebSocket | null = null
  private registeredOn: WebSocket | null = null
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
        return await writer.put(ids.ComputeProvider, rkey, record, existing?.cid ?? null)
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
    ws.on('open', () => void this.register(ws))
    ws.on('message', (data, isBinary) => this.onMessage(ws, data, isBinary))
    // 'close' follows every error; it decides what happens next.
    ws.on('error', (err) => log.info('exchange connection error', { err }))
    ws.on('close', (code) => this.onClose(ws, code))
  }

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
    sendOn(ws, {
      type: 'register',
      v: PROTOCOL_VERSION,
      did: live.did,
      serviceAuth: token,
      encryptionPubKey: Buffer.from(this.keys.encryption.publicKey).toString('base64'),
      models: this.opts.models,
      version: AGENT_VERSION,
    })
  }

  private onMessage(ws: WebSocket, data: RawData, isBinary: boolean): void {
    if (ws !== this.ws) return
    this.lastHeard = Date.now()
    let frame: ExchangeFrame
    try {
      frame = JSON.parse(isBinary ? '' : data.toString()) as ExchangeFrame
      if (!frame || typeof frame.type !== 'string') throw new Error('no type')
    } catch {
      return log.warn('unreadable frame from the exchange; ignored')
    }
    if (frame.v !== PROTOCOL_VERSION) return log.warn('frame of another protocol version; ignored', { type: frame.type, v: frame.v })
    switch (frame.type) {
      case 'registered':
        this.registeredOn = ws
        this.failures = 0
        this.startHeartbeat(ws)
        log.info('registered with the exchange', { exchange: frame.exchange })
        return void this.emit('registered', { exchange: frame.exchange })
      case 'error': {
        // The exchange closes the connection after a refusal; the close handler retries.
        const waiting = frame.code === 'encryption_key_mismatch'
        log[waiting ? 'info' : 'warn'](waiting ? 'exchange has not indexed the provider record yet' : 'exchange refused the connection', { code: frame.code, message: frame.message })
        return void this.emit('refused', { code: frame.code, message: frame.message })
      }
      case 'ping':
        return sendOn(ws, { type: 'pong', v: PROTOCOL_VERSION, ...(typeof frame.t === 'number' ? { t: frame.t } : {}) })
      case 'pong':
        return
      case 'attestation_challenge':
        return this.onChallenge(ws, frame)
      case 'inference_request':
        return void this.need().jobs.run(frame as InferenceRequestFrame)
      case 'inference_cancel': {
        const f = frame as InferenceCancelFrame
        if (typeof f.session_id === 'string') this.need().jobs.cancel(f.session_id, typeof f.reason === 'string' ? f.reason : 'cancelled by the exchange')
        return
      }
      default:
        log.debug('unknown frame type; ignored', { type: (frame as { type: string }).type })
    }
  }

  private onChallenge(ws: WebSocket, f: AttestationChallengeFrame): void {
    const ok = (s: unknown) => typeof s === 'string' && s.length > 0 && s.length <= 256
    if (!ok(f.nonce) || !ok(f.timestamp)) return log.warn('malformed attestation challenge; ignored')
    sendOn(ws, answerChallenge(f, this.keys.signer))
    this.emit('attestation-answered', { nonce: f.nonce })
  }

  private onClose(ws: WebSocket, code: number): void {
    if (ws !== this.ws) return
    const wasRegistered = this.registeredOn === ws
    this.ws = null
    this.registeredOn = null
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer)
    this.heartbeatTimer = null
    // Their frames could no longer reach the requester: the exchange fails them over.
    this.live?.jobs.cancelAll('the exchange connection closed')
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
      sendOn(ws, { type: 'heartbeat', v: PROTOCOL_VERSION, load: this.need().jobs.active })
    }, this.opts.heartbeatMs ?? 15_000)
  }

  /** Job frames go out on the registered connection only. */
  private send(frame: ProviderFrame): void {
    if (this.registered && this.ws) sendBatched(this.ws, frame)
  }
}

function sendOn(ws: WebSocket, frame: ProviderFrame): void {
  if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame))
}

/** Sockets whose writes are held until the end of the current turn. */
const corked = new WeakSet<object>()

/**
 * Job frames: the first one of a turn goes out at once, the ones sent after
 * it in the same turn (the pieces an engine delivered together) leave
 * together in one write at the end of the turn, not one system call and one
 * packet each, which the exchange would then read one by one.
 */
function sendBatched(ws: WebSocket, frame: ProviderFrame): void {
  if (ws.readyState !== WebSocket.OPEN) return
  ws.send(JSON.stringify(frame))
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
