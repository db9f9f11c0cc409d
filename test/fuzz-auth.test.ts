/**
 * Authentication under attack, against the real PDS and console (sign-in in
 * Chromium): forged, truncated, checksum-broken, wrong-prefix, revoked,
 * deleted and expired API keys; tampered, expired and revoked session
 * cookies; replayed, cross-browser and garbage OAuth callbacks; and every
 * account-scoped route and method called by alice with bob's ids.
 *
 * Every unusable key must get the answer a random unknown key gets, byte for
 * byte (status, body, headers but Date), so nothing tells whether a key
 * exists, existed, or was revoked; every unusable cookie must be treated
 * exactly as no cookie at all.
 *
 * The seeded cases run in `npm test`; more of them with
 *   COCORE_FUZZ_CASES=2000 COCORE_FUZZ_SEED=7 npx vitest run test/fuzz-auth.test.ts
 */
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Browser, BrowserContext, Page } from 'playwright-core'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { AppView } from '../appview/index.ts'
import { generateKey, KEY_PREFIX, withChecksum } from '../console/api-keys.ts'
import { startConsole, type ConsoleService } from '../console/index.ts'
import { ConsoleSessions } from '../console/sessions.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { friend, providerRecord, putRecord } from '../src/dev/records.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { startAppView, tempDbPath } from './fixture/appview.ts'
import { approveOnPds, launchBrowser } from './fixture/browser.ts'
import { sessionCookie, signInWithBrowser, startTestConsole, testSecretKey } from './fixture/console.ts'
import { fuzzConfig, rng, type Rng } from './fixture/fuzz.ts'

const { seed, cases } = fuzzConfig(40)
const B62 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
const B64URL = `${B62}-_`

let net: LocalNetwork
let av: AppView
let svc: ConsoleService
let browser: Browser
let alice: LocalAccount
let bob: LocalAccount
let carol: LocalAccount
let market: LocalAccount
/** Console session cookies (`cocore_session=...`) from real sign-ins. */
let aliceCookie: string
let bobCookie: string

beforeAll(async () => {
  net = await LocalNetwork.create()
  ;[alice, bob, carol, market] = (await Promise.all(['alice.test', 'bob.test', 'carol.test', 'market.test'].map((h) => net.createAccount(h)))) as [LocalAccount, LocalAccount, LocalAccount, LocalAccount]
  av = await startAppView(net, tempDbPath(), { http: true })
  // An exchange with its ledger: the OpenAI API and the ledger methods are among the targets.
  svc = await startTestConsole(net, av.url, {
    index: av.consoleIndex(),
    exchangeDid: market.did,
    exchangeAccount: { pdsUrl: net.pdsUrl, identifier: market.handle, password: market.password },
    loginRatePerMinute: 10_000,
    // Every case comes from one address: its limits would turn the answers compared byte for byte into 429s
    // (test/api-key-ip-limit.test.ts tests those limits).
    apiKeyIpRatePerMinute: 1e9,
    apiKeyIpFailuresPerMinute: 1e9,
  })
  browser = await launchBrowser()
  aliceCookie = await sessionCookie(await signInWithBrowser(await browser.newContext(), svc.url, alice.handle, alice.password))
  bobCookie = await sessionCookie(await signInWithBrowser(await browser.newContext(), svc.url, bob.handle, bob.password))
}, 180_000)
afterAll(async () => {
  await browser?.close()
  await svc?.close()
  await av?.stop()
  await net?.close()
})

/** What a client can observe of an answer: status, every header but Date, and the body bytes. */
type Seen = { status: number; headers: [string, string][]; body: string }
async function seen(res: Response): Promise<Seen> {
  const headers = [...res.headers.entries()].filter(([k]) => k !== 'date').sort(([a], [b]) => a.localeCompare(b))
  return { status: res.status, headers, body: await res.text() }
}

