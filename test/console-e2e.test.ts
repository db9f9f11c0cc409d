/**
 * The console as a person uses it, in one run of a real browser against the
 * console, the AppView and the local PDS: sign in, make an API key and use it,
 * revoke it, publish a profile and see it in the AppView, sign out, sign in
 * again, and wipe everything.
 */
import { afterAll, beforeAll, expect, it } from 'vitest'
import type { Browser } from 'playwright-core'
import type { LocalNetwork } from '../src/dev/network.ts'
import { ids, NSID_PREFIX } from '../src/lexicon/generated/ids.ts'
import { friend, putRecords } from '../src/dev/records.ts'
import type { ConsoleService } from '../console/index.ts'
import { signInWithBrowser } from './fixture/console.ts'
import type { AppView } from '../appview/index.ts'
import { screenshot } from './fixture/browser.ts'
import { startStack, type Stack } from './fixture/stack.ts'
import { waitFor } from './fixture/wait.ts'

let net: LocalNetwork
let av: AppView
let svc: ConsoleService
let browser: Browser

let stack: Stack

beforeAll(async () => {
  stack = await startStack({ console: (_, av) => ({ index: av.consoleIndex() }) })
  ;({ net, av, svc, browser } = stack)
})
afterAll(() => stack?.close())


it('sign in, API key, profile in the AppView, sign out, wipe', async () => {
  const alice = await net.createAccount('alice.test', 'alice-pass')
  await putRecords(alice.agent, alice.did, Array.from({ length: 20 }, () => friend(alice.did)))
  const context = await browser.newContext()
  const page = await signInWithBrowser(context, svc.url, 'alice.test', 'alice-pass')
  expect(await page.textContent('main')).toContain('Signed in as alice.test')
  await screenshot(page, 'e2e-2-dashboard')

  // An API key, shown once, used on XRPC, then revoked.
  await page.goto(`${svc.url}/keys`)
  await page.locator('input[name=name]').fill('e2e')
  await page.locator('input[name=scopes][value="keys:manage"]').check()
  await page.getByRole('button', { name: 'Create key' }).click()
  const secret = (await page.textContent('#new-key'))!.trim()
  await screenshot(page, 'e2e-3-key-created')
  const useKey = () => fetch(`${svc.url}/api/xrpc/${ids.AccountListApiKeys}`, { headers: { authorization: `Bearer ${secret}` } })
  expect((await useKey()).status).toBe(200)
  await page.getByRole('button', { name: 'Revoke' }).first().click()
  expect((await useKey()).status).toBe(401)

  // A profile, published to the PDS and seen through the AppView.
  await page.goto(`${svc.url}/profile`)
  await page.locator('input[name=displayName]').fill('Alice E2E')
  await page.getByRole('button', { name: 'Save profile' }).click()
  await waitFor(async () => {
    const r = await fetch(`${av.url}/xrpc/${ids.AccountGetProfile}?did=${alice.did}`)
    return r.ok && ((await r.json()) as { profile: { displayName?: string } }).profile.displayName === 'Alice E2E'
  }, 'profile visible in the AppView')

  // Sign out, then back in.
  await page.getByRole('button', { name: 'Sign out', exact: true }).click()
  expect(await page.textContent('main')).toContain('Sign in with your AT Protocol identity')
  await screenshot(page, 'e2e-1-sign-in')
  const again = await signInWithBrowser(context, svc.url, 'alice.test', 'alice-pass')
  await page.close()

  // Wipe.
  await again.goto(`${svc.url}/account`)
  await again.locator('input[name=confirm]').fill('wipe alice.test')
  await again.getByRole('button', { name: 'Wipe all my data' }).click()
  await waitFor(async () => (await again.textContent('#wipe-status'))?.trim() === 'done', 'wipe done', 60_000)
  await screenshot(again, 'e2e-4-wiped')
  const desc = await net.net.pds.getAgent().com.atproto.repo.describeRepo({ repo: alice.did })
  for (const c of desc.data.collections.filter((x) => x.startsWith(NSID_PREFIX))) {
    expect((await net.net.pds.getAgent().com.atproto.repo.listRecords({ repo: alice.did, collection: c })).data.records).toHaveLength(0)
  }
  await waitFor(() => av.db.$client.prepare('SELECT count(*) FROM records WHERE did = ?').pluck().get(alice.did) === 0, 'index empty')
  expect((await fetch(`${av.url}/xrpc/${ids.AccountGetProfile}?did=${alice.did}`)).status).toBe(404)
  // The wipe ended every session: the console shows the sign-in page again.
  await again.goto(svc.url)
  expect(await again.textContent('main')).toContain('Sign in with your AT Protocol identity')
})
