/**
 * `GET /exchange/providers?model=`: the providers connected now, with the
 * key each announced. Public (provider records are public anyway). Clients
 * that seal themselves start here, and check every key against the AppView
 * before sealing to it (src/client/).
 */
import { Hono } from 'hono'
import { PROVIDERS_PATH } from '../../src/client/index.ts'
import type { Exchange } from './exchange.ts'

export function directoryRoutes(exchange: Exchange): Hono {
  const app = new Hono()
  app.get(PROVIDERS_PATH, (c) => {
    const model = c.req.query('model') || undefined
    const providers = exchange.gateway
      .connected(model)
      .filter((p) => p.record.body.active !== false)
      .map((p) => ({ did: p.did, encryptionPubKey: p.encryptionPubKey, models: p.models, ...(p.version ? { version: p.version } : {}), record: p.record.uri }))
    return c.json({ providers })
  })
  return app
}
