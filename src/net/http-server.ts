/**
 * The HTTP server every service listens with: the Hono adapter's request
 * listener on a plain `node:http` server, plus answers for the requests that
 * are refused before any route runs.
 *
 * Node's parser refuses malformed HTTP (400), a URL or headers past 16 kB
 * (431) and a few rarer things with an empty body; the adapter refuses a Host
 * that makes no URL (400, empty); a CONNECT is closed with no answer at all.
 * Each of those gets the service's own error object here instead, so a client
 * always meets the same error shape whatever layer refused it.
 */
import { createServer, type IncomingMessage, type Server } from 'node:http'
import type { Duplex } from 'node:stream'
import { getRequestListener } from '@hono/node-server'

/** A refusal before any route: its status, a stable code, and why. `path` is the request target when it could be read. */
export interface Refusal {
  status: number
  code: string
  message: string
  path: string | null
}

/** Builds the error body the service uses for `refusal` (XRPC's `{ error, message }`, or OpenAI's). */
export type RefusalBody = (refusal: Refusal) => object

export interface ServeHttpOpts {
  /** The adapter passes `{ incoming, outgoing }` (Node's request and response) as the second argument. */
  fetch: (req: Request, env: unknown) => Response | Promise<Response>
  port: number
  hostname: string
  refusalBody: RefusalBody
}

/** Node's parser codes with an answer other than 400 (the ones Node itself singles out). */
const PARSER_REFUSALS: Record<string, Omit<Refusal, 'path'>> = {
  HPE_HEADER_OVERFLOW: { status: 431, code: 'HeadersTooLarge', message: 'the request line or headers are larger than 16 kB' },
  HPE_CHUNK_EXTENSIONS_OVERFLOW: { status: 413, code: 'PayloadTooLarge', message: 'chunk extensions too large' },
  ERR_HTTP_REQUEST_TIMEOUT: { status: 408, code: 'RequestTimeout', message: 'the request was not received in time' },
}
const MALFORMED: Omit<Refusal, 'path'> = { status: 400, code: 'InvalidRequest', message: 'malformed HTTP request' }

const REASONS: Record<number, string> = { 400: 'Bad Request', 405: 'Method Not Allowed', 408: 'Request Timeout', 413: 'Payload Too Large', 431: 'Request Header Fields Too Large' }

/** A whole HTTP/1.1 response with a JSON body, for writing straight to a socket no response object owns. */
export function rawResponse(status: number, body: object, extraHeaders: string[] = []): string {
  const json = JSON.stringify(body)
  const head = [`HTTP/1.1 ${status} ${REASONS[status] ?? 'Error'}`, 'Content-Type: application/json; charset=utf-8', `Content-Length: ${Buffer.byteLength(json)}`, 'Cache-Control: no-store', 'Connection: close', ...extraHeaders]
  return `${head.join('\r\n')}\r\n\r\n${json}`
}

/** Answers a socket taken from the HTTP server (an upgrade, a CONNECT) and closes it once the answer is out. */
export function refuseSocket(socket: Duplex, status: number, body: object, extraHeaders: string[] = []): void {
  socket.on('error', () => socket.destroy())
  socket.once('finish', () => socket.destroy())
  socket.end(rawResponse(status, body, extraHeaders))
}

/** The request target from the bytes the parser choked on, when they start with a request line. */
function targetOf(raw: unknown): string | null {
  if (!Buffer.isBuffer(raw)) return null
  const line = /^[!-~]{1,32} ([!-~]{1,4096})/.exec(raw.subarray(0, 4200).toString('latin1'))
  return line?.[1] ?? null
}

export function serveHttp(opts: ServeHttpOpts, onListening: (port: number) => void): Server {
  // The adapter calls its error handler synchronously, from inside the listener, when it cannot build a
  // Request from what Node parsed (a Host that makes no URL, `*`, a backslash); the request is kept here
  // for that call, so the refusal can still take the shape the request's path asks for.
  let building: IncomingMessage | null = null
  const listener = getRequestListener(opts.fetch, {
    hostname: opts.hostname,
    errorHandler: (err) => {
      const refused = err instanceof Error && err.name === 'RequestError'
      const refusal: Refusal = refused
        ? { status: 400, code: 'InvalidRequest', message: `the request target or Host makes no URL (${err.message})`, path: building?.url ?? null }
        : { status: 500, code: 'InternalServerError', message: 'Internal server error', path: building?.url ?? null }
      return Response.json(opts.refusalBody(refusal), { status: refusal.status, headers: { 'cache-control': 'no-store' } })
    },
  })
  // Node answers an HTTP/1.1 request without Host itself (400, empty body) unless told not to: the
  // listener below refuses it instead, in the service's shape.
  const server = createServer({ requireHostHeader: false }, (req, res) => {
    if (req.httpVersion === '1.1' && req.headers.host === undefined) {
      const refusal: Refusal = { status: 400, code: 'InvalidRequest', message: 'an HTTP/1.1 request must have a Host header', path: req.url ?? null }
      const body = JSON.stringify(opts.refusalBody(refusal))
      res.writeHead(400, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body), 'cache-control': 'no-store', connection: 'close' })
      res.end(body)
      return
    }
    building = req
    try {
      return listener(req, res)
    } finally {
      building = null
    }
  })

  // Node's own handling of a parse error, with our body: answer only while no response of this socket
  // has begun (a second status line would corrupt the peer), then destroy the socket.
  server.on('clientError', (err: NodeJS.ErrnoException & { rawPacket?: unknown }, socket: Duplex) => {
    const inFlight = (socket as Duplex & { _httpMessage?: { _headerSent?: boolean } })._httpMessage
    if (socket.writable && !inFlight?._headerSent) {
      const refusal: Refusal = { ...(PARSER_REFUSALS[err.code ?? ''] ?? MALFORMED), path: targetOf(err.rawPacket) }
      socket.write(rawResponse(refusal.status, opts.refusalBody(refusal)))
    }
    socket.destroy(err)
  })

  // No service here tunnels: a CONNECT is refused like any unsupported method, not dropped.
  server.on('connect', (req: IncomingMessage, socket: Duplex) => {
    const refusal: Refusal = { status: 405, code: 'MethodNotAllowed', message: 'CONNECT is not supported', path: req.url ?? null }
    refuseSocket(socket, refusal.status, opts.refusalBody(refusal), ['Allow: GET, HEAD, POST'])
  })

  server.listen(opts.port, opts.hostname, () => {
    const address = server.address()
    onListening(typeof address === 'object' && address ? address.port : opts.port)
  })
  return server
}
