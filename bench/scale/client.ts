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

  /** Completes the pending request once its whole answer is in. */
  private onData(chunk: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk
    const head = this.buf.indexOf('\r\n\r\n')
    if (head < 0) return
    const headers = this.buf.subarray(0, head).toString('latin1')
    const status = Number(headers.slice(9, 12))
    const length = /\r\ncontent-length: *(\d+)/i.exec(headers)
    let end: number
    if (length) {
      end = head + 4 + Number(length[1])
      if (this.buf.length < end) return
    } else if (/\r\ntransfer-encoding: *chunked/i.test(headers)) {
      // Chunks until the empty one.
      let at = head + 4
      for (;;) {
        const line = this.buf.indexOf('\r\n', at)
        if (line < 0) return
        const size = parseInt(this.buf.subarray(at, line).toString('latin1'), 16)
        at = line + 2 + size + 2
        if (this.buf.length < at) return
        if (size === 0) break
      }
      end = at
    } else end = head + 4
    this.buf = this.buf.subarray(end)
    const done = this.pending
    this.pending = null
    done?.(status)
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
