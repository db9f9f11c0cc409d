/**
 * `npm start` as a newcomer runs it: the whole stack boots on loopback, the
 * demo provider registers with the exchange, a demo account signs in through
 * the PDS and chats in the browser (the reply comes from the demo provider's
 * built-in engine), and Ctrl-C shuts everything down cleanly.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Browser } from 'playwright-core'
import { afterAll, expect, it } from 'vitest'
import type { StackInfo } from '../src/dev/stack.ts'
import { launchBrowser } from './fixture/browser.ts'
import { signInWithBrowser } from './fixture/console.ts'
import { waitFor } from './fixture/wait.ts'
import { freePort } from './fixture/ports.ts'

let child: ChildProcess | undefined
let browser: Browser | undefined

afterAll(async () => {
  await browser?.close()
  if (child && child.exitCode === null) child.kill('SIGKILL')
})


it('boots the stack with a demo provider a signed-in user can chat with, and stops cleanly on SIGINT', async () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'cocore-start-'))
  const [plc, pds, appview, consolePort] = [await freePort(), await freePort(), await freePort(), await freePort()]
  let out = ''
  child = spawn(process.execPath, ['scripts/start.ts'], {
    env: { ...process.env, COCORE_DATA_DIR: dataDir, COCORE_PLC_PORT: String(plc), COCORE_PDS_PORT: String(pds), COCORE_APPVIEW_PORT: String(appview), COCORE_CONSOLE_PORT: String(consolePort), COCORE_LOG_LEVEL: 'warn' },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  child.stdout!.on('data', (d) => (out += d))
  child.stderr!.on('data', (d) => (out += d))
  await waitFor(() => out.includes('Ctrl-C stops everything') || child!.exitCode !== null, 'npm start ready', 90_000)
  expect(child.exitCode, out).toBeNull()
  const stack = JSON.parse(readFileSync(join(dataDir, 'dev', 'stack.json'), 'utf8')) as StackInfo
  expect(stack.accounts.map((a) => a.handle)).toEqual(['alice.test', 'bob.test', 'rig.test', 'market.test'])
  expect(out).toContain(stack.consoleUrl)

  // The demo provider is connected, with the key its published record carries.
  const { providers } = (await (await fetch(`${stack.consoleUrl}/exchange/providers?model=builtin`)).json()) as { providers: { did: string; encryptionPubKey: string }[] }
  const rig = stack.accounts.find((a) => a.handle === 'rig.test')!
  expect(providers.map((p) => p.did)).toEqual([rig.did])

  browser = await launchBrowser()
  const page = await signInWithBrowser(browser, stack.consoleUrl, 'alice.test', 'password')
  await page.goto(`${stack.consoleUrl}/chat`)
  await page.locator('select[name=model] option[value=builtin]').waitFor({ state: 'attached' })
  await page.locator('textarea[name=prompt]').fill('hello from a newcomer')
  await page.getByRole('button', { name: 'Send' }).click()
  await page.locator('#chat[data-state=done]').waitFor({ timeout: 20_000 })
  expect(await page.locator('p.msg.assistant').first().textContent()).toMatch(/^You said: hello from a newcomer\. \w+/)

  child.kill('SIGINT')
  const code = await new Promise<number | null>((resolve) => child!.once('exit', (c) => resolve(c)))
  expect(code).toBe(0)
  expect(existsSync(join(dataDir, 'dev', 'stack.json'))).toBe(false)
}, 150_000)
