/**
 * The provider gateway: providers connect over a WebSocket (`/v1/agent`) and
 * speak the agent protocol (src/protocol/agent.ts).
 *
 * Registration is bound to the provider's DID. The provider presents a
 * service-auth JWT minted by its own PDS for this exchange (audience: the
 * exchange's DID), verified against the provider DID's signing key; and the
 * X25519 key it announces must be the `encryptionPubKey` of one of its
 * indexed (signed) `compute.provider` records, so requesters seal prompts to a
 * key its owner published, never to one the connection made up. That record
 * is what routing reads (tier, region, pro bono policy); a live attestation
 * challenge, answered with the record's attestation key, proves the machine
 * still holds it. Only an attested machine on an open socket is routed to.
 *
 * Limits: one register per socket; a socket not registered and attested
 * within `registerTimeoutMs` is closed; upgrades beyond `maxConnections`
 * (503) or `maxConnectionsPerAddress` (429) are refused before the handshake.
 *
 * Jobs: `startJob` sends a sealed `inference_request`; the provider's chunk,
 * complete and error frames for that session reach the job's sink, and only
 * from the socket the job was sent on.
 */
import { randomBytes } from 'node:crypto'
import type { IncomingMessage, Server } from 'node:http'
import type { Duplex } from 'node:stream'
import type { IdResolver } from '@atproto/identity'
import { verifyJwt } from '@atproto/xrpc-server'
import { WebSocketServer, type WebSocket } from 'ws'
import type { IndexedProvider } from '../../appview/index.ts'
import { canonicalBytes } from '../../src/crypto/canonical-json.ts'
import { p256PublicKey, toBytes, verifyDer } from '../../src/crypto/p256.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import { consoleLogger as log } from '../../src/logger.ts'
import { refuseSocket } from '../../src/net/http-server.ts'
import { XrpcError } from '../../src/xrpc/errors.ts'
import {
  AGENT_PATH,
  attestationChallengePayload,
  PROTOCOL_VERSION,
  REGISTER_LXM,
  type ExchangeFrame,
  type InferenceCompleteFrame,
  type InferenceErrorCode,
  type InferenceRequestFrame,
} from '../../src/protocol/agent.ts'

export { AGENT_PATH, PROTOCOL_VERSION }

function isAgentUpgrade(req: IncomingMessage): boolean {
  return (req.url ?? '').split('?')[0] === AGENT_PATH
}

const upgradeErrors: Record<number, string> = { 405: 'MethodNotAllowed', 429: 'RateLimitExceeded', 503: 'NotEnoughResources' }

/** Refuses an upgrade with an XRPC error body (what every other refusal of the console's server carries). */
function refuseUpgrade(socket: Duplex, message: string, status = 400, headers: string[] = []): void {
  refuseSocket(socket, status, new XrpcError(status, upgradeErrors[status] ?? 'InvalidRequest', message).toJSON(), headers)
}

/** Largest frame a provider may send (a sealed reply chunk is far smaller). */
const MAX_FRAME_BYTES = 1 << 20

export interface ConnectedProvider {
  /** One machine: a DID may run several, each with its own provider record and key. */
  machine: string
  did: string
  encryptionPubKey: string
  models: string[]
  version?: string
  connectedAt: string
  lastSeen: number
  /** The indexed provider record whose key this connection announced: routing reads it. */
  record: IndexedProvider
  /** Answered the attestation challenge with the record's attestation key. */
  attested: boolean
  /** The record's `attestationPubKey` (base64 raw P-256) that answered the challenge; null until then. */
  attestationKey: string | null
  /** Jobs running on this connection now. */
  jobs: Map<string, JobSink>
  /** When it was last given a job (0: never), for round-robin among equals. */
  lastJobAt: number
  socket: WebSocket
}

/** What a job receives from its provider. */
export interface JobSink {
  chunk(seq: number, ciphertext: string): void
  complete(frame: InferenceCompleteFrame): void
  /** The provider refused or failed the job, or the connection was lost (`lost`). */
  fail(code: InferenceErrorCode | 'lost' | 'protocol_error', message: string): void
}

