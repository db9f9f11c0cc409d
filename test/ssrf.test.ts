/**
 * Outbound requests to addresses from user data, in production mode: DID
 * documents, handles, sign-in identifiers and PDS endpoints that point at
 * loopback, private or link-local addresses, plain http, a redirect, or a
 * huge response. Each is refused with a reason and nothing reaches the
 * address. The only addresses a test can listen on are the private ones, so
 * "refused" is observed as the listener never seeing a connection; a dev-mode
 * control shows that the same request does reach it when the rules allow.
 *
 * The production services here are built as scripts/prod.ts builds them, with
 * COCORE_PLC_URL pointing at the local PLC directory (a configured directory
 * is trusted wherever it runs): DIDs registered there name the listeners.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { createServer as createTcpServer } from 'node:net'
import dns from 'node:dns'
import { syncBuiltinESMExports } from 'node:module'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Secp256k1Keypair } from '@atproto/crypto'
import { createServiceJwt } from '@atproto/xrpc-server'
import { WebSocket } from 'ws'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { AppView } from '../appview/index.ts'
import { backfill } from '../appview/indexer/backfill.ts'
import { fetchRepo, getRepoStatus, MAX_REPO_BYTES, RepoFetchError } from '../appview/indexer/repo-fetch.ts'
import { startConsole, type ConsoleService } from '../console/index.ts'
import { toWs } from '../src/config.ts'
import { LocalNetwork } from '../src/dev/network.ts'
import { AGENT_PATH, PROTOCOL_VERSION, REGISTER_LXM } from '../src/protocol/agent.ts'
import { createIdResolver } from '../src/identity/index.ts'
import { tempDbPath } from './fixture/appview.ts'
import { consoleOpts, testSecretKey } from './fixture/console.ts'

/** An HTTP listener on loopback that records every connection and request it gets. */
class Listener {
  connections = 0
  requests: string[] = []
  /** Bytes of the huge answer written before the client went away, and whether it was all sent. */
  hugeSent = 0
  hugeFinished = false
  readonly server: Server
  port = 0
  private readonly handle: (req: IncomingMessage, res: ServerResponse, self: Listener) => void

  constructor(handle: (req: IncomingMessage, res: ServerResponse, self: Listener) => void) {
    this.handle = handle
    this.server = createServer((req, res) => {
      this.requests.push(req.url ?? '')
      this.handle(req, res, this)
    })
    this.server.on('connection', () => this.connections++)
  }
  async listen(host = '127.0.0.1'): Promise<this> {
    await new Promise<void>((resolve) => this.server.listen(0, host, resolve))
    this.port = (this.server.address() as { port: number }).port
    return this
  }
  get hit(): boolean {
    return this.connections > 0
  }
  reset(): void {
    this.connections = 0
    this.requests = []
  }
  close(): Promise<void> {
    this.server.closeAllConnections()
    return new Promise((resolve) => this.server.close(() => resolve()))
  }
}

/** Streams `bytes` of zeros with backpressure, counting what the client accepted. */
function streamHuge(res: ServerResponse, self: Listener, bytes: number): void {
  res.writeHead(200, { 'content-type': 'application/vnd.ipld.car' })
  const chunk = Buffer.alloc(1 << 20)
  const pump = () => {
    while (self.hugeSent < bytes) {
      self.hugeSent += chunk.length
      if (!res.write(chunk)) return void res.once('drain', pump)
    }
    res.end(() => (self.hugeFinished = true))
  }
  res.on('close', () => res.removeAllListeners('drain'))
  pump()
}

const HUGE = 100 * 1024 * 1024

let net: LocalNetwork
/** What every DID document and sign-in here points at. */
let target: Listener
/** Where the redirects point: it must never be reached. */
let redirectTarget: Listener
/** A configured (trusted) firehose source, which is also the PDS of some DIDs: it redirects, or answers too much. */
let source: Listener
/** The configured PLC directory, through a recording proxy: shows each DID was resolved before its PDS was refused. */
let plc: Listener
/** The production AppView (allowHttp false), as scripts/prod.ts builds it. */
let prodAv: AppView
/** The same AppView on the local network (dev): the control. */
let devAv: AppView
const privateDids: { did: string; pds: string }[] = []
let redirectDid: string
let hugeDid: string
let controlDid: string

