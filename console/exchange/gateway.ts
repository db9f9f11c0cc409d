/**
 * The provider gateway: providers connect over a WebSocket (`/v1/agent`) and
 * speak the agent protocol (src/protocol/agent.ts): the network's frames, so a
 * reference provider registers and serves as it is, and our extensions with a
 * provider that announces them (`v` on its register).
 *
 * Registration is bound to the provider's DID. The provider presents a
 * service-auth JWT minted by its own PDS for this exchange (audience: the
 * exchange's DID), verified against the provider DID's signing key; and the
 * encryption key it announces must be the `encryptionPubKey` of one of its
 * indexed (signed) `compute.provider` records, so requesters seal prompts to a
 * key its owner published, never to one the connection made up. That record
 * is what routing reads (tier, region, pro bono policy); a live attestation
 * challenge, answered with the record's attestation key, proves the machine
 * still holds it. Only an attested machine on an open socket is routed to.
 *
 * Limits: one register per socket; a socket not registered and attested
 * within `registerTimeoutMs` is closed; upgrades beyond `maxConnections`
 * (503) or `maxConnectionsPerAddress` (429) are refused before the handshake.
 * A socket's frames are handled one at a time, in order (a resume sent right
 * after the register waits for it), at most MAX_PENDING_FRAMES queued.
 *
 * Jobs: `startJob` sends a sealed `inference_request`; the provider's chunk,
 * keepalive, complete and error frames for that session reach the job's sink,
 * and only from the connection the job runs on. A provider with stream resume
 * keeps its jobs across a lost connection for `resumeGraceMs`: reconnected and
 * attested with the key the job was sent to, it resumes them
 * (stream-resume.ts); the others fail at once.
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
  base64Of,
  inputFormatsOf,
  isChunkChannel,
  isU32,
  PROTOCOL_VERSION,
  REGISTER_LXM,
  STREAM_RESUME_VERSION,
  toWire,
  type ChunkChannel,
  type ExchangeFrame,
  type FinishReason,
  type InferenceErrorCode,
  type InferenceRequestFrame,
} from '../../src/protocol/agent.ts'
import { ResumableStream } from './stream-resume.ts'

export { AGENT_PATH, PROTOCOL_VERSION }

function isAgentUpgrade(req: IncomingMessage): boolean {
  return (req.url ?? '').split('?')[0] === AGENT_PATH
}

const upgradeErrors: Record<number, string> = { 405: 'MethodNotAllowed', 429: 'RateLimitExceeded', 503: 'NotEnoughResources' }

/** Refuses an upgrade with an XRPC error body (what every other refusal of the console's server carries). */
function refuseUpgrade(socket: Duplex, message: string, status = 400, headers: string[] = []): void {
  refuseSocket(socket, status, new XrpcError(status, upgradeErrors[status] ?? 'InvalidRequest', message).toJSON(), headers)
}

/** Largest frame a provider may send (a sealed reply chunk is far smaller, even as an array of byte values). */
const MAX_FRAME_BYTES = 1 << 20
/** Frames of one socket waiting for the ones before them to be handled; beyond it the socket is closed. */
const MAX_PENDING_FRAMES = 1024
/** Resumes a socket may send before its attestation answer is in. */
const MAX_EARLY_RESUMES = 64
/** Completed resumable jobs remembered (for a provider whose completion ack was lost). */
const MAX_COMPLETED = 1024

export interface ConnectedProvider {
  /** One machine: a DID may run several, each with its own provider record and key. */
  machine: string
  did: string
  encryptionPubKey: string
  models: string[]
  version?: string
  /** It announced our extensions (`v` on its register); otherwise it gets only the network's frames. */
  extended: boolean
  /** It announced stream resume v1: its jobs survive a lost connection for the grace period. */
  streamResume: boolean
  /** The input formats it reads; a job in another is not sent to it. */
  inputFormats: readonly string[]
  connectedAt: string
  lastSeen: number
  /** The indexed provider record whose key this connection announced: routing reads it. */
  record: IndexedProvider
  /** Answered the attestation challenge with the record's attestation key. */
  attested: boolean
  /** The record's `attestationPubKey` (base64 raw P-256) that answered the challenge; null until then. */
  attestationKey: string | null
  /** Jobs running on this connection now. */
  jobs: Map<string, Session>
  /** When it was last given a job (0: never), for round-robin among equals. */
  lastJobAt: number
  socket: WebSocket
}