type Target = { name: string; path: string; method?: 'POST'; body?: unknown }
/** Every route a key opens: XRPC (both mounts, a query, a procedure, the ledger) and the OpenAI API. */
const KEY_TARGETS: Target[] = [
  { name: 'xrpc listApiKeys', path: `/xrpc/${ids.AccountListApiKeys}` },
  { name: 'api/xrpc listApiKeys', path: `/api/xrpc/${ids.AccountListApiKeys}` },
  { name: 'xrpc revokeApiKey', path: `/xrpc/${ids.AccountRevokeApiKey}`, method: 'POST', body: { id: 'key_x' } },
  { name: 'xrpc getBalance', path: `/xrpc/${ids.OrgCocoreexchangeLedgerGetBalance}` },
  { name: 'xrpc listEntries', path: `/xrpc/${ids.OrgCocoreexchangeLedgerListEntries}` },
  { name: 'v1 private models', path: '/v1/private/models' },
  { name: 'v1 tier models', path: '/v1/fast/models' },
  { name: 'v1 chat completions', path: '/v1/chat/completions', method: 'POST', body: { model: 'builtin', messages: [{ role: 'user', content: 'hi' }] } },
]

const withAuth = (t: Target, authorization: string | null) =>
  fetch(`${svc.url}${t.path}`, {
    method: t.method ?? 'GET',
    headers: { ...(authorization === null ? {} : { authorization }), ...(t.body ? { 'content-type': 'application/json' } : {}) },
    body: t.body ? JSON.stringify(t.body) : undefined,
  })
const withKey = (t: Target, key: string) => withAuth(t, `Bearer ${key}`)

/** An XRPC call with a console session (and this console's Origin, as its pages send). */
async function xrpcAs(cookie: string, nsid: string, input?: unknown, query = '') {
  const res = await fetch(`${svc.url}/xrpc/${nsid}${query}`, {
    method: input === undefined ? 'GET' : 'POST',
    headers: { cookie, origin: svc.url, ...(input === undefined ? {} : { 'content-type': 'application/json' }) },
    body: input === undefined ? undefined : JSON.stringify(input),
  })
  return { status: res.status, body: (await res.json()) as any }
}
const xrpcKey = async (key: string, nsid: string, input?: unknown) => {
  const res = await withKey({ name: nsid, path: `/xrpc/${nsid}`, ...(input === undefined ? {} : { method: 'POST' as const, body: input }) }, key)
  return { status: res.status, body: (await res.json()) as any }
}
const createKey = async (cookie: string, input: Record<string, unknown>) => {
  const r = await xrpcAs(cookie, ids.AccountCreateApiKey, input)
  expect(r.status, JSON.stringify(r.body)).toBe(200)
  return r.body as { key: { id: string; expiresAt?: string }; secret: string }
}
/** A page of the console, as a browser form would send it. */
const page = (path: string, cookie: string | null, init: { method?: 'POST'; form?: Record<string, string> } = {}) =>
  fetch(`${svc.url}${path}`, {
    method: init.method ?? 'GET',
    redirect: 'manual',
    headers: { ...(cookie === null ? {} : { cookie }), origin: svc.url, ...(init.method ? { 'content-type': 'application/x-www-form-urlencoded' } : {}) },
    body: init.method ? new URLSearchParams(init.form ?? {}) : undefined,
  })

/** Replaces the character at `i` with a different one from `alphabet`. */
function flip(r: Rng, s: string, i: number, alphabet = B62): string {
  let c = s[i]!
  while (c === s[i]) c = r.pick([...alphabet])
  return s.slice(0, i) + c + s.slice(i + 1)
}