/** A did:plc on the local PLC whose DID document names `pds` as the account's PDS. */
async function plcDid(pds: string, handle: string): Promise<string> {
  const key = await Secp256k1Keypair.create()
  return net.net.pds.ctx.plcClient.createDid({ signingKey: key.did(), handle, pds, rotationKeys: [key.did()], signer: key })
}

beforeAll(async () => {
  net = await LocalNetwork.create()
  target = await new Listener((req, res) => {
    // Answers like a PDS and a did:web host would, so a request that got through would succeed.
    if (req.url === '/.well-known/did.json') return void res.end(JSON.stringify({ id: 'did:web:whatever', alsoKnownAs: [], service: [] }))
    if (req.url === '/.well-known/atproto-did') return void res.end('did:plc:aaaaaaaaaaaaaaaaaaaaaaaa')
    res.writeHead(404, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'RepoNotFound' }))
  }).listen()
  redirectTarget = await new Listener((_req, res) => res.end('reached')).listen()
  source = await new Listener((req, res, self) => {
    const url = new URL(req.url!, 'http://x')
    if (url.pathname.endsWith('listReposByCollection') || url.pathname.endsWith('listRepos')) {
      res.setHeader('content-type', 'application/json')
      return void res.end(JSON.stringify({ repos: privateDids.map((d) => ({ did: d.did })) }))
    }
    if (url.pathname.endsWith('getRepo') && url.searchParams.get('did') === redirectDid) {
      return void res.writeHead(302, { location: `http://127.0.0.1:${redirectTarget.port}/xrpc/com.atproto.sync.getRepo?did=${redirectDid}` }).end()
    }
    if (url.pathname.endsWith('getRepo') && url.searchParams.get('did') === hugeDid) return streamHuge(res, self, HUGE)
    res.writeHead(404).end()
  }).listen()

  plc = await new Listener((req, res) => {
    void fetch(`${net.plcUrl}${req.url}`).then(async (up) => {
      res.writeHead(up.status, { 'content-type': up.headers.get('content-type') ?? 'application/json' })
      res.end(Buffer.from(await up.arrayBuffer()))
    })
  }).listen()
  const plcUrl = `http://127.0.0.1:${plc.port}`

  const p = target.port
  for (const pds of [
    `http://127.0.0.1:${p}`,
    `https://127.0.0.1:${p}`,
    `https://localhost:${p}`,
    `http://localhost:${p}`,
    `https://[::1]:${p}`,
    'https://localhost',
    'https://10.0.0.7',
    'https://192.168.1.20',
    'https://172.16.0.3',
    'https://169.254.169.254',
    'https://[fe80::1]',
    'https://pds.internal.test',
  ]) {
    privateDids.push({ did: await plcDid(pds, `p${privateDids.length}.test`), pds })
  }
  redirectDid = await plcDid(`http://127.0.0.1:${source.port}`, 'redirect.test')
  hugeDid = await plcDid(`http://127.0.0.1:${source.port}`, 'huge.test')
  controlDid = privateDids[0]!.did

  // As scripts/prod.ts: production mode (no allowHttp), the configured PLC and sources.
  prodAv = new AppView({ dbPath: tempDbPath(), sources: [toWs(`http://127.0.0.1:${source.port}`)], plcUrl, index: false })
  devAv = new AppView({ dbPath: tempDbPath(), sources: [toWs(`http://127.0.0.1:${source.port}`)], plcUrl, allowHttp: true, index: false })
})
afterAll(async () => {
  await prodAv?.stop()
  await devAv?.stop()
  for (const l of [target, redirectTarget, source, plc]) await l?.close()
  await net?.close()
})

/**
 * The policy's words for a refused address (an IP-literal host, a custom port,
 * plain http, a local name, a non-unicast address), as opposed to a
 * connection that was tried and failed.
 */
const REFUSED = /Invalid hostname|not allowed|not a public domain|non-unicast|Forbidden/i

