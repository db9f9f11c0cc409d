/**
 * The console (Hono). Until the console issue lands this is a placeholder
 * that says where everything is; it loads nothing from other origins.
 */
import type { Server } from 'node:http'
import { serve } from '@hono/node-server'
import { Hono } from 'hono'
import { html } from 'hono/html'
import { consoleLogger as log } from '../src/logger.ts'

export interface ConsoleOpts {
  port: number
  host: string
  appviewUrl: string
  /** Shown on the page in dev mode only. */
  demoAccounts?: { handle: string; password: string; role: string }[]
}

export function createConsoleApp(opts: ConsoleOpts): Hono {
  const app = new Hono()
  app.use(async (c, next) => {
    await next()
    // Nothing from other origins, no framing.
    c.header('Content-Security-Policy', "default-src 'self'; frame-ancestors 'none'")
    c.header('X-Content-Type-Options', 'nosniff')
  })
  app.get('/', (c) =>
    c.html(html`<!doctype html>
      <html lang="en">
        <head><meta charset="utf-8" /><title>cocore console</title></head>
        <body>
          <h1>cocore console</h1>
          <p>Sign-in with your AT Protocol identity is coming with the console release. The AppView is live:</p>
          <ul>
            <li><a href="${opts.appviewUrl}/xrpc/dev.cocore.compute.listProviders">providers</a></li>
            <li><a href="${opts.appviewUrl}/xrpc/dev.cocore.account.listAccounts">accounts</a></li>
            <li><a href="${opts.appviewUrl}/health">AppView health</a></li>
          </ul>
          ${opts.demoAccounts?.length
            ? html`<h2>Demo accounts (local network)</h2>
                <ul>${opts.demoAccounts.map((a) => html`<li>${a.handle} (${a.role}), password <code>${a.password}</code></li>`)}</ul>`
            : ''}
        </body>
      </html>`),
  )
  app.get('/health', (c) => c.json({ status: 'ok' }))
  return app
}

export async function startConsole(opts: ConsoleOpts): Promise<{ url: string; close: () => Promise<void> }> {
  const app = createConsoleApp(opts)
  let url = ''
  const server = await new Promise<Server>((resolve) => {
    const s = serve({ fetch: app.fetch, port: opts.port, hostname: opts.host }, (info) => {
      url = `http://${opts.host}:${info.port}`
      resolve(s as Server)
    })
  })
  log.info('console listening', { url })
  return {
    url,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections()
        server.close(() => resolve())
      }),
  }
}
