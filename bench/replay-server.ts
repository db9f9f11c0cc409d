/**
 * Serves a recorded firehose on 127.0.0.1 (random port):
 * `/xrpc/com.atproto.sync.subscribeRepos?cursor=N` sends every recorded frame
 * with seq > N as fast as the socket takes them (sending pauses while more
 * than `highWaterMark` bytes are buffered, and resumes from the send
 * callback), then keeps the connection open like an idle live stream.
 * Without a cursor it sends the whole recording (a real host would start at
 * its live head, which for a recording is nothing).
 *
 * Optionally it also answers what the identity of the recorded accounts
 * needs, for a replay without the network that produced the recording:
 * `GET /<did>` (a PLC directory) and `com.atproto.identity.resolveHandle`.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
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
}

export interface ReplayServer {
  /** ws://127.0.0.1:<port> */
  url: string
  /** http://127.0.0.1:<port> (PLC directory and resolveHandle, when given). */
  httpUrl: string
  port: number
  /** Subscriptions served so far, with the cursor each asked for. */
  connections: { cursor: number | null; sent: number }[]
  close(): Promise<void>
}

const SUBSCRIBE = '/xrpc/com.atproto.sync.subscribeRepos'

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
  const connections: ReplayServer['connections'] = []

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
      const conn = { cursor, sent: 0 }
      connections.push(conn)
      serve(ws, startIndex(seqs, cursor), conn)
    })
  })

  function serve(ws: WebSocket, from: number, conn: { sent: number }) {
    let i = from
    const pump = (err?: Error) => {
      if (err) return
      while (i < frames.length) {
        if (ws.readyState !== WebSocket.OPEN) return
        const frame = frames[i++]!
        conn.sent++
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
