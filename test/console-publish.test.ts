/**
 * Publishing on the user's behalf, in a real browser: profile, friends and a
 * machine's owner intent are written to the user's own PDS (validated first),
 * shown at once, and indexed by the AppView exactly once. API keys from the
 * keys page: shown once, usable, revoked.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Browser, Page } from 'playwright-core'
import type { LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import { providerRecord, putRecord } from '../src/dev/records.ts'
import type { ConsoleService } from '../console/index.ts'
import { signInWithBrowser } from './fixture/console.ts'
import type { AppView } from '../appview/index.ts'
import { screenshot } from './fixture/browser.ts'
import { startStack, type Stack } from './fixture/stack.ts'
import { waitFor } from './fixture/wait.ts'

let av: AppView
let svc: ConsoleService
let browser: Browser
let page: Page
let alice: LocalAccount
let bob: LocalAccount

let stack: Stack

beforeAll(async () => {
  const started = await startStack({ accounts: [['alice.test', 'alice-pass'], ['bob.test', 'bob-pass']] })
  stack = started
  ;({ av, svc, browser, accounts: [alice, bob] } = started)
  page = await signInWithBrowser(await browser.newContext(), svc.url, 'alice.test', 'alice-pass')
})
afterAll(() => stack?.close())

const indexed = (uri: string) => av.db.$client.prepare('SELECT body FROM records WHERE uri = ?').pluck().all(uri) as string[]
const main = async () => (await page.textContent('main'))!

describe('publishing from the console', () => {
  it('writes the profile to the PDS, shows it at once, and the AppView indexes it once', async () => {
    await page.goto(`${svc.url}/profile`)
    await page.locator('input[name=displayName]').fill('Alice from the console')
    await page.locator('textarea[name=bio]').fill('Runs jobs.')
    await page.getByRole('button', { name: 'Save profile' }).click()
    expect(await main()).toContain('Saved to your PDS.')
    expect(await page.inputValue('input[name=displayName]')).toBe('Alice from the console')
    await screenshot(page, 'console-profile')
    const onPds = await alice.agent.com.atproto.repo.getRecord({ repo: alice.did, collection: ids.AccountProfile, rkey: 'self' })
    expect((onPds.data.value as { displayName: string }).displayName).toBe('Alice from the console')
    const uri = `at://${alice.did}/${ids.AccountProfile}/self`
    await waitFor(() => indexed(uri).some((b) => b.includes('Alice from the console')), 'profile indexed')
    expect(indexed(uri)).toHaveLength(1)
  })

  it('refuses an invalid record and names the field', async () => {
    await page.goto(`${svc.url}/profile`)
    await page.locator('input[name=displayName]').fill('x'.repeat(300))
    await page.getByRole('button', { name: 'Save profile' }).click()
    expect(await main()).toMatch(/Not saved: .*displayName/)
    const onPds = await alice.agent.com.atproto.repo.getRecord({ repo: alice.did, collection: ids.AccountProfile, rkey: 'self' })
    expect((onPds.data.value as { displayName: string }).displayName).toBe('Alice from the console')
  })

  it('adds and removes a friend by handle', async () => {
    await page.goto(`${svc.url}/friends`)
    await page.locator('input[name=subject]').fill('bob.test')
    await page.getByRole('button', { name: 'Add friend' }).click()
    expect(await main()).toContain(bob.did)
    await waitFor(() => av.db.$client.prepare('SELECT count(*) FROM records WHERE did = ? AND subject_did = ?').pluck().get(alice.did, bob.did) === 1, 'friend indexed')
    await page.getByRole('button', { name: 'Remove' }).first().click()
    expect(await main()).not.toContain(bob.did)
    await waitFor(() => av.db.$client.prepare('SELECT count(*) FROM records WHERE did = ? AND subject_did = ?').pluck().get(alice.did, bob.did) === 0, 'friend removal indexed')
  })

  it("sets a machine's owner intent and keeps every field the provider agent wrote", async () => {
    // The provider agent (acting with alice's own credentials) published her machine.
    const agentFields = { ...providerRecord(P256Signer.generate()), binaryVersion: '1.2.3', serving: true, region: 'eu' }
    const machine = await putRecord(alice.agent, alice.did, agentFields)
    await page.goto(`${svc.url}/machines`)
    await page.locator('input[name=desiredModels]').fill('llama-3-8b, mistral-7b')
    await page.locator('input[name=shareLocation]').check()
    await page.locator('select[name=proBono]').selectOption('direct')
    await page.getByRole('button', { name: /Save test box/ }).click()
    expect(await main()).toContain('Saved to your PDS.')
    await screenshot(page, 'console-machines')
    const rec = (await alice.agent.com.atproto.repo.getRecord({ repo: alice.did, collection: ids.ComputeProvider, rkey: machine.uri.split('/').pop()! })).data.value as Record<string, unknown>
    expect(rec).toMatchObject({ desiredModels: ['llama-3-8b', 'mistral-7b'], shareLocation: true, active: true, proBono: { mode: 'direct' } })
    const { $type: _t, ...kept } = agentFields
    for (const [k, v] of Object.entries(kept)) expect(rec[k], k).toEqual(v)
  })

  it('creates an API key shown once, which works until it is revoked', async () => {
    await page.goto(`${svc.url}/keys`)
    await page.locator('input[name=name]').fill('my script')
    await page.locator('input[name=scopes][value="keys:manage"]').check()
    await page.getByRole('button', { name: 'Create key' }).click()
    const secret = (await page.textContent('#new-key'))!.trim()
    expect(secret).toMatch(/^cocore_/)
    await screenshot(page, 'console-keys')
    await page.goto(`${svc.url}/keys`)
    expect(await page.content()).not.toContain(secret)
    const listWith = (k: string) => fetch(`${svc.url}/xrpc/${ids.AccountListApiKeys}`, { headers: { authorization: `Bearer ${k}` } })
    const ok = await listWith(secret)
    expect(ok.status).toBe(200)
    expect(((await ok.json()) as { keys: { name: string }[] }).keys.map((k) => k.name)).toContain('my script')
    await page.getByRole('button', { name: 'Revoke' }).first().click()
    expect((await listWith(secret)).status).toBe(401)
  })
})
