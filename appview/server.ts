/** The AppView's HTTP surface: XRPC read API, health, and the service's did:web document. */
import { Hono, type Context } from 'hono'
import { cors } from 'hono/cors'
import type { IdResolver } from '@atproto/identity'
import type { Db } from '../src/db/index.ts'
import { appviewLogger as log } from '../src/logger.ts'
import { xrpcErrorHandler, xrpcRouter } from '../src/xrpc/server.ts'
import { MethodNotImplementedError } from '../src/xrpc/errors.ts'
import { contextClientAddress, TrustedProxies } from '../src/net/client-address.ts'
import { CONSOLE_METHODS, forwardedRequest, type ConsoleLink } from './console-link.ts'
import { didWebOf } from '../src/config.ts'
import { handlers } from './api/index.ts'
import { cachedReads, publicReadLimit, PUBLIC_READ_DEFAULTS, type PublicReadOpts } from './api/public-reads.ts'
import type { Indexer } from './indexer/indexer.ts'
import type { IndexStore } from './indexer/store.ts'
import type { ApiContext } from './api/util.ts'
import type { AuthorityResolver } from '../src/identity/authority.ts'

export interface AppDeps {
  db: Db
  store: IndexStore
  /** Absent when this process serves reads only. */
  indexer?: Indexer
  idResolver?: IdResolver
  /** verifyReceipt's trusted brokerages and their DID documents. */
  brokerage?: { trusted: ReadonlySet<string>; authorities: AuthorityResolver }
  publicUrl?: string
  validateOutput?: boolean
  /** The public reads' limit per client address and cache of answers (PUBLIC_READ_DEFAULTS otherwise). */
  publicReads?: Partial<PublicReadOpts>
  /** The console and the DID the AppView answers for, once linked (appview/console-link.ts). */
  console?: () => { link: ConsoleLink; did: string } | null
  /** Reverse proxies whose X-Forwarded-For names the client (COCORE_TRUSTED_PROXIES). */
  trustedProxies?: TrustedProxies
}

export function createApp(deps: AppDeps): Hono {
  const app = new Hono()
  app.onError(xrpcErrorHandler(log))
  app.notFound((c) => c.json({ error: 'NotFound', message: 'Not found' }, 404))
  // Public, read-only, no credentials: any page may read the index (the console's chat page reads provider keys here).
  const preflight = cors({ origin: '*', allowMethods: ['GET', 'HEAD', 'OPTIONS'], credentials: false })
  // The time spent answering, from routing to the body (Server-Timing): lets a client (the stress run's readers) tell
  // the server's work from the time its request waited on the way in, which under saturation is most of it.
  const started = new WeakMap<Request, number>()
  const timing = (c: Context) => `app;dur=${(performance.now() - (started.get(c.req.raw) ?? 0)).toFixed(2)}`
  // Answers the XRPC router builds carry these from the start; any other answer (an error, health, a method
  // handed to the console) gets them afterwards.
  const answered = new WeakSet<Request>()
  const answerHeaders = (c: Context) => {
    answered.add(c.req.raw)
    return { 'access-control-allow-origin': '*', 'server-timing': timing(c) }
  }
  app.use('/xrpc/*', async (c, next) => {
    if (c.req.method === 'OPTIONS') return preflight(c, next)
    started.set(c.req.raw, performance.now())
    await next()
    if (answered.has(c.req.raw)) return
    c.header('Access-Control-Allow-Origin', '*')
    c.header('Server-Timing', timing(c))
  })
  const reads = { ...PUBLIC_READ_DEFAULTS, ...deps.publicReads }
  // The AppView's own methods: the console's, handed over below, keep the console's limits.
  app.use('/xrpc/*', publicReadLimit(reads, new Set(Object.keys(handlers)), (c) => contextClientAddress(c, deps.trustedProxies ?? TrustedProxies.none)))

  const health = () => ({
    status: 'ok',
    cursors: deps.indexer?.cursors() ?? {},
    indexer: deps.indexer?.stats ?? null,
    rejections: deps.store.rejectionCounts(),
  })
  app.get('/xrpc/_health', (c) => c.json(health()))
  app.get('/health', (c) => c.json(health()))
  // The reference AppView's liveness probe, as its deploys and monitors call it.
  app.get('/healthz', (c) => c.json({ ok: true }))

  // did:web for the AppView service, so clients can address it as a service DID.
  app.get('/.well-known/did.json', (c) => {
    const base = new URL(deps.publicUrl ?? new URL(c.req.url).origin)
    const did = didWebOf(base.origin)
    return c.json({
      '@context': ['https://www.w3.org/ns/did/v1'],
      id: did,
      service: [{ id: '#cocore_appview', type: 'CocoreAppView', serviceEndpoint: base.origin }],
    })
  })

  // The network's AppView serves these too; here they are the console's, handed over as they came.
  for (const nsid of CONSOLE_METHODS) {
    app.all(`/xrpc/${nsid}`, (c) => {
      const linked = deps.console?.()
      if (!linked) throw new MethodNotImplementedError(nsid)
      return linked.link.fetch(forwardedRequest(c.req.raw), { clientAddress: contextClientAddress(c, deps.trustedProxies ?? TrustedProxies.none), audience: linked.did })
    })
  }

  app.route('/', xrpcRouter<ApiContext>({ handlers: cachedReads(handlers, reads), ctx: { db: deps.db, idResolver: deps.idResolver, brokerage: deps.brokerage }, log, validateOutput: deps.validateOutput ?? process.env.NODE_ENV !== 'production', answerHeaders }))
  return app
}

