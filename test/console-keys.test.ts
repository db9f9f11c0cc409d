/**
 * API keys over XRPC on the console: created with a console session or a
 * key, shown once, stored only hashed, scoped, rate-limited, counted, and
 * refused identically when unknown, revoked, expired or malformed.
 */
import { generateKeyPairSync, createHash } from 'node:crypto'
import { existsSync, mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { NodeSavedSession } from '@atproto/oauth-client-node'
import { AppView } from '../appview/index.ts'
import type { ConsoleService } from '../console/index.ts'
import { sessionStore } from '../console/oauth/stores.ts'
import { parseKeyring, SecretBox } from '../src/crypto/secretbox.ts'
import { startTestConsole, testSecretKey } from './fixture/console.ts'
import { tempDbPath } from './fixture/appview.ts'
import { ConsoleSessions } from '../console/sessions.ts'
import { generateKey, hashKey, wellFormed } from '../console/api-keys.ts'
import { ids } from '../src/lexicon/generated/ids.ts'

const ALICE = 'did:plc:aliceaaaaaaaaaaaaaaaaaaa'
const BOB = 'did:plc:bobbbbbbbbbbbbbbbbbbbbbb'
let svc: ConsoleService
let av: AppView
let dbPath: string
const secretKey = testSecretKey()
let aliceCookie: string
let bobCookie: string

beforeAll(async () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'cocore-keys-'))
  dbPath = join(dataDir, 'console.sqlite')
  // An AppView index in the same process (no firehose): the export lists the account's rows in it.
  av = new AppView({ dbPath: tempDbPath(), sources: [], plcUrl: 'http://127.0.0.1:1', index: false })
  svc = await startTestConsole(null, 'http://127.0.0.1:1', { dbPath, dataDir, secretKey, index: av.consoleIndex(), apiKeyRatePerMinute: 30, loginRatePerMinute: 5 })
  // Console sessions as a sign-in would create them (the sign-in itself is tested in a browser).
  const sessions = new ConsoleSessions(svc.db, Buffer.alloc(32))
  aliceCookie = `cocore_session=${sessions.create(ALICE, 'test', undefined).token}`
  bobCookie = `cocore_session=${sessions.create(BOB, 'test', undefined).token}`
})
afterAll(async () => {
  await svc?.close()
  await av?.stop()
})

type Auth = { cookie: string } | { key: string } | Record<string, never>
async function call(nsid: string, auth: Auth, input?: unknown, opts: { base?: string; headers?: Record<string, string>; body?: string } = {}) {
  const headers: Record<string, string> = { ...opts.headers }
  if ('cookie' in auth) {
    headers.cookie = auth.cookie
    headers.origin ??= svc.url
  }
  if ('key' in auth) headers.authorization = `Bearer ${auth.key}`
  const init: RequestInit = { headers }
  if (input !== undefined || opts.body !== undefined) {
    init.method = 'POST'
    headers['content-type'] ??= 'application/json'
    init.body = opts.body ?? JSON.stringify(input)
  }
  const res = await fetch(`${svc.url}${opts.base ?? ''}/xrpc/${nsid}`, init)
  return { status: res.status, headers: res.headers, body: (await res.json()) as any }
}
const create = (auth: Auth, input: Record<string, unknown>) => call(ids.AccountCreateApiKey, auth, input)