describe('AppView repo fetches (getRepo, getRepoStatus, backfill)', () => {
  it('refuse a PDS endpoint at a loopback, private or link-local address or over http, naming the reason, and never connect', async () => {
    target.reset()
    for (const { did, pds } of privateDids) {
      const err = await fetchRepo(prodAv.idResolver, did).then(
        () => null,
        (e: unknown) => e,
      )
      expect(err, pds).toBeInstanceOf(RepoFetchError)
      const message = (err as Error).message
      expect(message, pds).toContain(`getRepo ${did} at ${pds}`)
      expect(message, pds).toMatch(REFUSED)
      expect(message, pds).not.toMatch(/ECONNREFUSED|timeout|aborted/i)
      // Unknown, not "deleted": the indexer keeps the account's state.
      expect(await getRepoStatus(prodAv.idResolver, did), pds).toBeNull()
    }
    expect(target.connections).toBe(0)
  })

  it('backfill in production lists the configured source but fetches none of the repos it names', async () => {
    target.reset()
    source.reset()
    const result = await backfill({ store: prodAv.store, indexer: prodAv.indexer, idResolver: prodAv.idResolver, sources: [`http://127.0.0.1:${source.port}`] })
    expect(result).toMatchObject({ total: privateDids.length, done: privateDids.length, failed: privateDids.length, records: 0 })
    expect(source.requests.some((u) => u.includes('com.atproto.sync.listRepos'))).toBe(true)
    expect(target.connections).toBe(0)
  })

  it('control: on the local network the same DID document does reach the listener', async () => {
    target.reset()
    await expect(fetchRepo(devAv.idResolver, controlDid)).rejects.toMatchObject({ gone: true })
    expect(target.requests).toEqual([`/xrpc/com.atproto.sync.getRepo?did=${encodeURIComponent(controlDid)}`])
  })

  it('refuse a redirect, even from a trusted configured source, and never reach where it points', async () => {
    for (const av of [prodAv, devAv]) {
      redirectTarget.reset()
      const err = await fetchRepo(av.idResolver, redirectDid).catch((e: unknown) => e)
      expect(err).toBeInstanceOf(RepoFetchError)
      expect((err as Error).message).toMatch(/redirect/)
      expect(redirectTarget.connections).toBe(0)
    }
  })

  it(`stop reading a repo larger than ${MAX_REPO_BYTES / 1024 / 1024} MB (a 100 MB stream is refused, not buffered)`, async () => {
    for (const av of [prodAv, devAv]) {
      source.hugeSent = 0
      source.hugeFinished = false
      const err = await fetchRepo(av.idResolver, hugeDid).catch((e: unknown) => e)
      expect(err).toBeInstanceOf(RepoFetchError)
      expect((err as Error).message).toMatch(/too large/i)
      // The client hung up: the listener could not send it all.
      expect(source.hugeFinished).toBe(false)
      expect(source.hugeSent).toBeLessThan(HUGE)
    }
  })
})

describe('identity resolution in production (DID documents and handles)', () => {
  it('does not fetch did:web documents at loopback, private or link-local hosts', async () => {
    target.reset()
    const dids = [`did:web:localhost%3A${target.port}`, `did:web:127.0.0.1%3A${target.port}`, 'did:web:localhost', 'did:web:10.0.0.1', 'did:web:192.168.0.1', 'did:web:169.254.169.254', 'did:web:metadata.internal.test']
    for (const did of dids) {
      const err = await prodAv.idResolver.did.resolve(did, true).then(
        (doc) => new Error(`resolved: ${JSON.stringify(doc)}`),
        (e: unknown) => e as Error,
      )
      expect(`${err.message} ${String((err.cause as Error | undefined)?.message ?? '')}`, did).toMatch(REFUSED)
    }
    expect(target.connections).toBe(0)
    // Control: the local network's resolver does fetch it (so the listener would have seen the request).
    await devAv.idResolver.did.resolve(`did:web:localhost%3A${target.port}`, true).catch(() => null)
    expect(target.requests).toContain('/.well-known/did.json')
  })

  it('does not fetch /.well-known/atproto-did from a handle at a loopback or private address', async (ctx) => {
    // Handles are resolved over https on the default port: a TCP listener on 127.0.0.1:443 sees any attempt.
    const tls = createTcpServer((s) => s.destroy())
    let connections = 0
    tls.on('connection', () => connections++)
    const bound = await new Promise<boolean>((resolve) => tls.once('error', () => resolve(false)).listen(443, '127.0.0.1', () => resolve(true)))
    if (!bound) ctx.skip()
    try {
      for (const handle of ['127.0.0.1', 'localhost', 'localhost.localdomain', 'pds.local', 'anything.test']) {
        expect(await prodAv.idResolver.handle.resolve(handle), handle).toBeUndefined()
      }
      expect(connections).toBe(0)
      // Control: the library resolver with plain fetch (what the local network uses) does connect.
      const open = createIdResolver({ plcUrl: net.plcUrl, cacheSize: 10, cacheTtlSec: 60, allowHttp: true })
      expect(await open.handle.resolve('127.0.0.1')).toBeUndefined()
      expect(connections).toBeGreaterThan(0)
    } finally {
      await new Promise((r) => tls.close(r))
    }
  })
})

