/**
 * Serves a recorded firehose on 127.0.0.1 (random port):
 * `/xrpc/com.atproto.sync.subscribeRepos?cursor=N` sends every recorded frame
 * with seq > N as fast as the socket takes them, or at `rate` frames per
 * second (sending pauses while more than `highWaterMark` bytes are buffered,
 * and resumes from the send callback), then keeps the connection open like
 * an idle live stream; with `loop`, it never runs out (below). Without a
 * cursor it sends the whole recording (a real host would start at its live
 * head, which for a recording is nothing).
 *
 * Optionally it also answers what the identity of the recorded accounts
 * needs, for a replay without the network that produced the recording:
 * `GET /<did>` (a PLC directory) and `com.atproto.identity.resolveHandle`.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { decodeAll, encode } from '@atproto/lex-cbor'
import { WebSocketServer, WebSocket } from 'ws'

export interface ReplayServerOpts {
  frames: Buffer[]
  /** seq of each frame (-1: none; such a frame is always sent). */
  seqs: number[]
  /** Bytes buffered in the socket above which sending waits. */
  highWaterMark?: number
  /** DID documents to serve as a PLC directory. */
  didDocs?: Record<string, unknown>
  /** handle -> DID, for com.atproto.identity.resolveHandle. */
  handles?: Record<string, string>
  /** Frames per second on each connection (default: as fast as the socket takes them). */
  rate?: number
  /**
   * After the last frame, send the recording again, and again: a stream that
   * lasts as long as a load test. Each pass's seqs follow the previous pass's
   * (a frame of pass k carries its seq + k * the recording's last seq, re-encoded),
   * and passes after the first carry only the #commit frames: a host announces
   * an account (#identity, #account, #sync) once. Their commits are the
   * recorded ones again, so an indexer verifies them again and then finds
   * them stale (their revs are not newer).
   */
  loop?: boolean
}

/** One subscription being served. */
export interface ReplayConnection {
  cursor: number | null
  /** Frames sent. */
  sent: number
  /** seq of the last frame sent (-1 before any). */
  lastSeq: number
  /** When the frame with this seq was sent (performance.now()), for the last SENT_TIMES seqs sent; undefined otherwise. */
  sentAt(seq: number): number | undefined
}

export interface ReplayServer {
  /** ws://127.0.0.1:<port> */
  url: string
  /** http://127.0.0.1:<port> (PLC directory and resolveHandle, when given). */
  httpUrl: string
  port: number
  /** Subscriptions served so far, with the cursor each asked for. */
  connections: ReplayConnection[]
  close(): Promise<void>
}

const SUBSCRIBE = '/xrpc/com.atproto.sync.subscribeRepos'
/** Send times kept per connection (a ring: bounded however long the stream). */
const SENT_TIMES = 1 << 16

/** Index of the first frame to send for `cursor`: frames with seq <= cursor are skipped. */
function startIndex(seqs: number[], cursor: number | null): number {
  if (cursor === null) return 0
  // Seqs of a recording are ascending: binary search for the first seq > cursor.
  let lo = 0
  let hi = seqs.length
  while (lo < hi) {
    const mid = (lo + hi) >>> 1
    if (seqs[mid]! <= cursor) lo = mid + 1
    else hi = mid
  }
  return lo
}