describe('API keys: every unusable key is answered like an unknown one', () => {
  let live: { key: { id: string }; secret: string }
  const invalid: { label: string; key: string }[] = []
  const headerOnly: { label: string; authorization: string }[] = []

  beforeAll(async () => {
    const all = ['read', 'inference', 'keys:manage']
    live = await createKey(aliceCookie, { name: 'live', scopes: all })
    const revoked = await createKey(aliceCookie, { name: 'revoked', scopes: all })
    const deleted = await createKey(aliceCookie, { name: 'deleted', scopes: all })
    // Keys do expire: made to expire a second from now, through the real API.
    const expiring = await createKey(aliceCookie, { name: 'expiring', scopes: all, expiresAt: new Date(Date.now() + 1000).toISOString() })
    expect(expiring.key.expiresAt).toBeDefined()
    for (const t of KEY_TARGETS) for (const k of [revoked, deleted, expiring]) expect((await withKey(t, k.secret)).status, `${t.name} before`).not.toBe(401)
    expect((await xrpcAs(aliceCookie, ids.AccountRevokeApiKey, { id: revoked.key.id })).body).toEqual({ revoked: true })
    expect((await xrpcAs(aliceCookie, ids.AccountDeleteApiKey, { id: deleted.key.id })).body).toEqual({ deleted: true })
    while (Date.now() <= Date.parse(expiring.key.expiresAt!)) await new Promise((r) => setTimeout(r, 100))

    const K = live.secret
    const body = K.slice(KEY_PREFIX.length, -6)
    const r = rng(seed)
    invalid.push({ label: 'revoked', key: revoked.secret }, { label: 'deleted', key: deleted.secret }, { label: 'expired', key: expiring.secret })
    // Every truncation of the live key, down to nothing but the prefix.
    for (let n = K.length - 1; n >= KEY_PREFIX.length; n--) invalid.push({ label: `truncated to ${n}`, key: K.slice(0, n) })
    for (const p of ['cocore-', 'COCORE_', 'cocor_', 'sk-', 'cocore__', '']) invalid.push({ label: `prefix ${JSON.stringify(p)}`, key: p + K.slice(KEY_PREFIX.length) })
    invalid.push({ label: 'one char longer', key: `${K}0` }, { label: 'lower-cased', key: K.toLowerCase() }, { label: 'upper-cased', key: K.toUpperCase() })
    for (let i = 0; i < cases; i++) {
      const at = r.int(K.length - KEY_PREFIX.length) + KEY_PREFIX.length
      invalid.push({ label: `case ${i}: char ${at} flipped (${at >= K.length - 6 ? 'checksum' : 'body'})`, key: flip(r, K, at) })
      const forgedBody = Array.from({ length: body.length }, () => r.pick([...B62])).join('')
      // Well-formed forgeries pass the checksum and reach the database lookup.
      invalid.push({ label: `case ${i}: forged, valid checksum`, key: withChecksum(forgedBody) })
      invalid.push({ label: `case ${i}: forged, random checksum`, key: KEY_PREFIX + forgedBody + Array.from({ length: 6 }, () => r.pick([...B62])).join('') })
      invalid.push({ label: `case ${i}: body swapped into the checksum`, key: withChecksum(flip(r, body, r.int(body.length))) })
      const junk = Array.from({ length: r.range(1, 200) }, () => String.fromCharCode(r.range(0x21, 0x7e))).join('')
      invalid.push({ label: `case ${i}: printable junk`, key: junk })
    }
    // Malformed Authorization headers: the same answer as a bad key.
    for (const a of ['Bearer', `bearer ${K.slice(0, -1)}x`, `Basic ${Buffer.from(`alice:${K}`).toString('base64')}`, `Bearer ${generateKey()} ${K}`, `Token ${K.slice(1)}`, `Bearer\t${generateKey()}`]) {
      headerOnly.push({ label: a.slice(0, 12), authorization: a })
    }
  }, 60_000)

  it(`the live key works on every target (seed ${seed})`, async () => {
    for (const t of KEY_TARGETS) {
      const res = await withKey(t, live.secret)
      // Past authentication and scopes (a completion without a provider may still fail on routing).
      expect([401, 403, 500], `${t.name}: ${res.status}`).not.toContain(res.status)
    }
  })

  it(`every unusable key gets the unknown key's answer, byte for byte, on XRPC and the OpenAI API (seed ${seed}, ${cases} cases)`, async () => {
    for (const t of KEY_TARGETS) {
      const reference = await seen(await withKey(t, generateKey()))
      expect(reference.status, t.name).toBe(401)
      for (const { label, key } of invalid) expect(await seen(await withKey(t, key)), `${t.name}, ${label}: ${JSON.stringify(key)} (seed ${seed})`).toEqual(reference)
      for (const { label, authorization } of headerOnly) expect(await seen(await withAuth(t, authorization)), `${t.name}, header ${label} (seed ${seed})`).toEqual(reference)
    }
    // None of them was taken for the live key: it still works, and only its own calls were counted against it.
    expect((await xrpcKey(live.secret, ids.AccountListApiKeys)).status).toBe(200)
    const usage = svc.db.$client.prepare('SELECT coalesce(sum(requests), 0) FROM usage_daily WHERE key_id = ?').pluck().get(live.key.id)
    expect(usage).toBe(KEY_TARGETS.length + 1)
  })
})

