/**
 * The load of `npm run bench:scale`: closed loops of HTTP/1.1 requests on
 * keep-alive sockets, written and parsed by hand (a request line out, a
 * status line, headers and a Content-Length or chunked body in), so the
 * client takes as little as possible of the cores it shares with the server.
 */
import { connect, type Socket } from 'node:net'

export interface LoadResult {
  requests: number
  seconds: number
  reqPerSec: number
  p50Ms: number
  p99Ms: number
  /** Answers other than 200 (and 304): a measurement with any is not a valid one. */
  errors: number
}

const percentile = (sorted: Float64Array, p: number) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]! : NaN)

/** One keep-alive connection answering one request at a time. */
class Connection {
  private readonly socket: Socket
  private buf: Buffer<ArrayBufferLike> = Buffer.alloc(0)
  private pending: ((status: number) => void) | null = null
  private failed: ((err: Error) => void) | null = null

  constructor(port: number) {
    this.socket = connect(port, '127.0.0.1')
    this.socket.setNoDelay(true)
    this.socket.on('data', (chunk) => this.onData(chunk))
    this.socket.on('error', (err) => this.failed?.(err))
    this.socket.on('close', () => this.failed?.(new Error('connection closed')))
  }

  get(path: string, headers = ''): Promise<number> {
    return new Promise((resolve, reject) => {
      this.pending = resolve
      this.failed = reject
      this.socket.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\n${headers}\r\n`)
    })
  }

  /** The answer being read: its status, and the body bytes still to come (-1: chunked, parsed when whole). */
  private reading: { status: number; remaining: number } | null = null

  /** Completes the pending request once its whole answer is in; a body of known length is counted, not kept. */
  private onData(chunk: Buffer): void {
    let buf: Buffer<ArrayBufferLike> = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk
    if (!this.reading) {
      const head = buf.indexOf('\r\n\r\n')
      if (head < 0) {
        this.buf = buf
        return
      }
      const headers = buf.subarray(0, head).toString('latin1')
      const length = /\r\ncontent-length: *(\d+)/i.exec(headers)
      const chunked = !length && /\r\ntransfer-encoding: *chunked/i.test(headers)
      this.reading = { status: Number(headers.slice(9, 12)), remaining: length ? Number(length[1]) : chunked ? -1 : 0 }
      buf = buf.subarray(head + 4)
    }
    const r = this.reading
    if (r.remaining >= 0) {
      if (buf.length < r.remaining) {
        r.remaining -= buf.length
        this.buf = Buffer.alloc(0)
        return
      }
      this.buf = buf.subarray(r.remaining)
    } else {
      // Chunks until the empty one.
      let at = 0
      for (;;) {
        const line = buf.indexOf('\r\n', at)
        if (line < 0) return void (this.buf = buf)
        const size = parseInt(buf.subarray(at, line).toString('latin1'), 16)
        at = line + 2 + size + 2
        if (buf.length < at) return void (this.buf = buf)
        if (size === 0) break
      }
      this.buf = buf.subarray(at)
    }
    this.reading = null
    const done = this.pending
    this.pending = null
    done?.(r.status)
  }

  close(): void {
    this.failed = null
    this.socket.destroy()
  }
}

/** Runs `connections` closed loops over `urls` (round robin) for `seconds`; a short warm-up first is left to the caller. */
export async function load(port: number, urls: string[], connections: number, seconds: number): Promise<LoadResult> {
  const conns = Array.from({ length: connections }, () => new Connection(port))
  const latencies: number[] = []
  let next = 0
  let errors = 0
  const t0 = performance.now()
  const deadline = t0 + seconds * 1000
  await Promise.all(
    conns.map(async (c) => {
      while (performance.now() < deadline) {
        const url = urls[next++ % urls.length]!
        const start = performance.now()
        const status = await c.get(url)
        latencies.push(performance.now() - start)
        if (status !== 200 && status !== 304) errors++
      }
    }),
  )
  const elapsed = (performance.now() - t0) / 1000
  for (const c of conns) c.close()
  const sorted = Float64Array.from(latencies).sort()
  return { requests: latencies.length, seconds: elapsed, reqPerSec: latencies.length / elapsed, p50Ms: percentile(sorted, 50), p99Ms: percentile(sorted, 99), errors }
}

/** One request's status and headers, for checks (conditional requests, limits). */
export async function probe(port: number, path: string, headers: Record<string, string> = {}): Promise<{ status: number; headers: Headers; body: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`, { headers })
  return { status: res.status, headers: res.headers, body: await res.text() }
}
