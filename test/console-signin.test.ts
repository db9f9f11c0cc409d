/**
 * Console sign-in end to end, in a real browser against the real local PDS:
 * OAuth with DPoP, the state bound to the browser, sessions and sign-out,
 * CSRF, and secrets stored only encrypted (checked on the raw database bytes).
 */
import { randomBytes } from 'node:crypto'
import { mkdtempSync, readFileSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Browser } from 'playwright-core'
import type { LocalAccount, LocalNetwork } from '../src/dev/network.ts'
import { parseKeyring, SecretBox } from '../src/crypto/secretbox.ts'
import type { ConsoleService } from '../console/index.ts'
import { answerSignIn, signInWithBrowser } from './fixture/console.ts'
import { approveOnPds, screenshot } from './fixture/browser.ts'
import { startStack, type Stack } from './fixture/stack.ts'

let net: LocalNetwork
let console_: ConsoleService
let browser: Browser
let alice: LocalAccount
const secretKey = `test1:${randomBytes(32).toString('base64')}`
const box = new SecretBox(parseKeyring(secretKey))
const dataDir = mkdtempSync(join(tmpdir(), 'cocore-console-'))
const dbPath = join(dataDir, 'console.sqlite')

let stack: Stack

beforeAll(async () => {
  const started = await startStack({ accounts: [['alice.test', 'alice-pass']], console: () => ({ dbPath, dataDir, secretKey }) })
  stack = started
  ;({ net, svc: console_, browser, accounts: [alice] } = started)
})
afterAll(() => stack?.close())

async function signIn(handle: string, password: string) {
  const context = await browser.newContext()
  return { context, page: await signInWithBrowser(context, console_.url, handle, password) }
}

const dbBytes = () => Buffer.concat([dbPath, `${dbPath}-wal`].filter(existsSync).map((f) => readFileSync(f)))