export interface GatewayOpts {
  /** The exchange's DID: the audience provider tokens must name. */
  exchangeDid: string
  idResolver: IdResolver
  /** The DID's indexed, valid `compute.provider` records, newest first. */
  providerRecords: (did: string) => IndexedProvider[] | Promise<IndexedProvider[]>
  /** Heartbeat: a ping this often; a provider silent for 3 intervals is dropped. */
  pingIntervalMs?: number
  /** A socket that has not registered and answered its attestation challenge by then is closed (default 10 s). */
  registerTimeoutMs?: number
  /** Provider sockets open at once (default 2000); an upgrade beyond it is refused with 503. */
  maxConnections?: number
  /** Provider sockets open at once per client address (default 32); an upgrade beyond it is refused with 429. */
  maxConnectionsPerAddress?: number
  /** The client's address for the per-address cap (default: the TCP peer); undefined leaves only the total cap. */
  clientAddress?: (req: IncomingMessage) => string | undefined
}

type Frame = Record<string, unknown> & { type: string }

/** Refusal codes sent in `{ type: 'error', code, message }` before closing. */
export type RefusalCode =
  | 'bad_frame'
  | 'unsupported_version'
  | 'not_registered'
  | 'already_registered'
  | 'register_timeout'
  | 'auth_failed'
  | 'encryption_key_mismatch'
  | 'model_not_published'
  | 'frame_too_large'
  | 'attestation_failed'

const send = (ws: WebSocket, frame: ExchangeFrame) => ws.send(JSON.stringify(frame))

/** Tells the provider why, then closes. */
function refuse(ws: WebSocket, code: RefusalCode, message: string): void {
  send(ws, { type: 'error', v: PROTOCOL_VERSION, code, message })
  ws.close(1008, code)
}

/** A machine is a DID and the encryption key of one of its provider records. */
export const machineId = (did: string, encryptionPubKey: string) => `${did} ${encryptionPubKey}`

const supportedModels = (record: IndexedProvider): unknown[] => (Array.isArray(record.body.supportedModels) ? record.body.supportedModels : [])

export class ProviderGateway {
  private readonly opts: GatewayOpts
  private readonly wss: WebSocketServer
  /** Connected machines, by `machineId(did, encryptionPubKey)`. */
  readonly providers = new Map<string, ConnectedProvider>()
  private readonly timer: NodeJS.Timeout
  private open = 0
  /** Open sockets per client address; an address leaves with its last socket. */
  private readonly perAddress = new Map<string, number>()