describe('console sign-in (OAuth client) in production', () => {
  let prod: ConsoleService
  let dev: ConsoleService
  const PUBLIC = 'https://console.example.net'

  beforeAll(async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'cocore-ssrf-console-'))
    // As scripts/prod.ts starts it: production mode, the configured PLC directory, no local PDS.
    prod = await startConsole({ port: 0, host: '127.0.0.1', dbPath: join(dataDir, 'console.sqlite'), dataDir, mode: 'production', publicUrl: PUBLIC, plcUrl: `http://127.0.0.1:${plc.port}`, secretKey: testSecretKey(), appviewUrl: 'https://appview.example.net', loginRatePerMinute: 10_000 })
    dev = await startConsole(consoleOpts(net, 'http://127.0.0.1:1', { loginRatePerMinute: 10_000 }))
  })
  afterAll(async () => {
    await prod?.close()
    await dev?.close()
  })

  const login = (svc: ConsoleService, origin: string, identifier: string) =>
    fetch(`${svc.localUrl}/login`, { method: 'POST', redirect: 'manual', headers: { origin, 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams({ identifier }) })

  it('refuses identifiers that lead to a private PDS (DIDs, did:web, PDS addresses), with the sign-in page, and never connects', async () => {
    target.reset()
    plc.reset()
    const identifiers = [
      ...privateDids.map((d) => d.did),
      `did:web:localhost%3A${target.port}`,
      `did:web:127.0.0.1%3A${target.port}`,
      `http://127.0.0.1:${target.port}`,
      `https://127.0.0.1:${target.port}`,
      `https://localhost:${target.port}`,
      `http://[::1]:${target.port}`,
      'https://169.254.169.254',
      'https://10.1.2.3',
    ]
    for (const identifier of identifiers) {
      const res = await login(prod, PUBLIC, identifier)
      expect(res.status, identifier).toBe(400)
      expect(await res.text(), identifier).toMatch(/Could not (find|reach)/)
    }
    // Each DID was resolved at the configured directory: the refusal came at its PDS address, not before.
    for (const { did } of privateDids) expect(plc.requests, did).toContain(`/${encodeURIComponent(did)}`)
    expect(target.connections).toBe(0)
  })

  it('control: the dev console (loopback allowed) does contact the PDS a DID document names', async () => {
    target.reset()
    const res = await login(dev, dev.url, controlDid)
    expect(res.status).toBe(400)
    expect(target.requests.some((u) => u.startsWith('/.well-known/oauth-protected-resource'))).toBe(true)
  })
})

describe('provider gateway (the exchange) in production', () => {
  const EXCHANGE = 'did:web:exchange.example.net'

  /** Registers on the gateway as `did` with a service-auth token it issued itself; resolves to the gateway's answer. */
  async function register(consoleUrl: string, did: string): Promise<{ type: string; code?: string }> {
    const serviceAuth = await createServiceJwt({ iss: did, aud: EXCHANGE, lxm: REGISTER_LXM, keypair: await Secp256k1Keypair.create() })
    const ws = new WebSocket(`${toWs(consoleUrl)}${AGENT_PATH}`)
    try {
      await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject))
      const answer = new Promise<{ type: string; code?: string }>((resolve) => ws.once('message', (data) => resolve(JSON.parse(String(data)))))
      const key = Buffer.alloc(32).toString('base64')
      ws.send(JSON.stringify({ type: 'register', v: PROTOCOL_VERSION, provider_did: did, auth_jwt: serviceAuth, encryption_pub_key: key, attestation_pub_key: key, supported_models: ['m'] }))
      return await answer
    } finally {
      ws.close()
    }
  }

  it("does not fetch a registering provider's DID document from a private address", async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'cocore-ssrf-gateway-'))
    const prod = await startConsole({ port: 0, host: '127.0.0.1', dbPath: join(dataDir, 'console.sqlite'), dataDir, mode: 'production', publicUrl: 'https://console.example.net', plcUrl: `http://127.0.0.1:${plc.port}`, secretKey: testSecretKey(), appviewUrl: 'https://appview.example.net', index: prodAv.consoleIndex(), exchangeDid: EXCHANGE })
    const dev = await startConsole(consoleOpts(net, 'http://127.0.0.1:1', { index: devAv.consoleIndex(), exchangeDid: EXCHANGE }))
    try {
      target.reset()
      for (const did of [`did:web:localhost%3A${target.port}`, `did:web:127.0.0.1%3A${target.port}`, 'did:web:10.0.0.1', 'did:web:169.254.169.254']) {
        expect(await register(prod.localUrl, did), did).toMatchObject({ type: 'error', code: 'auth_failed' })
      }
      expect(target.connections).toBe(0)
      // Control: the local network's gateway does fetch it.
      expect(await register(dev.localUrl, `did:web:localhost%3A${target.port}`)).toMatchObject({ type: 'error', code: 'auth_failed' })
      expect(target.requests).toContain('/.well-known/did.json')
    } finally {
      await prod.close()
      await dev.close()
    }
  })
})