describe('session cookies: anything but a live session is no session', () => {
  let expiredCookie: string
  let revokedCookie: string

  beforeAll(async () => {
    // Two more real sign-ins of alice: one signs out (revoked), one runs out its time.
    const a = await signInWithBrowser(await browser.newContext(), svc.url, alice.handle, alice.password)
    revokedCookie = await sessionCookie(a)
    await a.getByRole('button', { name: 'Sign out', exact: true }).click()
    const b = await signInWithBrowser(await browser.newContext(), svc.url, alice.handle, alice.password)
    expiredCookie = await sessionCookie(b)
    // The 7-day lifetime cannot be waited out: the row's expiry is moved to the past.
    const newest = svc.db.$client.prepare('SELECT id FROM console_sessions WHERE did = ? ORDER BY created_at DESC LIMIT 1').pluck().get(alice.did) as string
    svc.db.$client.prepare('UPDATE console_sessions SET expires_at = ? WHERE id = ?').run(new Date(Date.now() - 1000).toISOString(), newest)
  }, 60_000)

  /** Each probe with the status a signed-out request gets (the sign-in page, a redirect to it, or 401). */
  const probes: { name: string; signedOut: number; send: (cookie: string | null) => Promise<Response> }[] = [
    { name: 'GET /', signedOut: 200, send: (c) => page('/', c) },
    { name: 'GET /keys', signedOut: 303, send: (c) => page('/keys', c) },
    { name: 'GET /sessions', signedOut: 303, send: (c) => page('/sessions', c) },
    { name: 'POST /keys', signedOut: 303, send: (c) => page('/keys', c, { method: 'POST', form: { name: 'x', scopes: 'read' } }) },
    { name: 'POST /account/export', signedOut: 303, send: (c) => page('/account/export', c, { method: 'POST' }) },
    { name: 'XRPC listApiKeys', signedOut: 401, send: (c) => fetch(`${svc.url}/xrpc/${ids.AccountListApiKeys}`, { headers: c === null ? {} : { cookie: c } }) },
    { name: 'XRPC getBalance', signedOut: 401, send: (c) => fetch(`${svc.url}/xrpc/${ids.OrgCocoreexchangeLedgerGetBalance}`, { headers: c === null ? {} : { cookie: c } }) },
  ]

  it(`tampered, truncated, foreign, empty, huge, expired and revoked cookies are treated as no cookie (seed ${seed}, ${cases} cases)`, async () => {
    const token = aliceCookie.slice('cocore_session='.length)
    const bobToken = bobCookie.slice('cocore_session='.length)
    const r = rng(seed + 1)
    const values: { label: string; cookie: string }[] = [
      { label: 'expired', cookie: expiredCookie },
      { label: 'revoked (signed out)', cookie: revokedCookie },
      { label: 'empty', cookie: 'cocore_session=' },
      { label: 'huge', cookie: `cocore_session=${token.repeat(150)}` },
      { label: 'name only', cookie: 'cocore_session' },
      { label: 'other name', cookie: `session=${token}` },
      { label: 'hash of the token as the value', cookie: `cocore_session=${Buffer.from(token).toString('hex')}` },
    ]
    for (let n = 0; n < token.length; n += 1 + r.int(4)) values.push({ label: `truncated to ${n}`, cookie: `cocore_session=${token.slice(0, n)}` })
    for (let i = 0; i < cases; i++) {
      values.push({ label: `case ${i}: alice's token, one char changed`, cookie: `cocore_session=${flip(r, token, r.int(token.length), B64URL)}` })
      values.push({ label: `case ${i}: bob's token, one char changed`, cookie: `cocore_session=${flip(r, bobToken, r.int(bobToken.length), B64URL)}` })
      const bits = Buffer.from(token, 'base64url')
      bits[r.int(bits.length)]! ^= 1 << r.int(8)
      values.push({ label: `case ${i}: one bit flipped`, cookie: `cocore_session=${bits.toString('base64url')}` })
      values.push({ label: `case ${i}: random token`, cookie: `cocore_session=${Buffer.from(r.bytes(32)).toString('base64url')}` })
      values.push({ label: `case ${i}: token with junk appended`, cookie: `cocore_session=${token}${Array.from({ length: r.range(1, 20) }, () => r.pick([...B64URL])).join('')}` })
    }
    for (const p of probes) {
      const reference = await seen(await p.send(null))
      expect(reference.status, p.name).toBe(p.signedOut)
      for (const { label, cookie } of values) expect(await seen(await p.send(cookie)), `${p.name}, ${label} (seed ${seed})`).toEqual(reference)
    }
    // The live cookies still work: the probes did not sign anyone out.
    expect(await (await page('/', aliceCookie)).text()).toContain('Signed in as alice.test')
    expect(await (await page('/', bobCookie)).text()).toContain('Signed in as bob.test')
  })
})

