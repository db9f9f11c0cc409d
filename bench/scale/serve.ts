/**
 * One server of `npm run bench:scale`, in its own process, on a port of its
 * own: prints `READY <port>` when it listens.
 *
 *   node bench/scale/serve.ts system <db>            the AppView's read path as production runs it
 *   node bench/scale/serve.ts bare <db>              better-sqlite3 + Hono, the same page queries (bench/scale/bare.ts)
 *   node bench/scale/serve.ts fixed <bodies.json>    Hono answering each /fixed/<label> with a fixed body
 *
 * `system` takes SCALE_CACHE=1 to keep its cache of answers on (off by
 * default: the bench measures answers computed) and never limits the one
 * address the load comes from.
 */
import { readFileSync } from 'node:fs'
import { serve } from '@hono/node-server'
import Database from 'better-sqlite3'
import { Hono } from 'hono'
import { bareApp } from './bare.ts'

process.env.NODE_ENV = 'production'
process.env.COCORE_LOG_LEVEL ??= 'error'
const [kind, path] = process.argv.slice(2)
const ready = (port: number) => process.stdout.write(`READY ${port}\n`)
// A clean exit when the bench is done (so a --cpu-prof of a server is written).
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => process.exit(0))

if (kind === 'system') {
  const { setLogLevel } = await import('../../src/logger.ts')
  setLogLevel('error')
  const { AppView } = await import('../../appview/index.ts')
  // A directory answering every DID with a document (verifySettlement reads the exchange's; the AppView caches it, as in production).
  const plc = new Hono()
  plc.get('/:did', (c) => c.json({ '@context': ['https://www.w3.org/ns/did/v1'], id: c.req.param('did'), alsoKnownAs: [], verificationMethod: [], service: [] }))
  const plcPort = await new Promise<number>((resolve) => serve({ fetch: plc.fetch, port: 0, hostname: '127.0.0.1' }, (info) => resolve(info.port)))
  const av = await new AppView({
    dbPath: path!,
    sources: [],
    plcUrl: `http://127.0.0.1:${plcPort}`,
    allowHttp: true,
    index: false,
    port: 0,
    publicReads: { ratePerMinute: 0, cacheEntries: process.env.SCALE_CACHE === '1' ? 2000 : 0 },
  }).start()
  ready(Number(new URL(av.url).port))
} else if (kind === 'bare') {
  const db = new Database(path!)
  db.pragma('busy_timeout = 5000')
  const server = serve({ fetch: bareApp(db).fetch, port: 0, hostname: '127.0.0.1' }, (info) => ready(info.port))
  void server
} else if (kind === 'fixed') {
  const bodies = JSON.parse(readFileSync(path!, 'utf8')) as Record<string, string>
  const app = new Hono()
  app.get('/fixed/:label', (c) => c.body(bodies[c.req.param('label')] ?? '{}', 200, { 'Content-Type': 'application/json' }))
  serve({ fetch: app.fetch, port: 0, hostname: '127.0.0.1' }, (info) => ready(info.port))
} else {
  process.stderr.write('usage: node bench/scale/serve.ts system|bare <db> | fixed <bodies.json>\n')
  process.exit(2)
}