describe('console sign-in', () => {
  it('signs in through the PDS with OAuth, and keeps only sealed secrets and hashed tokens', async () => {
    const { context, page } = await signIn('alice.test', 'alice-pass')
    expect(await page.textContent('main')).toContain('Signed in as alice.test')
    await screenshot(page, 'console-dashboard')

    const cookie = (await context.cookies()).find((c) => c.name === 'cocore_session')!
    expect(cookie).toBeDefined()
    expect(cookie.httpOnly).toBe(true)
    expect(cookie.sameSite).toBe('Lax')
    expect(cookie.expires - Date.now() / 1000).toBeGreaterThan(6.9 * 86400)
    expect(Buffer.from(cookie.value, 'base64url')).toHaveLength(32)

    // The OAuth session holds DPoP-bound tokens and the DPoP private key: all of it only sealed.
    const sealed = console_.db.$client.prepare('SELECT sealed FROM oauth_sessions WHERE did = ?').pluck().get(alice.did) as string
    expect(sealed.startsWith('v1.test1.')).toBe(true)
    const session = JSON.parse(box.open(sealed, `oauth_sessions:${alice.did}`)) as { tokenSet: { access_token: string; refresh_token?: string; scope: string }; dpopJwk: { d: string } }
    expect(session.tokenSet.scope).toContain('repo:dev.cocore.account.profile')
    expect(session.tokenSet.scope).not.toContain('transition:generic')
    const secrets = { cookie: cookie.value, access: session.tokenSet.access_token, refresh: session.tokenSet.refresh_token!, dpopPrivate: session.dpopJwk.d }
    const raw = dbBytes()
    for (const [name, value] of Object.entries(secrets)) {
      expect(value?.length, name).toBeGreaterThan(20)
      expect(raw.includes(Buffer.from(value)), `${name} found in the raw database`).toBe(false)
    }
    // The IP is only ever a keyed hash.
    expect(raw.includes(Buffer.from('127.0.0.1'))).toBe(false)
    await context.close()
  })

  it('lists sessions with user agent and hashed IP, revokes one, and signs out keeping the OAuth session', async () => {
    const first = await signIn('alice.test', 'alice-pass')
    const second = await signIn('alice.test', 'alice-pass')
    await second.page.goto(`${console_.url}/sessions`)
    const rows = second.page.locator('table tr').filter({ has: second.page.getByRole('button', { name: 'Revoke' }) })
    expect(await rows.count()).toBeGreaterThanOrEqual(2)
    expect(await second.page.textContent('table')).toContain('HeadlessChrome')
    await screenshot(second.page, 'console-sessions')
    // Revoke the first browser's session from the second.
    const firstRow = rows.filter({ hasNotText: '(this one)' }).first()
    await firstRow.getByRole('button', { name: 'Revoke' }).click()
    await first.page.goto(console_.url)
    expect(await first.page.textContent('main')).toContain('Sign in with your AT Protocol identity')

    // Sign out: this console session ends, the OAuth session (which API keys use) stays.
    await second.page.getByRole('button', { name: 'Sign out', exact: true }).click()
    expect(await second.page.textContent('main')).toContain('Sign in with your AT Protocol identity')
    expect(console_.db.$client.prepare('SELECT count(*) FROM oauth_sessions WHERE did = ?').pluck().get(alice.did)).toBe(1)
    const actions = (console_.db.$client.prepare('SELECT action FROM audit_log WHERE did = ? ORDER BY id').pluck().all(alice.did) as string[])
    expect(actions).toEqual(expect.arrayContaining(['sign-in', 'session-revoke', 'sign-out']))
    await first.context.close()
    await second.context.close()
  })

  it('refuses a cross-site POST (CSRF), and "sign out everywhere" revokes the OAuth session', async () => {
    const { context, page } = await signIn('alice.test', 'alice-pass')
    const cookie = (await context.cookies()).find((c) => c.name === 'cocore_session')!
    const forged = await fetch(`${console_.url}/logout-everywhere`, { method: 'POST', headers: { cookie: `cocore_session=${cookie.value}`, origin: 'http://evil.example', 'content-type': 'application/x-www-form-urlencoded' }, redirect: 'manual' })
    expect(forged.status).toBe(403)
    const noOrigin = await fetch(`${console_.url}/logout-everywhere`, { method: 'POST', headers: { cookie: `cocore_session=${cookie.value}`, 'content-type': 'application/x-www-form-urlencoded' }, redirect: 'manual' })
    expect(noOrigin.status).toBe(403)
    await page.reload()
    expect(await page.textContent('main')).toContain('Signed in as alice.test')

    await page.getByRole('button', { name: 'Sign out everywhere' }).click()
    expect(await page.textContent('main')).toContain('Sign in with your AT Protocol identity')
    expect(console_.db.$client.prepare('SELECT count(*) FROM oauth_sessions WHERE did = ?').pluck().get(alice.did)).toBe(0)
    expect(console_.db.$client.prepare('SELECT count(*) FROM console_sessions WHERE did = ?').pluck().get(alice.did)).toBe(0)
    await context.close()
  })

  it('refuses a sign-in completed in another browser than the one that started it', async () => {
    // Browser A (here: a script) starts the sign-in and gets the PDS authorization URL...
    const start = await fetch(`${console_.url}/login`, { method: 'POST', headers: { origin: console_.url, 'content-type': 'application/x-www-form-urlencoded' }, body: 'identifier=alice.test', redirect: 'manual' })
    expect(start.status).toBe(303)
    const authorizeUrl = start.headers.get('location')!
    // ...and lures browser B into completing it: B has no binding cookie, so B is not signed in.
    const context = await browser.newContext()
    const page = await context.newPage()
    await page.goto(authorizeUrl)
    await approveOnPds(page, 'alice-pass')
    await page.waitForURL((u) => u.toString().startsWith(console_.url))
    expect(await page.textContent('main')).toContain('Sign-in refused')
    expect((await context.cookies()).some((c) => c.name === 'cocore_session')).toBe(false)
    await context.close()
  })

  it('explains a denied consent, an unknown handle and an unreachable PDS without a stack trace', async () => {
    const context = await browser.newContext()
    const page = await context.newPage()
    await answerSignIn(page, console_.url, 'alice.test', 'alice-pass', 'deny')
    expect(await page.textContent('main')).toContain('Sign-in cancelled')
    await screenshot(page, 'console-consent-denied')

    await page.goto(console_.url)
    await page.locator('input[name=identifier]').fill('nobody.test')
    await page.getByRole('button', { name: 'Sign in' }).click()
    expect(await page.textContent('main')).toContain('Could not find an AT Protocol account or PDS for "nobody.test"')

    await page.locator('input[name=identifier]').fill('http://127.0.0.1:9')
    await page.getByRole('button', { name: 'Sign in' }).click()
    const text = (await page.textContent('main'))!
    expect(text).toMatch(/Could not (reach|find)/)
    expect(text).not.toMatch(/at .*\.(ts|js):\d+/)
    await screenshot(page, 'console-sign-in-error')
    await context.close()
  })

  it('signs in with a DID, and with the address of a PDS', async () => {
    for (const identifier of [alice.did, net.pdsUrl]) {
      const context = await browser.newContext()
      const page = await context.newPage()
      await page.goto(console_.url)
      await page.locator('input[name=identifier]').fill(identifier)
      await page.getByRole('button', { name: 'Sign in' }).click()
      await page.waitForURL((u) => !u.toString().startsWith(console_.url))
      if (identifier === net.pdsUrl) {
        // Only the server is known: the PDS asks who is signing in.
        await page.getByRole('button', { name: 'Sign in' }).click()
        await page.getByRole('textbox', { name: /username/i }).fill('alice.test')
      }
      await approveOnPds(page, 'alice-pass')
      await page.waitForURL((u) => u.toString() === `${console_.url}/`)
      expect(await page.textContent('main'), identifier).toContain('Signed in as alice.test')
      await context.close()
    }
  })

  it('refreshes tokens under a lock: concurrent refreshes of one session all succeed', async () => {
    // Refresh tokens are single use: without the lock, the second refresh would present a spent token.
    const before = JSON.parse(box.open(console_.db.$client.prepare('SELECT sealed FROM oauth_sessions WHERE did = ?').pluck().get(alice.did) as string, `oauth_sessions:${alice.did}`))
    const sessions = await Promise.all([1, 2, 3].map(() => console_.oauth.restore(alice.did, true)))
    expect(sessions.map((s) => s.did)).toEqual([alice.did, alice.did, alice.did])
    const after = JSON.parse(box.open(console_.db.$client.prepare('SELECT sealed FROM oauth_sessions WHERE did = ?').pluck().get(alice.did) as string, `oauth_sessions:${alice.did}`))
    expect(after.tokenSet.refresh_token).not.toBe(before.tokenSet.refresh_token)
    // The refreshed session still writes to the PDS.
    const res = await (await console_.publisher.agent(alice.did)).com.atproto.repo.describeRepo({ repo: alice.did })
    expect(res.data.did).toBe(alice.did)
  })

  it('serves every page with a same-origin-only Content-Security-Policy and no other origin referenced', async () => {
    const res = await fetch(console_.url)
    expect(res.headers.get('content-security-policy')).toContain("default-src 'self'")
    const body = await res.text()
    expect(body).not.toMatch(/(src|href)="https?:\/\//)
  })
})
