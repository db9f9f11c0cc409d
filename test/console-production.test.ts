/**
 * The console in production mode: a confidential OAuth client
 * (private_key_jwt, ES256) whose metadata and public keys it serves, with its
 * private key created once, mode 0600, and never published.
 */
import { randomBytes } from 'node:crypto'
import { mkdtempSync, readFileSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { startConsole, type ConsoleService } from '../console/index.ts'

let svc: ConsoleService
const dataDir = mkdtempSync(join(tmpdir(), 'cocore-prod-console-'))
const opts = () => ({ port: 0, host: '127.0.0.1', dbPath: join(dataDir, 'console.sqlite'), dataDir, mode: 'production' as const, publicUrl: 'https://console.example.net', secretKey: `k:${randomBytes(32).toString('base64')}`, appviewUrl: 'https://appview.example.net' })

beforeAll(async () => {
  svc = await startConsole(opts())
})
afterAll(async () => {
  await svc?.close()
})

it('serves confidential-client metadata: private_key_jwt, ES256, DPoP, the narrow scope', async () => {
  const meta = (await (await fetch(`${svc.localUrl}/oauth/client-metadata.json`)).json()) as Record<string, unknown>
  expect(meta).toMatchObject({
    client_id: 'https://console.example.net/oauth/client-metadata.json',
    redirect_uris: ['https://console.example.net/oauth/callback'],
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: 'ES256',
    dpop_bound_access_tokens: true,
    jwks_uri: 'https://console.example.net/oauth/jwks.json',
  })
  const scope = String(meta.scope).split(' ')
  expect(scope[0]).toBe('atproto')
  expect(scope).toContain('repo:dev.cocore.account.profile')
  expect(scope).toContain('repo:dev.cocore.compute.receipt?action=delete')
  expect(scope.some((s) => s.startsWith('transition:'))).toBe(false)
})

it('publishes only the public half of its ES256 key, created once with mode 0600 and reused', async () => {
  const keyFile = join(dataDir, 'oauth-client-key.json')
  expect(statSync(keyFile).mode & 0o777).toBe(0o600)
  const priv = JSON.parse(readFileSync(keyFile, 'utf8')) as { d: string; kid: string }
  const jwks = (await (await fetch(`${svc.localUrl}/oauth/jwks.json`)).json()) as { keys: Record<string, string>[] }
  expect(jwks.keys).toHaveLength(1)
  expect(jwks.keys[0]!.kid).toBe(priv.kid)
  expect(jwks.keys[0]!.d).toBeUndefined()
  expect(JSON.stringify(jwks)).not.toContain(priv.d)
  // A restart keeps the same key (clients' PDSes may have it cached).
  await svc.close()
  svc = await startConsole(opts())
  const again = (await (await fetch(`${svc.localUrl}/oauth/jwks.json`)).json()) as { keys: { kid: string }[] }
  expect(again.keys[0]!.kid).toBe(priv.kid)
})

it('uses a __Host- cookie with Secure, HttpOnly and SameSite=Lax', async () => {
  // Sign-out clears the session cookie with the same attributes it is set with.
  const res = await fetch(`${svc.localUrl}/logout`, { method: 'POST', redirect: 'manual', headers: { origin: 'https://console.example.net', 'content-type': 'application/x-www-form-urlencoded' } })
  expect(res.status).toBe(303)
  const cookie = res.headers.get('set-cookie')!
  expect(cookie).toMatch(/^__Host-cocore_session=/)
  for (const attr of ['Path=/', 'HttpOnly', 'Secure', 'SameSite=Lax']) expect(cookie).toContain(attr)
  expect(cookie).not.toMatch(/Domain=/i)
  // The CSRF check uses the public origin: the same form from anywhere else is refused.
  const forged = await fetch(`${svc.localUrl}/logout`, { method: 'POST', redirect: 'manual', headers: { origin: 'https://evil.example', 'content-type': 'application/x-www-form-urlencoded' } })
  expect(forged.status).toBe(403)
})

it('sends HSTS on every response, and a CSP that lets forms post to this origin only', async () => {
  const origin = 'https://console.example.net'
  const form = { 'content-type': 'application/x-www-form-urlencoded' }
  const requests: [string, RequestInit][] = [
    ['/', {}],
    ['/no-such-page', {}],
    ['/keys', {}],
    ['/oauth/jwks.json', {}],
    ['/health', {}],
    [`/xrpc/dev.cocore.account.listApiKeys`, {}],
    ['/xrpc/no.such.method', {}],
    ['/v1/no-such-endpoint', {}],
    ['/login/continue?to=https%3A%2F%2Fevil.example&mac=x', {}],
    ['/logout', { method: 'POST', headers: { origin: 'https://evil.example', ...form } }],
    ['/login', { method: 'POST', headers: { origin, ...form }, body: 'identifier=' }],
  ]
  for (const [path, init] of requests) {
    const res = await fetch(`${svc.localUrl}${path}`, { ...init, redirect: 'manual' })
    expect(res.headers.get('strict-transport-security'), path).toBe('max-age=31536000; includeSubDomains')
    const csp = res.headers.get('content-security-policy') ?? ''
    expect(csp, path).toMatch(/(^|; )form-action 'self'(;|$)/)
  }
})
