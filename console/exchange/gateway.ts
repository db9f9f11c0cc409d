/**
 * The provider gateway: providers connect over a WebSocket (`/v1/agent`) and
 * exchange JSON frames tagged by `type` (protocol version 1).
 *
 * Registration is bound to the provider's DID. The provider presents a
 * service-auth JWT minted by its own PDS for this exchange (audience: the
 * exchange's DID), verified against the provider DID's signing key; and the
 * X25519 key it announces must be the `encryptionPubKey` of one of its
 * indexed (signed) `compute.provider` records, so requesters seal prompts to a
 * key its owner published, never to one the connection made up.
 */
import type { IncomingMessage, Server } from 'node:http'
import type { Duplex } from 'node:stream'
import type { IdResolver } from '@atproto/identity'
import { verifyJwt } from '@atproto/xrpc-server'
import { WebSocketServer, type WebSocket } from 'ws'
import { ids } from '../../src/lexicon/generated/ids.ts'
import { consoleLogger as log } from '../../src/logger.ts'

export const AGENT_PATH = '/v1/agent'
export const PROTOCOL_VERSION = 1
/** Largest frame a provider may send (a sealed reply chunk is far smaller). */
const MAX_FRAME_BYTES = 1 << 20

export interface ConnectedProvider {
  did: string
  encryptionPubKey: string
  models: string[]
  version?: string
  connectedAt: string
  lastSeen: number
  socket: WebSocket
}

export interface GatewayOpts {
  /** The exchange's DID: the audience provider tokens must name. */
  exchangeDid: string
  idResolver: IdResolver
  /** `encryptionPubKey`s of the DID's indexed, valid `compute.provider` records. */
  publishedKeys: (did: string) => string[] | Promise<string[]>
  /** Heartbeat: a ping this often; a provider silent for 3 intervals is dropped. */
  pingIntervalMs?: number
}

type Frame = Record<string, unknown> & { type: string }

/** Refusal codes sent in `{ type: 'error', code, message }` before closing. */
export type RefusalCode = 'bad_frame' | 'unsupported_version' | 'not_registered' | 'auth_failed' | 'encryption_key_mismatch' | 'frame_too_large'

export class ProviderGateway {
  private readonly opts: GatewayOpts
  private readonly wss: WebSocketServer
  readonly providers = new Map<string, ConnectedProvider>()
  private readonly timer: NodeJS.Timeout

  constructor(opts: GatewayOpts) {
    this.opts = opts
    this.wss = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME_BYTES })
    this.wss.on('connection', (ws) => this.onConnection(ws))
    const every = opts.pingIntervalMs ?? 15_000
    this.timer = setInterval(() => this.heartbeat(every), every)
    this.timer.unref()
  }

  /** Takes the upgrade requests for `/v1/agent` on the console's HTTP server. */
  attach(server: Server): void {
    server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      if (new URL(req.url ?? '/', 'http://x').pathname !== AGENT_PATH) return
      this.wss.handleUpgrade(req, socket, head, (ws) => this.wss.emit('connection', ws, req))
    })
  }

  /** Providers connected now that serve `model` (all when undefined). */
  connected(model?: string): ConnectedProvider[] {
    return [...this.providers.values()].filter((p) => !model || p.models.includes(model))
  }

  async close(): Promise<void> {
    clearInterval(this.timer)
    for (const ws of this.wss.clients) ws.close(1001, 'exchange shutting down')
    await new Promise<void>((resolve) => this.wss.close(() => resolve()))
  }

  private onConnection(ws: WebSocket): void {
    let did: string | null = null
    const refuse = (code: RefusalCode, message: string) => {
      ws.send(JSON.stringify({ type: 'error', v: PROTOCOL_VERSION, code, message }))
      ws.close(1008, code)
    }
    ws.on('message', (data, isBinary) => {
      void (async () => {
        let frame: Frame
        try {
          frame = JSON.parse(isBinary ? '' : data.toString()) as Frame
          if (!frame || typeof frame.type !== 'string') throw new Error('no type')
        } catch {
          return refuse('bad_frame', 'frames are JSON objects with a string "type"')
        }
        if (!did) {
          if (frame.type !== 'register') return refuse('not_registered', 'the first frame must be "register"')
          const result = await this.register(frame, ws)
          if ('refusal' in result) return refuse(result.refusal, result.message)
          did = result.did
          return
        }
        const p = this.providers.get(did)
        if (p?.socket !== ws) return
        p.lastSeen = Date.now()
        if (frame.type === 'ping') ws.send(JSON.stringify({ type: 'pong', v: PROTOCOL_VERSION, t: frame.t }))
        // heartbeat and pong only refresh lastSeen; job frames arrive with the inference path.
      })()
    })
    ws.on('error', () => ws.terminate())
    ws.on('close', () => {
      if (did && this.providers.get(did)?.socket === ws) this.providers.delete(did)
    })
  }

  private async register(frame: Frame, ws: WebSocket): Promise<{ did: string } | { refusal: RefusalCode; message: string }> {
    if (frame.v !== PROTOCOL_VERSION) return { refusal: 'unsupported_version', message: `this exchange speaks protocol version ${PROTOCOL_VERSION}` }
    const { did, serviceAuth, encryptionPubKey, models, version } = frame as Record<string, unknown>
    if (typeof did !== 'string' || typeof serviceAuth !== 'string' || typeof encryptionPubKey !== 'string' || !Array.isArray(models) || !models.every((m) => typeof m === 'string')) {
      return { refusal: 'bad_frame', message: 'register needs did, serviceAuth, encryptionPubKey and models (strings)' }
    }
    try {
      const payload = await verifyJwt(serviceAuth, this.opts.exchangeDid, null, async (iss, force) => {
        if (iss !== did) throw new Error('token issuer is not the registering DID')
        return this.opts.idResolver.did.resolveAtprotoKey(iss, force)
      })
      if (payload.iss !== did) throw new Error('token issuer is not the registering DID')
    } catch (err) {
      log.info('provider registration refused: auth', { did, err: err as Error })
      return { refusal: 'auth_failed', message: `could not verify a service-auth token from ${did} for ${this.opts.exchangeDid}` }
    }
    const published = await this.opts.publishedKeys(did)
    if (!published.includes(encryptionPubKey)) {
      return {
        refusal: 'encryption_key_mismatch',
        message: published.length
          ? `the announced encryption key is not the encryptionPubKey of any of your published ${ids.ComputeProvider} records`
          : `no ${ids.ComputeProvider} record of yours is indexed yet: publish it first`,
      }
    }
    const previous = this.providers.get(did)
    if (previous && previous.socket !== ws) previous.socket.close(1000, 'replaced by a new connection')
    this.providers.set(did, { did, encryptionPubKey, models: models as string[], version: typeof version === 'string' ? version : undefined, connectedAt: new Date().toISOString(), lastSeen: Date.now(), socket: ws })
    ws.send(JSON.stringify({ type: 'registered', v: PROTOCOL_VERSION, did, exchange: this.opts.exchangeDid }))
    log.info('provider registered', { did, models })
    return { did }
  }

  private heartbeat(every: number): void {
    const now = Date.now()
    for (const p of this.providers.values()) {
      if (now - p.lastSeen > 3 * every) {
        log.info('provider silent; dropped', { did: p.did })
        p.socket.terminate()
        this.providers.delete(p.did)
      } else {
        p.socket.send(JSON.stringify({ type: 'ping', v: PROTOCOL_VERSION, t: now }))
      }
    }
  }
}