/** How a job ended at its provider. */
export interface JobCompletion {
  tokens_in: number
  tokens_out: number
  finish_reason: FinishReason
  receipt_uri?: string
  /** The chunks it counted, all of them relayed. */
  final_seq?: number
}

/** What a job receives from its provider. */
export interface JobSink {
  chunk(seq: number, ciphertext: string, channel?: ChunkChannel): void
  /** The provider is still working on it, with nothing to send yet. */
  keepalive(): void
  complete(done: JobCompletion): void
  /** The provider refused or failed the job, or the connection was lost (`lost`). */
  fail(code: InferenceErrorCode | 'lost' | 'protocol_error', message: string): void
}

/** One job sent to a provider. */
interface Session {
  id: string
  sink: JobSink
  machine: string
  /** The key that answered the challenge of the connection it was sent on: only one answering with it may resume it. */
  attestationKey: string | null
  /** The connection it runs on; null while it waits to be resumed. */
  conn: ConnectedProvider | null
  /** Chunks passed on, for a job without stream resume (whose order the exchange checks). */
  passed: number
  stream: ResumableStream | null
  grace?: NodeJS.Timeout
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
  /** How long a job with stream resume waits for its provider to come back (default 30 s, as on the network). */
  resumeGraceMs?: number
  /** Provider sockets open at once (default 2000); an upgrade beyond it is refused with 503. */
  maxConnections?: number
  /** Provider sockets open at once per client address (default 32); an upgrade beyond it is refused with 429. */
  maxConnectionsPerAddress?: number
  /** The client's address for the per-address cap (default: the TCP peer); undefined leaves only the total cap. */
  clientAddress?: (req: IncomingMessage) => string | undefined
}

type Frame = Record<string, unknown> & { type: string }

/** Refusal codes: the `error` frame's code (to a provider with our extensions) and the close reason. */
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
  | 'backlog'

/** Sends a frame in the peer's dialect. */
const sendOn = (ws: WebSocket, extended: boolean, frame: ExchangeFrame) => {
  if (ws.readyState === ws.OPEN) ws.send(toWire(frame, extended))
}

/** Tells a provider with our extensions why, then closes (a reference provider reads the close reason). */
function refuse(ws: WebSocket, extended: boolean, code: RefusalCode, message: string): void {
  if (extended) sendOn(ws, true, { type: 'error', code, message })
  ws.close(1008, code)
}

/** A machine is a DID and the encryption key of one of its provider records. */
export const machineId = (did: string, encryptionPubKey: string) => `${did} ${encryptionPubKey}`

const supportedModels = (record: IndexedProvider): unknown[] => (Array.isArray(record.body.supportedModels) ? record.body.supportedModels : [])
const isStr = (v: unknown): v is string => typeof v === 'string'

/** What one socket has said so far. */
interface SocketState {
  ws: WebSocket
  registerSeen: boolean
  /** Decided by its register; until then refusals are explained (an `error` frame). */
  extended: boolean
  conn: ConnectedProvider | null
  challenge: { nonce: string; timestamp: string } | null
  /** Resumes that came before the attestation answer: handled once it verifies. */
  early: Frame[]
  deadline: NodeJS.Timeout
}