describe('API keys', () => {
  it('have a recognisable format with a checksum', () => {
    const k = generateKey()
    expect(k).toMatch(/^cocore_[0-9A-Za-z]{49}$/)
    expect(wellFormed(k)).toBe(true)
    const typo = k.slice(0, 20) + (k[20] === 'a' ? 'b' : 'a') + k.slice(21)
    expect(wellFormed(typo)).toBe(false)
  })

  it('are shown once, stored only as a SHA-256, and listed without secrets', async () => {
    const res = await create({ cookie: aliceCookie }, { name: 'laptop', scopes: ['read', 'keys:manage'] })
    expect(res.status).toBe(200)
    const { key, secret } = res.body
    expect(wellFormed(secret)).toBe(true)
    expect(key.scopes).toEqual(['keys:manage', 'read'])
    expect(secret.startsWith(key.prefix)).toBe(true)
    const list = await call(ids.AccountListApiKeys, { cookie: aliceCookie })
    expect(JSON.stringify(list.body)).not.toContain(secret)
    expect(JSON.stringify(list.body)).not.toContain(hashKey(secret))
    expect(list.body.keys.map((k: { id: string }) => k.id)).toContain(key.id)
    const raw = Buffer.concat([dbPath, `${dbPath}-wal`].filter(existsSync).map((f) => readFileSync(f)))
    expect(raw.includes(Buffer.from(secret))).toBe(false)
    expect(raw.includes(Buffer.from(hashKey(secret)))).toBe(true)
  })

  it('authenticate with Bearer on /xrpc and /api/xrpc, within their scopes, and record lastUsedAt and daily usage', async () => {
    const { secret, key } = (await create({ cookie: aliceCookie }, { name: 'ci', scopes: ['keys:manage', 'read'] })).body
    for (const base of ['', '/api']) {
      const list = await call(ids.AccountListApiKeys, { key: secret }, undefined, { base })
      expect(list.status).toBe(200)
      expect(list.body.keys.find((k: { id: string }) => k.id === key.id).lastUsedAt).toBeDefined()
    }
    // A key without keys:manage may not manage keys, nor mint a stronger key.
    const weak = (await create({ key: secret }, { name: 'weak', scopes: ['read'] })).body.secret
    const denied = await call(ids.AccountListApiKeys, { key: weak })
    expect(denied.status).toBe(403)
    expect(denied.body.error).toBe('InsufficientScope')
    const escalate = await create({ key: secret }, { name: 'more', scopes: ['inference'] })
    expect(escalate.status).toBe(400)

    const usage = svc.db.$client.prepare('SELECT key_id, requests FROM usage_daily WHERE did = ? ORDER BY key_id').all(ALICE) as { key_id: string; requests: number }[]
    expect(usage.find((u) => u.key_id === key.id)?.requests).toBe(4)
    expect(usage.find((u) => u.key_id === '')!.requests).toBeGreaterThanOrEqual(5)
  })

  it('refuse unknown, revoked, expired, checksum-broken and malformed keys with the same 401', async () => {
    const live = (await create({ cookie: aliceCookie }, { name: 'soon revoked', scopes: ['keys:manage'] })).body
    const expiring = (await create({ cookie: aliceCookie }, { name: 'expiring', scopes: ['keys:manage'], expiresAt: new Date(Date.now() + 1500).toISOString() })).body.secret
    expect((await call(ids.AccountListApiKeys, { key: expiring })).status).toBe(200)
    expect((await call(ids.AccountRevokeApiKey, { cookie: aliceCookie }, { id: live.key.id })).body).toEqual({ revoked: true })
    await new Promise((r) => setTimeout(r, 1600))
    const broken = live.secret.slice(0, -1) + (live.secret.endsWith('A') ? 'B' : 'A')
    const answers = []
    for (const k of [generateKey(), live.secret, expiring, broken, 'cocore_short', 'not-a-key-at-all']) {
      const r = await call(ids.AccountListApiKeys, { key: k })
      answers.push({ status: r.status, body: r.body })
    }
    for (const a of answers) expect(a).toEqual({ status: 401, body: { error: 'AuthRequired', message: 'Invalid API key' } })
    expect((await call(ids.AccountListApiKeys, {})).status).toBe(401)
    const auditActions = svc.db.$client.prepare('SELECT action FROM audit_log WHERE did = ?').pluck().all(ALICE)
    expect(auditActions).toEqual(expect.arrayContaining(['api-key-create', 'api-key-revoke']))
  })

  it('keep accounts apart: bob cannot list, revoke or delete alice\'s keys', async () => {
    const alices = (await create({ cookie: aliceCookie }, { name: 'mine', scopes: ['keys:manage'] })).body
    const bobList = await call(ids.AccountListApiKeys, { cookie: bobCookie })
    expect(bobList.body.keys.some((k: { did: string }) => k.did === ALICE)).toBe(false)
    expect((await call(ids.AccountRevokeApiKey, { cookie: bobCookie }, { id: alices.key.id })).body).toEqual({ revoked: false })
    expect((await call(ids.AccountDeleteApiKey, { cookie: bobCookie }, { id: alices.key.id })).body).toEqual({ deleted: false })
    // Same answer as for an id that does not exist at all.
    expect((await call(ids.AccountRevokeApiKey, { cookie: bobCookie }, { id: 'key_nope' })).body).toEqual({ revoked: false })
    expect((await call(ids.AccountListApiKeys, { key: alices.secret })).status).toBe(200)
    // Alice deletes it: the row is gone.
    expect((await call(ids.AccountDeleteApiKey, { cookie: aliceCookie }, { id: alices.key.id })).body).toEqual({ deleted: true })
    expect(svc.db.$client.prepare('SELECT count(*) FROM api_keys WHERE id = ?').pluck().get(alices.key.id)).toBe(0)
    expect((await call(ids.AccountListApiKeys, { key: alices.secret })).status).toBe(401)
  })

  it('rate-limits per key with 429 and Retry-After', async () => {
    const { secret } = (await create({ cookie: aliceCookie }, { name: 'busy', scopes: ['keys:manage'] })).body
    const statuses: number[] = []
    let retryAfter: string | null = null
    for (let i = 0; i < 32; i++) {
      const r = await call(ids.AccountListApiKeys, { key: secret })
      statuses.push(r.status)
      if (r.status === 429) retryAfter = r.headers.get('retry-after')
    }
    expect(statuses.filter((s) => s === 200).length).toBe(30)
    expect(statuses.at(-1)).toBe(429)
    expect(Number(retryAfter)).toBeGreaterThanOrEqual(1)
  })

  it('refuses cross-site cookie calls and bad input with XRPC errors', async () => {
    const crossSite = await call(ids.AccountCreateApiKey, { cookie: aliceCookie }, { name: 'x' }, { headers: { origin: 'http://evil.example' } })
    expect(crossSite.status).toBe(403)
    expect(crossSite.body.error).toBe('CrossSiteRequest')
    const form = await call(ids.AccountCreateApiKey, { cookie: aliceCookie }, undefined, { body: 'name=x', headers: { 'content-type': 'application/x-www-form-urlencoded' } })
    expect(form.status).toBe(400)
    expect((await call(ids.AccountCreateApiKey, { cookie: aliceCookie }, undefined, { body: '{"name":' })).status).toBe(400)
    expect((await create({ cookie: aliceCookie }, { name: 'x'.repeat(101) })).body.error).toBe('InvalidRequest')
    expect((await create({ cookie: aliceCookie }, { name: 'x', scopes: ['root'] })).status).toBe(400)
    expect((await create({ cookie: aliceCookie }, { name: 'x', expiresAt: '2001-01-01T00:00:00Z' })).status).toBe(400)
    const huge = await call(ids.AccountCreateApiKey, { cookie: aliceCookie }, undefined, { body: JSON.stringify({ name: 'x', pad: 'y'.repeat(300_000) }) })
    expect(huge.status).toBe(413)
    const query = await fetch(`${svc.url}/xrpc/${ids.AccountCreateApiKey}`, { headers: { cookie: aliceCookie, origin: svc.url } })
    expect(query.status).toBe(400)
    expect(((await query.json()) as { message: string }).message).toContain('use POST')
  })
})