  constructor(opts: GatewayOpts) {
    this.opts = opts
    this.wss = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME_BYTES })
    this.wss.on('connection', (ws) => this.onConnection(ws))
    // A handshake ws refuses gets the console's error body instead of ws's plain-text one (ws answers
    // 405 to a method other than GET and asks for version 13 when the version header is wrong).
    this.wss.on('wsClientError', (err: Error, socket: Duplex, req: IncomingMessage) => {
      const version = /Sec-WebSocket-Version/.test(err.message) ? ['Sec-WebSocket-Version: 13'] : []
      refuseUpgrade(socket, err.message, req.method === 'GET' ? 400 : 405, version)
    })
    const every = opts.pingIntervalMs ?? 15_000
    this.timer = setInterval(() => this.heartbeat(every), every)
    this.timer.unref()
  }

  /** Takes the upgrade requests for `/v1/agent` on the console's HTTP server. */
  attach(server: Server): void {
    // Where Node supports it, an upgrade to any other path is served as the plain request it also is.
    ;(server as Server & { shouldUpgradeCallback?: (req: IncomingMessage) => boolean }).shouldUpgradeCallback = isAgentUpgrade
    server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      // Elsewhere this listener gets every upgrade: one it ignored would hold its socket open forever,
      // and a target that is no URL must not throw here (an 'upgrade' listener's throw ends the process).
      if (!isAgentUpgrade(req)) return refuseUpgrade(socket, `WebSocket upgrades are served at ${AGENT_PATH} only`)
      if (!this.admit(req, socket)) return
      this.wss.handleUpgrade(req, socket, head, (ws) => this.wss.emit('connection', ws, req))
    })
  }

  /** Provider sockets open now, registered or not. */
  get connections(): number {
    return this.open
  }

  /** Routable providers that serve `model` (all when undefined): attested, on a socket still open. */
  connected(model?: string): ConnectedProvider[] {
    return [...this.providers.values()].filter((p) => p.attested && p.socket.readyState === p.socket.OPEN && (!model || p.models.includes(model)))
  }

  /** The DID's registered machines, attested or not. */
  machinesOf(did: string): ConnectedProvider[] {
    return [...this.providers.values()].filter((p) => p.did === did)
  }

  /**
   * Sends a sealed job to a connected provider. Its frames go to `sink` until
   * it completes, fails or is cancelled; the returned function cancels it.
   */
  startJob(p: ConnectedProvider, request: Omit<InferenceRequestFrame, 'type' | 'v' | 'session_id'>, sink: JobSink): { sessionId: string; cancel: (reason: string) => void } {
    const sessionId = `sess_${randomBytes(12).toString('base64url')}`
    p.jobs.set(sessionId, sink)
    p.lastJobAt = Date.now()
    send(p.socket, { type: 'inference_request', v: PROTOCOL_VERSION, session_id: sessionId, ...request })
    return {
      sessionId,
      cancel: (reason) => {
        if (!p.jobs.delete(sessionId)) return
        if (p.socket.readyState === p.socket.OPEN) send(p.socket, { type: 'inference_cancel', v: PROTOCOL_VERSION, session_id: sessionId, reason })
      },
    }
  }

  async close(): Promise<void> {
    clearInterval(this.timer)
    for (const ws of this.wss.clients) ws.close(1001, 'exchange shutting down')
    await new Promise<void>((resolve) => this.wss.close(() => resolve()))
  }

  /**
   * Counts the upgrade against the caps, or refuses it (before the handshake: a refused client holds
   * nothing). The count is released when the TCP socket closes, however the connection ends.
   */
  private admit(req: IncomingMessage, socket: Duplex): boolean {
    const { maxConnections = 2000, maxConnectionsPerAddress = 32, clientAddress = (r: IncomingMessage) => r.socket.remoteAddress } = this.opts
    const retry = ['Retry-After: 30']
    if (this.open >= maxConnections) {
      refuseUpgrade(socket, 'this exchange takes no more provider connections now', 503, retry)
      return false
    }
    const address = clientAddress(req)
    const mine = address === undefined ? 0 : (this.perAddress.get(address) ?? 0)
    if (mine >= maxConnectionsPerAddress) {
      refuseUpgrade(socket, `at most ${maxConnectionsPerAddress} provider connections per address`, 429, retry)
      return false
    }
    this.open++
    if (address !== undefined) this.perAddress.set(address, mine + 1)
    socket.once('close', () => {
      this.open--
      if (address === undefined) return
      const left = (this.perAddress.get(address) ?? 1) - 1
      if (left > 0) this.perAddress.set(address, left)
      else this.perAddress.delete(address)
    })
    return true
  }

  private onConnection(ws: WebSocket): void {
    // One register per socket: a socket never holds two machines, nor races two verifications.
    let registerSeen = false
    let machine: string | null = null
    let challenge: { nonce: string; timestamp: string } | null = null
    const timeoutMs = this.opts.registerTimeoutMs ?? 10_000
    const deadline = setTimeout(() => refuse(ws, 'register_timeout', `register and answer the attestation challenge within ${timeoutMs} ms`), timeoutMs)
    deadline.unref()
    ws.on('message', (data, isBinary) => {
      void (async () => {
        let frame: Frame
        try {
          frame = JSON.parse(isBinary ? '' : data.toString()) as Frame
          if (!frame || typeof frame.type !== 'string') throw new Error('no type')
        } catch {
          return refuse(ws, 'bad_frame', 'frames are JSON objects with a string "type"')
        }
        if (frame.type === 'register') {
          if (registerSeen) return refuse(ws, 'already_registered', 'one register per connection: another machine needs a connection of its own')
          registerSeen = true
          const result = await this.register(frame, ws)
          // Its socket closed while it was verified: nothing was added.
          if (!result) return
          if ('refusal' in result) return refuse(ws, result.refusal, result.message)
          machine = result.machine
          challenge = { nonce: randomBytes(16).toString('hex'), timestamp: new Date().toISOString().replace(/\.\d{3}Z$/, 'Z') }
          send(ws, { type: 'attestation_challenge', v: PROTOCOL_VERSION, ...challenge })
          return
        }
        if (!machine) return refuse(ws, 'not_registered', 'the first frame must be "register"')
        const p = this.providers.get(machine)
        if (p?.socket !== ws) return
        p.lastSeen = Date.now()
        switch (frame.type) {
          case 'ping':
            return send(ws, { type: 'pong', v: PROTOCOL_VERSION, ...(typeof frame.t === 'number' ? { t: frame.t } : {}) })
          case 'attestation_response': {
            if (!challenge || frame.nonce !== challenge.nonce || frame.timestamp !== challenge.timestamp) return refuse(ws, 'attestation_failed', 'the attestation response does not answer the challenge sent')
            const ok = this.verifyAttestation(p, frame)
            challenge = null
            if (!ok) return refuse(ws, 'attestation_failed', `the attestation signature does not verify with the attestationPubKey of ${p.record.uri}`)
            p.attested = true
            p.attestationKey = p.record.body.attestationPubKey as string
            clearTimeout(deadline)
            return
          }
          case 'inference_chunk':
          case 'inference_complete':
          case 'inference_error':
            return this.onJobFrame(p, frame)
          // heartbeat and pong only refresh lastSeen.
        }
      })()
    })
    ws.on('error', () => ws.terminate())
    ws.on('close', () => {
      clearTimeout(deadline)
      for (const [id, p] of this.providers) {
        if (p.socket !== ws) continue
        this.providers.delete(id)
        for (const [sessionId, sink] of p.jobs) {
          p.jobs.delete(sessionId)
          sink.fail('lost', 'the provider disconnected')
        }
      }
    })
  }

  private onJobFrame(p: ConnectedProvider, frame: Frame): void {
    const sessionId = frame.session_id
    const sink = typeof sessionId === 'string' ? p.jobs.get(sessionId) : undefined
    // Frames for sessions this connection was not given (or that ended) are dropped.
    if (!sink || typeof sessionId !== 'string') return
    if (frame.type === 'inference_chunk') {
      if (!Number.isSafeInteger(frame.seq) || typeof frame.ciphertext !== 'string') {
        p.jobs.delete(sessionId)
        return sink.fail('protocol_error', 'inference_chunk needs an integer seq and a string ciphertext')
      }
      return sink.chunk(frame.seq as number, frame.ciphertext)
    }
    p.jobs.delete(sessionId)
    if (frame.type === 'inference_complete') {
      const f = frame as unknown as InferenceCompleteFrame
      if (!Number.isSafeInteger(f.tokens_in) || !Number.isSafeInteger(f.tokens_out) || f.tokens_in < 0 || f.tokens_out < 0) return sink.fail('protocol_error', 'inference_complete needs token counts')
      return sink.complete({ ...f, finish_reason: f.finish_reason === 'length' ? 'length' : 'stop' })
    }
    const code = typeof frame.code === 'string' ? (frame.code as InferenceErrorCode) : 'engine_error'
    sink.fail(code, typeof frame.message === 'string' ? frame.message.slice(0, 500) : 'the provider failed the job')
  }

  private verifyAttestation(p: ConnectedProvider, frame: Frame): boolean {
    const raw = toBytes(p.record.body.attestationPubKey)
    const sig = toBytes(frame.signature)
    if (!raw || !sig || typeof frame.sip_enabled !== 'boolean') return false
    try {
      const payload = attestationChallengePayload({ nonce: frame.nonce as string, timestamp: frame.timestamp as string, sip_enabled: frame.sip_enabled })
      return verifyDer(p256PublicKey(raw), canonicalBytes(payload), sig)
    } catch {
      return false
    }
  }

  /** The machine registered; a refusal; or null when the socket closed while it was verified. */
  private async register(frame: Frame, ws: WebSocket): Promise<{ machine: string } | { refusal: RefusalCode; message: string } | null> {
    if (frame.v !== PROTOCOL_VERSION) return { refusal: 'unsupported_version', message: `this exchange speaks protocol version ${PROTOCOL_VERSION}` }
    const { did, serviceAuth, encryptionPubKey, models, version } = frame as Record<string, unknown>
    if (typeof did !== 'string' || typeof serviceAuth !== 'string' || typeof encryptionPubKey !== 'string' || !Array.isArray(models) || !models.every((m) => typeof m === 'string')) {
      return { refusal: 'bad_frame', message: 'register needs did, serviceAuth, encryptionPubKey and models (strings)' }
    }
    try {
      const payload = await verifyJwt(serviceAuth, this.opts.exchangeDid, REGISTER_LXM, async (iss, force) => {
        if (iss !== did) throw new Error('token issuer is not the registering DID')
        return this.opts.idResolver.did.resolveAtprotoKey(iss, force)
      })
      if (payload.iss !== did) throw new Error('token issuer is not the registering DID')
    } catch (err) {
      log.info('provider registration refused: auth', { did, err: err as Error })
      return { refusal: 'auth_failed', message: `could not verify a service-auth token from ${did} for ${this.opts.exchangeDid}` }
    }
    const records = await this.opts.providerRecords(did)
    const record = records.find((r) => r.body.encryptionPubKey === encryptionPubKey)
    if (!record) {
      return {
        refusal: 'encryption_key_mismatch',
        message: records.length
          ? `the announced encryption key is not the encryptionPubKey of any of your published ${ids.ComputeProvider} records`
          : `no ${ids.ComputeProvider} record of yours is indexed yet: publish it first`,
      }
    }
    const published = supportedModels(record)
    const unpublished = (models as string[]).filter((m) => !published.includes(m))
    if (unpublished.length) {
      return { refusal: 'model_not_published', message: `not in the supportedModels of ${record.uri}: ${unpublished.slice(0, 5).join(', ')}` }
    }
    if (ws.readyState !== ws.OPEN) return null
    // The same machine reconnecting replaces its old connection; another machine of the DID is another entry.
    const machine = machineId(did, encryptionPubKey)
    const previous = this.providers.get(machine)
    if (previous && previous.socket !== ws) {
      previous.socket.close(1000, 'replaced by a new connection')
      for (const sink of previous.jobs.values()) sink.fail('lost', 'the provider reconnected')
      previous.jobs.clear()
    }
    this.providers.set(machine, {
      machine,
      did,
      encryptionPubKey,
      models: models as string[],
      version: typeof version === 'string' ? version : undefined,
      connectedAt: new Date().toISOString(),
      lastSeen: Date.now(),
      record,
      attested: false,
      attestationKey: null,
      jobs: new Map(),
      lastJobAt: 0,
      socket: ws,
    })
    send(ws, { type: 'registered', v: PROTOCOL_VERSION, did, exchange: this.opts.exchangeDid })
    log.info('provider registered', { did, models })
    return { machine }
  }

  private heartbeat(every: number): void {
    const now = Date.now()
    void this.refreshRecords()
    for (const p of this.providers.values()) {
      if (now - p.lastSeen > 3 * every) {
        log.info('provider silent; dropped', { did: p.did })
        // The close handler fails its jobs (they fail over if no chunk was sent yet).
        p.socket.terminate()
      } else {
        send(p.socket, { type: 'ping', v: PROTOCOL_VERSION, t: now })
      }
    }
  }

  /**
   * Routing reads the provider record (active, tier, region, pro bono), which
   * its owner may change at any time: re-read from the index each heartbeat.
   * A machine whose record is gone (deleted, or its account deactivated) is
   * disconnected: requesters could no longer check its key.
   */
  private async refreshRecords(): Promise<void> {
    for (const did of new Set([...this.providers.values()].map((p) => p.did))) {
      let records: IndexedProvider[]
      try {
        records = await this.opts.providerRecords(did)
      } catch (err) {
        log.warn('provider records could not be re-read', { did, err: err as Error })
        continue
      }
      for (const p of this.machinesOf(did)) {
        const record = records.find((r) => r.body.encryptionPubKey === p.encryptionPubKey)
        if (!record) refuse(p.socket, 'encryption_key_mismatch', `your ${ids.ComputeProvider} record with this key is no longer published`)
        // Receipts are bound to the key that answered the challenge: a new key needs a new connection to prove it.
        else if (p.attestationKey !== null && record.body.attestationPubKey !== p.attestationKey) refuse(p.socket, 'attestation_failed', `the attestationPubKey of ${record.uri} changed: reconnect to answer a challenge with it`)
        else {
          p.record = record
          // A model the owner no longer publishes is no longer routed to this machine (until it reconnects).
          p.models = p.models.filter((m) => supportedModels(record).includes(m))
        }
      }
    }
  }
}