describe('session cookies in production', () => {
  it('only the __Host- cookie counts: the same token under the plain name (which a sibling host could set) is no session', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'cocore-fuzz-auth-prod-'))
    const prod = await startConsole({ port: 0, host: '127.0.0.1', dbPath: join(dataDir, 'console.sqlite'), dataDir, mode: 'production', publicUrl: 'https://console.example.net', secretKey: testSecretKey(), appviewUrl: 'https://appview.example.net' })
    try {
      const { token } = new ConsoleSessions(prod.db, Buffer.alloc(32)).create(alice.did, 'test', undefined)
      const list = (cookie: string | null) => fetch(`${prod.localUrl}/xrpc/${ids.AccountListApiKeys}`, { headers: cookie === null ? {} : { cookie } })
      expect((await list(`__Host-cocore_session=${token}`)).status).toBe(200)
      const none = await seen(await list(null))
      expect(none.status).toBe(401)
      for (const cookie of [`cocore_session=${token}`, `__host-cocore_session=${token}`, `__Secure-cocore_session=${token}`, `__Host-cocore_session=${token.slice(1)}`]) {
        expect(await seen(await list(cookie)), cookie).toEqual(none)
      }
    } finally {
      await prod.close()
    }
  })
})

describe('OAuth callbacks', () => {
  const callbackPath = `/oauth/callback`
  const sessionsOf = (did: string) => svc.db.$client.prepare('SELECT count(*) FROM console_sessions WHERE did = ?').pluck().get(did) as number
  const bindingOf = async (ctx: BrowserContext) => (await ctx.cookies()).find((c) => c.name === 'cocore_oauth_binding')?.value

  /** Starts a sign-in in `ctx` on the console's page; returns the page, at the PDS's authorization page. */
  async function start(ctx: BrowserContext, handle: string): Promise<Page> {
    const p = await ctx.newPage()
    await p.goto(svc.url)
    await p.locator('input[name=identifier]').fill(handle)
    await p.getByRole('button', { name: 'Sign in' }).click()
    await p.waitForURL((u) => !u.toString().startsWith(svc.url))
    return p
  }

  it('a callback URL already used signs nobody in, with or without the binding cookie put back', async () => {
    const ctx = await browser.newContext()
    const p = await start(ctx, carol.handle)
    const binding = await bindingOf(ctx)
    expect(binding).toBeDefined()
    let callback = ''
    p.on('request', (req) => {
      if (req.url().startsWith(`${svc.url}${callbackPath}`)) callback = req.url()
    })
    await approveOnPds(p, carol.password)
    await p.waitForURL((u) => u.toString() === `${svc.url}/`)
    expect(callback).toContain('code=')
    const before = sessionsOf(carol.did)
    expect(before).toBe(1)

    // Replayed in the same browser (the binding cookie was spent), then with it put back, then by a script holding it.
    await p.goto(callback)
    expect(await p.textContent('main')).toContain('Sign-in refused')
    await ctx.addCookies([{ name: 'cocore_oauth_binding', value: binding!, url: svc.url }])
    // The state was spent by the first callback: the binding has nothing left to match.
    await p.goto(callback)
    expect(await p.textContent('main')).toContain('Sign-in refused')
    const scripted = await fetch(callback, { redirect: 'manual', headers: { cookie: `cocore_oauth_binding=${binding}` } })
    expect(scripted.status).toBe(400)
    expect(await scripted.text()).toContain('Sign-in refused')
    expect(scripted.headers.get('set-cookie') ?? '').not.toContain('cocore_session=')
    expect(sessionsOf(carol.did)).toBe(before)
    await ctx.close()
  })

  it('a callback carrying a state another browser started is refused, even when this browser has a sign-in of its own in flight (login CSRF)', async () => {
    // The attacker (a script) starts a sign-in to their own account and keeps its binding cookie...
    const begun = await fetch(`${svc.url}/login`, { method: 'POST', redirect: 'manual', headers: { origin: svc.url, 'content-type': 'application/x-www-form-urlencoded' }, body: `identifier=${bob.handle}` })
    expect(begun.status).toBe(303)
    const attackerBinding = /cocore_oauth_binding=([^;]+)/.exec(begun.headers.get('set-cookie') ?? '')![1]!
    // ...the victim has a sign-in of their own in flight (their own binding cookie)...
    const victim = await browser.newContext()
    await start(victim, alice.handle)
    const victimBinding = await bindingOf(victim)
    expect(victimBinding).toBeDefined()
    expect(victimBinding).not.toBe(attackerBinding)
    // ...and is lured into completing the attacker's authorization.
    const lure = await victim.newPage()
    await lure.goto(begun.headers.get('location')!)
    const before = sessionsOf(bob.did)
    await approveOnPds(lure, bob.password)
    await lure.waitForURL((u) => u.toString().startsWith(svc.url))
    expect(await lure.textContent('main')).toContain('Sign-in refused')
    expect((await victim.cookies()).some((c) => c.name === 'cocore_session')).toBe(false)
    expect(sessionsOf(bob.did)).toBe(before)
    await victim.close()
  })

  it("another party's error link does not cancel a sign-in in flight; only the browser that started it can", async () => {
    const ctx = await browser.newContext()
    const p = await start(ctx, alice.handle)
    const state = svc.db.$client.prepare('SELECT key FROM oauth_states ORDER BY created_at DESC, rowid DESC LIMIT 1').pluck().get() as string
    // Someone without this browser's binding cookie sends the callback a cancellation for its state.
    const forged = await fetch(`${svc.url}${callbackPath}?${new URLSearchParams({ error: 'access_denied', state })}`, { redirect: 'manual' })
    expect(forged.status).toBe(400)
    expect(svc.db.$client.prepare('SELECT count(*) FROM oauth_states WHERE key = ?').pluck().get(state)).toBe(1)
    // The real sign-in still completes.
    await approveOnPds(p, alice.password)
    await p.waitForURL((u) => u.toString() === `${svc.url}/`)
    expect(await p.textContent('main')).toContain('Signed in as alice.test')
    await ctx.close()
  })

  it(`garbage state, code and iss are refused with a fixed page, nothing echoed, no session (seed ${seed}, ${cases} cases)`, async () => {
    const r = rng(seed + 2)
    const before = svc.db.$client.prepare('SELECT count(*) FROM console_sessions').pluck().get() as number
    const garbage = () => (r.chance(0.5) ? r.string(r.range(1, 80)) : Array.from({ length: r.range(1, 300) }, () => String.fromCharCode(r.range(0x21, 0x7e))).join(''))
    const answers: { query: string; status: number; body: string; setCookie: string }[] = []
    for (let i = 0; i < cases; i++) {
      const q = new URLSearchParams()
      for (const name of ['state', 'code', 'iss', 'error']) if (r.chance(name === 'error' ? 0.2 : 0.8)) q.set(name, garbage())
      const cookie = r.chance(0.5) ? `cocore_oauth_binding=${Buffer.from(r.bytes(32)).toString('base64url')}` : ''
      const res = await fetch(`${svc.url}${callbackPath}?${q}`, { redirect: 'manual', headers: cookie ? { cookie } : {} })
      answers.push({ query: q.toString(), status: res.status, body: await res.text(), setCookie: res.headers.get('set-cookie') ?? '' })
    }
    // A real state with its binding cookie, but a forged code or a foreign issuer: the PDS does not confirm it.
    for (const forge of ['code', 'iss'] as const) {
      const start = await fetch(`${svc.url}/login`, { method: 'POST', redirect: 'manual', headers: { origin: svc.url, 'content-type': 'application/x-www-form-urlencoded' }, body: `identifier=${alice.handle}` })
      expect(start.status).toBe(303)
      const binding = /cocore_oauth_binding=([^;]+)/.exec(start.headers.get('set-cookie') ?? '')![1]!
      const state = svc.db.$client.prepare('SELECT key FROM oauth_states ORDER BY created_at DESC, rowid DESC LIMIT 1').pluck().get() as string
      const q = new URLSearchParams({ state, code: forge === 'code' ? `cod-${Buffer.from(r.bytes(24)).toString('base64url')}` : 'x', iss: forge === 'iss' ? 'https://evil.example' : net.pdsUrl })
      const res = await fetch(`${svc.url}${callbackPath}?${q}`, { redirect: 'manual', headers: { cookie: `cocore_oauth_binding=${binding}` } })
      answers.push({ query: q.toString(), status: res.status, body: await res.text(), setCookie: res.headers.get('set-cookie') ?? '' })
      expect(answers.at(-1)!.body, forge).toContain('Sign-in failed')
    }
    for (const a of answers) {
      expect(a.status, a.query).toBe(400)
      expect(a.setCookie, a.query).not.toContain('cocore_session=')
      expect(a.body, a.query).toMatch(/Sign-in (refused|failed|cancelled)/)
      // Fixed wording: no parameter is reflected into the page.
      for (const v of new URLSearchParams(a.query).values()) if (v.length > 8) expect(a.body.includes(v), `${a.query} echoed`).toBe(false)
    }
    expect(svc.db.$client.prepare('SELECT count(*) FROM console_sessions').pluck().get()).toBe(before)
  })
})