describe('export, activity and accounts kept apart', () => {
  const page = (path: string, cookie: string, init: RequestInit = {}) =>
    fetch(`${svc.url}${path}`, { ...init, redirect: 'manual', headers: { cookie, origin: svc.url, ...(init.headers as Record<string, string>) } })

  it('exports everything held about the account as JSON, without secrets or hashes', async () => {
    const { secret } = (await create({ cookie: aliceCookie }, { name: 'exported', scopes: ['read'] })).body
    expect((await page('/account/export', aliceCookie)).status).toBe(404)
    const res = await page('/account/export', aliceCookie, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' } })
    expect(res.status).toBe(200)
    expect(res.headers.get('content-disposition')).toContain('attachment')
    const text = await res.text()
    const data = JSON.parse(text)
    expect(data.did).toBe(ALICE)
    expect(data.apiKeys.map((k: { name: string }) => k.name)).toContain('exported')
    expect(data.sessions.length).toBeGreaterThan(0)
    expect(data.activity.map((a: { action: string }) => a.action)).toContain('api-key-create')
    expect(data.usage.length).toBeGreaterThan(0)
    expect(data.howToGetYourRepo).toContain('com.atproto.sync.getRepo')
    expect(text).not.toContain(secret)
    expect(text).not.toContain(hashKey(secret))
    expect(text).not.toMatch(/token_?hash/i)
    expect(text).not.toContain(aliceCookie.split('=')[1])
    const bobs = JSON.parse(await (await page('/account/export', bobCookie, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' } })).text())
    expect(JSON.stringify(bobs)).not.toContain(ALICE)
  })

  it('exports all of the activity log, the OAuth session without its secrets, and the account\'s index rows', async () => {
    const CAROL = 'did:plc:carolccccccccccccccccccc'
    const carolCookie = `cocore_session=${new ConsoleSessions(svc.db, Buffer.alloc(32)).create(CAROL, 'test', undefined).token}`
    // More activity than any one page (and than the 10,000 the export used to stop at).
    const add = svc.db.$client.prepare("INSERT INTO audit_log (did, action, detail, ip_hash, at) VALUES (?, 'sign-in', ?, NULL, ?)")
    svc.db.$client.transaction(() => {
      for (let i = 0; i < 10_050; i++) add.run(CAROL, JSON.stringify({ n: i }), new Date(Date.UTC(2025, 0, 1, 0, 0, i)).toISOString())
    })()
    // Her OAuth session, as the OAuth client stores it (sealed): tokens and the DPoP private key.
    const dpopJwk = { ...generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' }), kid: 'dpop-1' }
    const saved = {
      dpopJwk,
      authMethod: { method: 'none' },
      tokenSet: { iss: 'https://pds.example', sub: CAROL, aud: 'https://pds.example', scope: 'atproto repo:dev.cocore.account.profile', access_token: 'AT-secret-access', refresh_token: 'RT-secret-refresh', token_type: 'DPoP', expires_at: '2030-01-01T00:00:00.000Z' },
    } as unknown as NodeSavedSession
    await sessionStore(svc.db, new SecretBox(parseKeyring(secretKey))).set(CAROL, saved)
    // Her rows in the AppView index besides records: hosting status and sync state.
    av.db.$client.prepare("INSERT INTO accounts (did, handle, active, status) VALUES (?, 'carol.test', 1, NULL)").run(CAROL)
    av.db.$client.prepare("INSERT INTO repos (did, rev, needs_resync, head, head_data) VALUES (?, '3lrev', 0, '3lhead', 'bafyhead')").run(CAROL)

    const res = await page('/account/export', carolCookie, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' } })
    const text = await res.text()
    const data = JSON.parse(text)
    // Every entry, newest first: the export's own entry, then all 10,050.
    expect(data.activity).toHaveLength(10_051)
    expect(data.activity[0].action).toBe('export')
    expect(data.activity.at(-1).detail).toBe(JSON.stringify({ n: 0 }))
    expect(new Set(data.activity.map((a: { id: number }) => a.id)).size).toBe(10_051)

    // RFC 7638: SHA-256 of the required public members, in lexicographic order.
    const thumbprint = createHash('sha256').update(JSON.stringify({ crv: dpopJwk.crv, kty: dpopJwk.kty, x: dpopJwk.x, y: dpopJwk.y })).digest('base64url')
    const updatedAt = svc.db.$client.prepare('SELECT updated_at FROM oauth_sessions WHERE did = ?').pluck().get(CAROL)
    expect(data.oauthSession).toEqual({
      scope: 'atproto repo:dev.cocore.account.profile',
      issuer: 'https://pds.example',
      pds: 'https://pds.example',
      authMethod: 'none',
      accessTokenExpiresAt: '2030-01-01T00:00:00.000Z',
      dpopKeyThumbprint: thumbprint,
      updatedAt,
    })
    for (const secret of ['AT-secret-access', 'RT-secret-refresh', dpopJwk.d!]) expect(text).not.toContain(secret)
    expect(data.indexedAccount).toEqual({ account: { handle: 'carol.test', active: true, status: null }, repo: { rev: '3lrev', needsResync: false, head: '3lhead', headData: 'bafyhead' } })
    // Alice has no OAuth session nor index rows here: said so, not left out.
    const alices = JSON.parse(await (await page('/account/export', aliceCookie, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' } })).text())
    expect(alices.oauthSession).toBeNull()
    expect(alices.indexedAccount).toEqual({ account: null, repo: null })
  })

  it("bob cannot revoke alice's sessions nor read her activity", async () => {
    const aliceSession = svc.db.$client.prepare('SELECT id FROM console_sessions WHERE did = ? LIMIT 1').pluck().get(ALICE) as string
    const res = await page(`/sessions/${aliceSession}/revoke`, bobCookie, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' } })
    expect(res.status).toBe(404)
    expect(svc.db.$client.prepare('SELECT count(*) FROM console_sessions WHERE id = ?').pluck().get(aliceSession)).toBe(1)
    const bobAudit = await (await page('/audit', bobCookie)).text()
    expect(bobAudit).not.toContain('exported')
    expect(await (await page('/sessions', bobCookie)).text()).not.toContain(aliceSession)
  })

  it('serves every page with a same-origin-only CSP', async () => {
    for (const path of ['/', '/sessions', '/audit', '/keys', '/account', '/oauth/client-metadata.json', '/wipe/nope']) {
      const res = await page(path, aliceCookie)
      expect(res.headers.get('content-security-policy'), path).toContain("default-src 'self'")
      expect(res.headers.get('content-security-policy'), path).toMatch(/(^|; )form-action 'self'(;|$)/)
      // Plain http in dev: no HSTS, which would pin the host to https.
      expect(res.headers.get('strict-transport-security'), path).toBeNull()
      expect(await res.text(), path).not.toMatch(/(src|href)="https?:\/\//)
    }
  })
})

describe('hardening', () => {
  it('a key-made key expires no later than the key that made it', async () => {
    const parentExpiry = new Date(Date.now() + 3600_000).toISOString()
    const parent = (await create({ cookie: aliceCookie }, { name: 'parent', scopes: ['keys:manage', 'read'], expiresAt: parentExpiry })).body
    const child = await create({ key: parent.secret }, { name: 'child', scopes: ['read'] })
    expect(child.status).toBe(200)
    expect(child.body.key.expiresAt).toBe(parent.key.expiresAt)
    const later = await create({ key: parent.secret }, { name: 'later', scopes: ['read'], expiresAt: new Date(Date.now() + 7200_000).toISOString() })
    expect(later.status).toBe(400)
  })

  it('refuses a state change without this origin, whatever the content type', async () => {
    const { key } = (await create({ cookie: aliceCookie }, { name: 'target', scopes: ['read'] })).body
    for (const type of ['application/json', 'application/octet-stream', 'application/x-www-form-urlencoded']) {
      const res = await fetch(`${svc.url}/keys/${key.id}/revoke`, { method: 'POST', redirect: 'manual', headers: { cookie: aliceCookie, 'content-type': type }, body: '{}' })
      expect(res.status, type).toBe(403)
    }
    const list = await call(ids.AccountListApiKeys, { cookie: aliceCookie })
    expect(list.body.keys.find((k: { id: string }) => k.id === key.id).revokedAt).toBeUndefined()
  })

  it('refuses oversized forms, and limits sign-in attempts per address', async () => {
    const big = await fetch(`${svc.url}/login`, { method: 'POST', headers: { origin: svc.url, 'content-type': 'application/x-www-form-urlencoded' }, body: `identifier=${'x'.repeat(100_000)}` })
    expect(big.status).toBe(413)
    const statuses: number[] = []
    for (let i = 0; i < 7; i++) {
      const r = await fetch(`${svc.url}/login`, { method: 'POST', headers: { origin: svc.url, 'content-type': 'application/x-www-form-urlencoded' }, body: 'identifier=nobody.invalid' })
      statuses.push(r.status)
    }
    expect(statuses).toContain(429)
    expect(statuses.filter((s) => s !== 429).every((s) => s === 400)).toBe(true)
  })
})