export class ProviderGateway {
  private readonly opts: GatewayOpts
  private readonly wss: WebSocketServer
  /** Connected machines, by `machineId(did, encryptionPubKey)`. */
  readonly providers = new Map<string, ConnectedProvider>()
  /** Jobs running, by session id, on a connection or waiting to be resumed. */
  private readonly sessions = new Map<string, Session>()
  /** Resumable jobs completed lately: a provider whose completion ack was lost learns it on resuming. */
  private readonly completed = new Map<string, { machine: string; token: string; nextSeq: number; timer: NodeJS.Timeout }>()
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
   * Sends a sealed job to a connected provider, in its dialect. Its frames go
   * to `sink` until it completes, fails or is cancelled; the returned function
   * cancels it.
   */
  startJob(
    p: ConnectedProvider,
    request: Omit<InferenceRequestFrame, 'type' | 'v' | 'session_id' | 'resume_token'>,
    sink: JobSink,
  ): { sessionId: string; cancel: (reason: string) => void } {
    const sessionId = `sess_${randomBytes(12).toString('base64url')}`
    const stream = p.streamResume ? new ResumableStream(randomBytes(24).toString('base64url')) : null
    const s: Session = { id: sessionId, sink, machine: p.machine, attestationKey: p.attestationKey, conn: p, passed: 0, stream }
    this.sessions.set(sessionId, s)
    p.jobs.set(sessionId, s)
    p.lastJobAt = Date.now()
    const frame: InferenceRequestFrame = { type: 'inference_request', session_id: sessionId, ...request, ...(stream ? { resume_token: stream.token } : {}) }
    // The network's text input names no format (a reference provider reads it as one user message).
    if (!p.extended && frame.input_format === 'text') delete frame.input_format
    sendOn(p.socket, p.extended, frame)
    return {
      sessionId,
      cancel: (reason) => {
        if (this.sessions.get(sessionId) !== s) return
        const conn = s.conn
        this.end(s)
        // A reference provider is not told (the network has no such frame): what it sends for the job is dropped.
        if (conn?.extended) sendOn(conn.socket, true, { type: 'inference_cancel', session_id: sessionId, reason })
      },
    }
  }

  async close(): Promise<void> {
    clearInterval(this.timer)
    for (const s of this.sessions.values()) clearTimeout(s.grace)
    for (const c of this.completed.values()) clearTimeout(c.timer)
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
    const timeoutMs = this.opts.registerTimeoutMs ?? 10_000
    const st: SocketState = {
      ws,
      registerSeen: false,
      extended: true,
      conn: null,
      challenge: null,
      early: [],
      deadline: setTimeout(() => refuse(ws, st.extended, 'register_timeout', `register and answer the attestation challenge within ${timeoutMs} ms`), timeoutMs),
    }
    st.deadline.unref()
    let chain = Promise.resolve()
    let pending = 0
    ws.on('message', (data, isBinary) => {
      let frame: Frame
      try {
        frame = JSON.parse(isBinary ? '' : data.toString()) as Frame
        if (!frame || typeof frame.type !== 'string') throw new Error('no type')
      } catch {
        return refuse(ws, st.extended, 'bad_frame', 'frames are JSON objects with a string "type"')
      }
      // One register per socket, decided as it arrives: a socket never holds two machines, nor races two verifications.
      if (frame.type === 'register') {
        if (st.registerSeen) return refuse(ws, st.extended, 'already_registered', 'one register per connection: another machine needs a connection of its own')
        st.registerSeen = true
      }
      if (pending >= MAX_PENDING_FRAMES) return refuse(ws, st.extended, 'backlog', `more than ${MAX_PENDING_FRAMES} frames waiting`)
      pending++
      chain = chain
        .then(() => this.onFrame(st, frame))
        .catch((err: unknown) => {
          log.error('provider frame handling failed', { err: err as Error })
          ws.close(1011, 'internal error')
        })
        .finally(() => pending--)
    })
    ws.on('error', () => ws.terminate())
    ws.on('close', () => {
      clearTimeout(st.deadline)
      const p = st.conn
      // A connection replaced by the same machine's newer one has already handed its jobs over.
      if (p && this.providers.get(p.machine) === p) {
        this.providers.delete(p.machine)
        this.detach(p, 'the provider disconnected')
      }
    })
  }

  private async onFrame(st: SocketState, frame: Frame): Promise<void> {
    const { ws } = st
    if (ws.readyState !== ws.OPEN) return
    if (frame.type === 'register') {
      const result = await this.register(frame, st)
      // Its socket closed while it was verified: nothing was added.
      if (!result) return
      if ('refusal' in result) return refuse(ws, st.extended, result.refusal, result.message)
      st.conn = result.conn
      st.challenge = { nonce: randomBytes(16).toString('hex'), timestamp: new Date().toISOString().replace(/\.\d{3}Z$/, 'Z') }
      return sendOn(ws, st.extended, { type: 'attestation_challenge', ...st.challenge })
    }
    const p = st.conn
    if (!p) return refuse(ws, st.extended, 'not_registered', 'the first frame must be "register"')
    p.lastSeen = Date.now()
    switch (frame.type) {
      case 'ping':
        // Ours: a provider's own liveness probe.
        if (p.extended) sendOn(ws, true, { type: 'pong', ...(typeof frame.t === 'number' ? { t: frame.t } : {}) })
        return
      case 'attestation_response':
        return this.onAttestation(st, p, frame)
      case 'inference_resume':
        if (!isStr(frame.session_id) || !isStr(frame.resume_token) || !frame.resume_token || !isU32(frame.produced_seq)) {
          return refuse(ws, p.extended, 'bad_frame', 'inference_resume needs session_id, resume_token and produced_seq')
        }
        // Jobs move only to a connection that has proved the attestation key.
        if (p.attested) return this.resume(p, frame)
        if (st.early.length >= MAX_EARLY_RESUMES) return refuse(ws, p.extended, 'backlog', 'too many resumes before the attestation answer')
        st.early.push(frame)
        return
      case 'inference_chunk':
      case 'inference_keepalive':
      case 'inference_complete':
        return this.onJobFrame(p, frame)
      case 'inference_error':
        if (p.extended) this.onJobFrame(p, frame)
        return
      // heartbeat, pong and frames this exchange does not act on only refresh lastSeen.
    }
  }