describe('a public name that resolves to a private address', () => {
  // No public DNS runs here, so the system resolver is stood in for (Node's own `dns.lookup`,
  // which the safe fetch calls at connect time): names under REBIND resolve to 127.0.0.1, every
  // other name as before. A TCP listener on 127.0.0.1:443 sees any connection that got through.
  // (Not under example.com: the safe fetch refuses that name outright, before any lookup.)
  const REBIND = '.rebind-ssrf.net'
  const asked: string[] = []
  const realLookup = dns.lookup
  let tls: ReturnType<typeof createTcpServer>
  let connections = 0
  let bound = false

  beforeAll(async () => {
    const fake = (hostname: string, options: unknown, callback?: unknown): void => {
      const cb = (typeof options === 'function' ? options : callback) as (err: Error | null, address: unknown, family?: number) => void
      const opts = (typeof options === 'object' && options !== null ? options : {}) as { all?: boolean }
      if (!hostname.endsWith(REBIND)) return void realLookup(hostname, opts as dns.LookupAllOptions, cb as never)
      asked.push(hostname)
      if (opts.all) cb(null, [{ address: '127.0.0.1', family: 4 }])
      else cb(null, '127.0.0.1', 4)
    }
    ;(dns as { lookup: unknown }).lookup = fake
    syncBuiltinESMExports()
    tls = createTcpServer((s) => s.destroy())
    tls.on('connection', () => connections++)
    bound = await new Promise<boolean>((resolve) => tls.once('error', () => resolve(false)).listen(443, '127.0.0.1', () => resolve(true)))
  })
  afterAll(async () => {
    ;(dns as { lookup: unknown }).lookup = realLookup
    syncBuiltinESMExports()
    if (bound) await new Promise((r) => tls.close(r))
  })

  it('is refused after resolution, for a PDS endpoint and a did:web host, and nothing connects', async (ctx) => {
    if (!bound) ctx.skip()
    const pdsName = `pds${REBIND}`
    const did = await plcDid(`https://${pdsName}`, 'rebind.test')
    const err = await fetchRepo(prodAv.idResolver, did).catch((e: unknown) => e)
    expect(err).toBeInstanceOf(RepoFetchError)
    expect((err as Error).message, (err as Error).message).toMatch(/non-unicast/)
    const web = await prodAv.idResolver.did.resolve(`did:web:web${REBIND}`, true).then(
      (doc) => new Error(`resolved: ${JSON.stringify(doc)}`),
      (e: unknown) => e as Error,
    )
    expect(`${web.message} ${String((web.cause as Error | undefined)?.message ?? '')}`).toMatch(/non-unicast/)
    // The names passed every check made on the name itself: they were looked up, and the address refused.
    expect(asked).toEqual(expect.arrayContaining([pdsName, `web${REBIND}`]))
    expect(connections).toBe(0)
  })

  it('control: without the safe fetch, the same name does reach the listener', async (ctx) => {
    if (!bound) ctx.skip()
    const before = connections
    await fetch(`https://control${REBIND}/`, { signal: AbortSignal.timeout(5_000) }).catch(() => null)
    expect(asked).toContain(`control${REBIND}`)
    expect(connections).toBeGreaterThan(before)
  })
})