describe("cross-account: alice's session and keys never reach bob's data", () => {
  it("alice cannot revoke, delete or use bob's keys, sessions, friends, machines, ledger or export, and bob's data is unchanged", async () => {
    // Bob's data: keys, a session, a friend record and a provider record on his PDS, his ledger.
    const bobKey = await createKey(bobCookie, { name: 'bob key', scopes: ['read', 'inference', 'keys:manage'] })
    const bobFriend = await putRecord(bob.agent, bob.did, friend(carol.did))
    const bobMachine = await putRecord(bob.agent, bob.did, providerRecord(P256Signer.generate()))
    const rkeyOf = (uri: string) => uri.split('/').pop()!
    const bobSession = svc.db.$client.prepare('SELECT id FROM console_sessions WHERE did = ? ORDER BY created_at LIMIT 1').pluck().get(bob.did) as string
    const aliceKey = await createKey(aliceCookie, { name: 'alice key', scopes: ['read', 'inference', 'keys:manage'] })
    const bobState = async () => ({
      // Without lastUsedAt: bob's own key is used below, on purpose.
      keys: ((await xrpcAs(bobCookie, ids.AccountListApiKeys)).body.keys as { lastUsedAt?: string }[]).map(({ lastUsedAt: _, ...k }) => k),
      sessions: svc.db.$client.prepare('SELECT id, expires_at FROM console_sessions WHERE did = ? ORDER BY id').all(bob.did),
      friend: (await bob.agent.com.atproto.repo.getRecord({ repo: bob.did, collection: ids.AccountFriend, rkey: rkeyOf(bobFriend.uri) })).data.cid,
      machine: (await bob.agent.com.atproto.repo.getRecord({ repo: bob.did, collection: ids.ComputeProvider, rkey: rkeyOf(bobMachine.uri) })).data.cid,
      balance: (await xrpcAs(bobCookie, ids.OrgCocoreexchangeLedgerGetBalance)).body,
      entries: (await xrpcAs(bobCookie, ids.OrgCocoreexchangeLedgerListEntries)).body,
      audit: svc.db.$client.prepare('SELECT count(*) FROM audit_log WHERE did = ?').pluck().get(bob.did),
    })
    const before = await bobState()
    expect(before.balance.balance).toBeGreaterThan(0)

    // Keys, from alice's pages, her XRPC session and her API key: answered as for an id that does not exist.
    for (const action of ['revoke', 'delete']) {
      const res = await page(`/keys/${bobKey.key.id}/${action}`, aliceCookie, { method: 'POST' })
      expect(res.status).toBe(303)
    }
    for (const nsid of [ids.AccountRevokeApiKey, ids.AccountDeleteApiKey]) {
      const field = nsid === ids.AccountRevokeApiKey ? 'revoked' : 'deleted'
      expect((await xrpcAs(aliceCookie, nsid, { id: bobKey.key.id })).body).toEqual({ [field]: false })
      expect((await xrpcKey(aliceKey.secret, nsid, { id: bobKey.key.id })).body).toEqual({ [field]: false })
      expect((await xrpcKey(aliceKey.secret, nsid, { id: 'key_doesnotexist' })).body).toEqual({ [field]: false })
      // And the other way round: bob's key on alice's key.
      expect((await xrpcKey(bobKey.secret, nsid, { id: aliceKey.key.id })).body).toEqual({ [field]: false })
    }
    const aliceList = (await xrpcKey(aliceKey.secret, ids.AccountListApiKeys)).body.keys as { id: string }[]
    expect(aliceList.some((k) => k.id === bobKey.key.id)).toBe(false)
    expect(((await xrpcKey(bobKey.secret, ids.AccountListApiKeys)).body.keys as { id: string }[]).some((k) => k.id === aliceKey.key.id)).toBe(false)

    // Sessions: bob's id is "not yours", exactly as an unknown id.
    const revokeBob = await page(`/sessions/${bobSession}/revoke`, aliceCookie, { method: 'POST' })
    const revokeNone = await page(`/sessions/doesnotexist/revoke`, aliceCookie, { method: 'POST' })
    expect(await seen(revokeBob)).toEqual(await seen(revokeNone))
    expect(revokeBob.status).toBe(404)

    // Friends and machines: alice's routes act on alice's repo only; bob's rkeys name nothing there.
    expect((await page(`/friends/${rkeyOf(bobFriend.uri)}/remove`, aliceCookie, { method: 'POST' })).status).toBe(303)
    const machine = await page(`/machines/${rkeyOf(bobMachine.uri)}`, aliceCookie, { method: 'POST', form: { active: '1', desiredModels: 'x' } })
    expect(machine.status).toBe(404)
    expect(await machine.text()).toContain('No such machine')

    // Ledger: no parameter picks the account; a did in the query is refused or ignored, never obeyed.
    for (const nsid of [ids.OrgCocoreexchangeLedgerGetBalance, ids.OrgCocoreexchangeLedgerListEntries]) {
      const r = await xrpcAs(aliceCookie, nsid, undefined, `?did=${encodeURIComponent(bob.did)}`)
      expect(JSON.stringify(r.body)).not.toContain(bob.did)
      if (r.status === 200 && nsid === ids.OrgCocoreexchangeLedgerGetBalance) expect(r.body.did).toBe(alice.did)
    }
    expect((await xrpcKey(aliceKey.secret, ids.OrgCocoreexchangeLedgerGetBalance)).body.did).toBe(alice.did)
    expect((await xrpcKey(bobKey.secret, ids.OrgCocoreexchangeLedgerGetBalance)).body.did).toBe(bob.did)

    // Export: alice's own data only.
    const exported = await (await page('/account/export', aliceCookie, { method: 'POST' })).text()
    expect(JSON.parse(exported).did).toBe(alice.did)
    for (const secretish of [bob.did, bobKey.key.id, bobSession, bobKey.secret]) expect(exported).not.toContain(secretish)

    // Bob's data is exactly as it was, and his key and session still work.
    expect(await bobState()).toEqual(before)
    expect((await xrpcKey(bobKey.secret, ids.AccountListApiKeys)).status).toBe(200)
  })

  it('wipe reports are reached only by their unguessable id: forged, truncated and altered ids all get the same 404', async () => {
    // Carol (signed in through the browser) wipes her account; the report URL is the capability.
    const carolCookie = await sessionCookie(await signInWithBrowser(await browser.newContext(), svc.url, carol.handle, carol.password))
    const start = await page('/account/wipe', carolCookie, { method: 'POST', form: { confirm: `wipe ${carol.handle}` } })
    expect(start.status).toBe(303)
    const id = start.headers.get('location')!.replace('/wipe/', '')
    expect(Buffer.from(id, 'base64url').length).toBeGreaterThanOrEqual(16)
    expect((await page(`/wipe/${id}`, null)).status).toBe(200)
    const r = rng(seed + 3)
    const reference = await seen(await page(`/wipe/${Buffer.from(r.bytes(16)).toString('base64url')}`, aliceCookie))
    expect(reference.status).toBe(404)
    const forged = [id.slice(0, -1), `${id}A`, id.toUpperCase(), id.toLowerCase(), `${id}/`.slice(0, -1) + '%00']
    for (let i = 0; i < cases; i++) forged.push(flip(r, id, r.int(id.length), B64URL), Buffer.from(r.bytes(16)).toString('base64url'))
    for (const f of forged) if (f !== id) expect(await seen(await page(`/wipe/${f}`, aliceCookie)), `${f} (seed ${seed})`).toEqual(reference)
  })
})