  private onAttestation(st: SocketState, p: ConnectedProvider, frame: Frame): void {
    const { challenge } = st
    if (!challenge || frame.nonce !== challenge.nonce || frame.timestamp !== challenge.timestamp) {
      return refuse(st.ws, p.extended, 'attestation_failed', 'the attestation response does not answer the challenge sent')
    }
    st.challenge = null
    if (!this.verifyAttestation(p, frame)) return refuse(st.ws, p.extended, 'attestation_failed', `the attestation signature does not verify with the attestationPubKey of ${p.record.uri}`)
    p.attested = true
    p.attestationKey = p.record.body.attestationPubKey as string
    clearTimeout(st.deadline)
    for (const f of st.early.splice(0)) this.resume(p, f)
  }

  /** A job frame, from the connection its job runs on (others are dropped). */
  private onJobFrame(p: ConnectedProvider, frame: Frame): void {
    const s = isStr(frame.session_id) ? this.sessions.get(frame.session_id) : undefined
    if (!s || s.conn !== p) return
    const failWith = (code: 'protocol_error' | InferenceErrorCode, message: string) => {
      this.end(s)
      s.sink.fail(code, message)
    }
    const ack = (completed: boolean) => sendOn(p.socket, p.extended, { type: 'inference_ack', session_id: s.id, resume_token: s.stream!.token, next_seq: s.stream!.nextSeq, completed })
    switch (frame.type) {
      case 'inference_keepalive':
        return s.sink.keepalive()
      case 'inference_chunk': {
        const ciphertext = base64Of(frame.ciphertext)
        const channel = frame.channel ?? 'content'
        if (!isU32(frame.seq) || ciphertext === null || !isChunkChannel(channel)) {
          return failWith('protocol_error', 'inference_chunk needs an integer seq, ciphertext bytes and a known channel')
        }
        const relay = () => s.sink.chunk(frame.seq as number, ciphertext, channel === 'content' ? undefined : channel)
        if (!s.stream) {
          s.passed++
          return relay()
        }
        const verdict = s.stream.chunk(frame.seq, channel, ciphertext)
        if (verdict === 'conflict') return failWith('protocol_error', `chunk ${frame.seq} came again with other contents`)
        if (verdict === 'relay') relay()
        // The relay may have ended the job (a requester too slow): no ack for a job gone.
        if (this.sessions.get(s.id) === s) ack(false)
        return
      }
      case 'inference_complete': {
        const { tokens_in, tokens_out, receipt_uri, final_seq } = frame
        if (!isU32(tokens_in) || !isU32(tokens_out) || !isStr(receipt_uri) || (final_seq !== undefined && !isU32(final_seq))) {
          return failWith('protocol_error', 'inference_complete needs token counts and a receipt_uri')
        }
        if (s.stream && !s.stream.completes(final_seq)) return ack(false)
        if (!s.stream && final_seq !== undefined && final_seq !== s.passed) return failWith('protocol_error', `inference_complete counts ${final_seq} chunks, ${s.passed} came`)
        this.end(s)
        if (s.stream) {
          this.remember(s)
          ack(true)
        }
        return s.sink.complete({
          tokens_in,
          tokens_out,
          finish_reason: frame.finish_reason === 'length' ? 'length' : 'stop',
          ...(receipt_uri ? { receipt_uri } : {}),
          ...(final_seq !== undefined ? { final_seq } : {}),
        })
      }
      case 'inference_error': {
        const code = isStr(frame.code) ? (frame.code as InferenceErrorCode) : 'engine_error'
        return failWith(code, isStr(frame.message) ? frame.message.slice(0, 500) : 'the provider failed the job')
      }
    }
  }