export async function startReplayServer(opts: ReplayServerOpts): Promise<ReplayServer> {
  const { frames, seqs } = opts
  if (frames.length !== seqs.length) throw new Error('frames and seqs differ in length')
  const hwm = opts.highWaterMark ?? 1 << 20
  const rate = opts.rate
  if (rate !== undefined && !(rate > 0)) throw new Error(`rate: expected a positive number, got ${rate}`)
  const connections: ReplayConnection[] = []
  // Seqs of pass k are offset by k * span; the frames sent again in later passes are the commits.
  const span = Math.max(0, ...seqs)
  const isCommit = opts.loop ? frames.map((f) => (decodeAll(f).next().value as { t?: unknown } | undefined)?.t === '#commit') : []
  if (opts.loop && (span <= 0 || !isCommit.some(Boolean))) throw new Error('loop: the recording has no seqs or no #commit frames')

  /** The frame at position i of the endless stream (pass i / n, frame i % n), or null to skip it. */
  const frameAt = (i: number): { frame: Buffer; seq: number } | null => {
    const n = frames.length
    const k = Math.floor(i / n)
    const j = i % n
    if (k === 0) return { frame: frames[j]!, seq: seqs[j]! }
    if (!isCommit[j] || seqs[j]! < 0) return null
    const seq = seqs[j]! + k * span
    const [header, body] = [...decodeAll(frames[j]!)] as [unknown, Record<string, unknown>]
    return { frame: Buffer.concat([encode(header as never), encode({ ...body, seq } as never)]), seq }
  }

  /** Position in the endless stream of the first frame with seq > cursor. */
  const startPosition = (cursor: number | null): number => {
    if (!opts.loop || cursor === null || cursor < span) return startIndex(seqs, cursor)
    const k = Math.floor(cursor / span)
    return k * frames.length + startIndex(seqs, cursor - k * span)
  }

  const http = createServer((req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url ?? '/', 'http://localhost')
    const json = (status: number, body: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json' })
      res.end(JSON.stringify(body))
    }
    if (url.pathname === '/xrpc/com.atproto.identity.resolveHandle' && opts.handles) {
      const did = opts.handles[url.searchParams.get('handle') ?? '']
      return did ? json(200, { did }) : json(400, { error: 'InvalidRequest', message: 'Unable to resolve handle' })
    }
    const did = decodeURIComponent(url.pathname.slice(1))
    if (opts.didDocs && did.startsWith('did:')) {
      const doc = opts.didDocs[did]
      return doc ? json(200, doc) : json(404, { message: `DID not registered: ${did}` })
    }
    json(404, { error: 'NotFound' })
  })
  const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false })
  http.on('upgrade', (req, socket, head) => {
    const url = new URL(req.url ?? '/', 'http://localhost')
    if (url.pathname !== SUBSCRIBE) {
      socket.end('HTTP/1.1 404 Not Found\r\n\r\n')
      return
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      const raw = url.searchParams.get('cursor')
      const cursor = raw === null || raw === '' ? null : Number(raw)
      const times = new Float64Array(SENT_TIMES)
      const timesSeq = new Float64Array(SENT_TIMES).fill(-1)
      const conn: ReplayConnection & { sentTime(seq: number): void } = {
        cursor,
        sent: 0,
        lastSeq: -1,
        sentAt: (seq) => (seq >= 0 && timesSeq[seq % SENT_TIMES] === seq ? times[seq % SENT_TIMES] : undefined),
        sentTime(seq) {
          if (seq < 0) return
          times[seq % SENT_TIMES] = performance.now()
          timesSeq[seq % SENT_TIMES] = seq
          this.lastSeq = seq
        },
      }
      connections.push(conn)
      serve(ws, startPosition(cursor), conn)
    })
  })

  function serve(ws: WebSocket, from: number, conn: { sent: number; sentTime(seq: number): void }) {
    let i = from
    const end = opts.loop ? Infinity : frames.length
    const t0 = performance.now()
    let paced = 0
    let timer: NodeJS.Timeout | null = null
    const pump = (err?: Error) => {
      timer = null
      if (err) return
      while (i < end) {
        if (ws.readyState !== WebSocket.OPEN) return
        // Paced: send what is due by now, then wait a few milliseconds for more to be due.
        if (rate !== undefined && paced >= (rate * (performance.now() - t0)) / 1000) {
          timer = setTimeout(pump, 4)
          return
        }
        const next = frameAt(i++)
        if (!next) continue
        const { frame, seq } = next
        conn.sent++
        paced++
        conn.sentTime(seq)
        if (ws.bufferedAmount + frame.length > hwm) {
          // Full: continue once this frame has been written to the socket.
          ws.send(frame, { binary: true }, pump)
          return
        }
        ws.send(frame, { binary: true })
      }
    }
    pump()
    ws.on('error', () => {})
    ws.on('close', () => timer && clearTimeout(timer))
  }

  await new Promise<void>((resolve, reject) => {
    http.once('error', reject)
    http.listen(0, '127.0.0.1', () => resolve())
  })
  const port = (http.address() as AddressInfo).port
  return {
    url: `ws://127.0.0.1:${port}`,
    httpUrl: `http://127.0.0.1:${port}`,
    port,
    connections,
    async close() {
      for (const ws of wss.clients) ws.terminate()
      await new Promise<void>((resolve) => wss.close(() => resolve()))
      http.closeAllConnections()
      await new Promise<void>((resolve) => http.close(() => resolve()))
    },
  }
}