  /** A reconnected, attested provider asks for a job back. */
  private resume(p: ConnectedProvider, f: Frame): void {
    const sessionId = f.session_id as string
    const token = f.resume_token as string
    const s = this.sessions.get(sessionId)
    let verdict: { status: 'resume' | 'completed' | 'rejected'; nextSeq: number; reason?: string }
    if (s?.stream) {
      if (s.machine !== p.machine || s.stream.token !== token || s.attestationKey !== p.attestationKey) verdict = { status: 'rejected', nextSeq: 0, reason: 'resume-owner-mismatch' }
      else {
        verdict = s.stream.resume(f.produced_seq as number)
        if (verdict.status === 'resume') {
          clearTimeout(s.grace)
          s.conn?.jobs.delete(s.id)
          s.conn = p
          p.jobs.set(s.id, s)
        } else {
          this.end(s)
          s.sink.fail('lost', 'the provider came back without the chunks already relayed')
        }
      }
    } else {
      const done = this.completed.get(sessionId)
      verdict = done && done.machine === p.machine && done.token === token ? { status: 'completed', nextSeq: done.nextSeq } : { status: 'rejected', nextSeq: 0, reason: 'resume-unknown-or-expired' }
    }
    sendOn(p.socket, p.extended, { type: 'inference_resume_result', session_id: sessionId, resume_token: token, status: verdict.status, next_seq: verdict.nextSeq, ...(verdict.reason ? { reason: verdict.reason } : {}) })
  }

  /** The connection is gone: its resumable jobs wait for the provider to come back, the others fail. */
  private detach(p: ConnectedProvider, message: string): void {
    const grace = this.opts.resumeGraceMs ?? 30_000
    for (const s of [...p.jobs.values()]) {
      p.jobs.delete(s.id)
      if (!s.stream) {
        this.end(s)
        s.sink.fail('lost', message)
        continue
      }
      s.conn = null
      s.stream.detached = true
      s.grace = setTimeout(() => {
        if (this.sessions.get(s.id) !== s || s.conn) return
        this.end(s)
        s.sink.fail('lost', `${message} and did not resume the job within ${grace} ms`)
      }, grace)
      s.grace.unref()
    }
  }

  /** The job is over here: nothing more reaches its sink. */
  private end(s: Session): void {
    if (this.sessions.get(s.id) === s) this.sessions.delete(s.id)
    s.conn?.jobs.delete(s.id)
    clearTimeout(s.grace)
  }

  private remember(s: Session): void {
    if (this.completed.size >= MAX_COMPLETED) {
      const [oldest, c] = this.completed.entries().next().value!
      clearTimeout(c.timer)
      this.completed.delete(oldest)
    }
    const timer = setTimeout(() => this.completed.delete(s.id), this.opts.resumeGraceMs ?? 30_000)
    timer.unref()
    this.completed.set(s.id, { machine: s.machine, token: s.stream!.token, nextSeq: s.stream!.nextSeq, timer })
  }

  private verifyAttestation(p: ConnectedProvider, frame: Frame): boolean {
    const raw = toBytes(p.record.body.attestationPubKey)
    const signature = base64Of(frame.signature)
    const sig = signature === null ? null : toBytes(signature)
    const { sip_enabled, hypervisor_present } = frame
    if (!raw || !sig || typeof sip_enabled !== 'boolean' || (hypervisor_present !== undefined && typeof hypervisor_present !== 'boolean')) return false
    try {
      const payload = attestationChallengePayload({ nonce: frame.nonce as string, timestamp: frame.timestamp as string, sip_enabled, hypervisor_present })
      return verifyDer(p256PublicKey(raw), canonicalBytes(payload), sig)
    } catch {
      return false
    }
  }

  /** The machine registered; a refusal; or null when the socket closed while it was verified. */
  private async register(frame: Frame, st: SocketState): Promise<{ conn: ConnectedProvider } | { refusal: RefusalCode; message: string } | null> {
    const { ws } = st
    if (frame.v !== undefined && frame.v !== PROTOCOL_VERSION) return { refusal: 'unsupported_version', message: `this exchange speaks the network's protocol, or ours at version ${PROTOCOL_VERSION}` }
    st.extended = frame.v === PROTOCOL_VERSION
    const { provider_did: did, auth_jwt: token, encryption_pub_key: encryptionPubKey, attestation_pub_key, supported_models: models, binary_version: version, stream_resume_version: resume } = frame
    if (
      !isStr(did) ||
      !isStr(encryptionPubKey) ||
      !isStr(attestation_pub_key) ||
      !Array.isArray(models) ||
      !models.every(isStr) ||
      (version !== undefined && !isStr(version)) ||
      (resume !== undefined && (!isU32(resume) || resume < 1))
    ) {
      return { refusal: 'bad_frame', message: 'register needs provider_did, encryption_pub_key, attestation_pub_key and supported_models (strings)' }
    }
    try {
      // The network's exchange may admit a register without a token; this one never does.
      if (!isStr(token)) throw new Error('no auth_jwt')
      const payload = await verifyJwt(token, this.opts.exchangeDid, REGISTER_LXM, async (iss, force) => {
        if (iss !== did) throw new Error('token issuer is not the registering DID')
        return this.opts.idResolver.did.resolveAtprotoKey(iss, force)
      })
      if (payload.iss !== did) throw new Error('token issuer is not the registering DID')
    } catch (err) {
      log.info('provider registration refused: auth', { did, err: err as Error })
      return { refusal: 'auth_failed', message: `could not verify an auth_jwt from ${did} for ${this.opts.exchangeDid} (lxm ${REGISTER_LXM})` }
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
    const unpublished = models.filter((m) => !published.includes(m))
    if (unpublished.length) {
      return { refusal: 'model_not_published', message: `not in the supportedModels of ${record.uri}: ${unpublished.slice(0, 5).join(', ')}` }
    }
    if (ws.readyState !== ws.OPEN) return null
    // The same machine reconnecting replaces its old connection (its resumable jobs wait for a resume);
    // another machine of the DID is another entry.
    const machine = machineId(did, encryptionPubKey)
    const previous = this.providers.get(machine)
    if (previous && previous.socket !== ws) {
      previous.socket.close(1000, 'replaced by a new connection')
      this.detach(previous, 'the provider reconnected')
    }
    const conn: ConnectedProvider = {
      machine,
      did,
      encryptionPubKey,
      models,
      version,
      extended: st.extended,
      streamResume: resume === STREAM_RESUME_VERSION,
      inputFormats: inputFormatsOf({ extended: st.extended, version }),
      connectedAt: new Date().toISOString(),
      lastSeen: Date.now(),
      record,
      attested: false,
      attestationKey: null,
      jobs: new Map(),
      lastJobAt: 0,
      socket: ws,
    }
    this.providers.set(machine, conn)
    if (conn.extended) sendOn(ws, true, { type: 'registered', did, exchange: this.opts.exchangeDid })
    log.info('provider registered', { did, models, extended: conn.extended, streamResume: conn.streamResume })
    return { conn }
  }

  private heartbeat(every: number): void {
    const now = Date.now()
    void this.refreshRecords()
    for (const p of this.providers.values()) {
      if (now - p.lastSeen > 3 * every) {
        log.info('provider silent; dropped', { did: p.did })
        // The close handler hands its jobs on (resumed if it comes back in time, failed over if no chunk was sent yet).
        p.socket.terminate()
      } else {
        sendOn(p.socket, p.extended, { type: 'ping', nonce: randomBytes(8).toString('hex') })
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
        if (!record) refuse(p.socket, p.extended, 'encryption_key_mismatch', `your ${ids.ComputeProvider} record with this key is no longer published`)
        // Receipts are bound to the key that answered the challenge: a new key needs a new connection to prove it.
        else if (p.attestationKey !== null && record.body.attestationPubKey !== p.attestationKey) refuse(p.socket, p.extended, 'attestation_failed', `the attestationPubKey of ${record.uri} changed: reconnect to answer a challenge with it`)
        else {
          p.record = record
          // A model the owner no longer publishes is no longer routed to this machine (until it reconnects).
          p.models = p.models.filter((m) => supportedModels(record).includes(m))
        }
      }
    }
  }
}
