/**
 * "Wipe all my data" against the real PDS: over a thousand records across
 * collections, the PDS going away in the middle, and the console process
 * killed in the middle; every time the job finishes, nothing of ours is left
 * on the PDS, in the index or in the console's tables, and the report says
 * what was removed and what is kept.
 */
import { spawn } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import Database from 'better-sqlite3'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Browser } from 'playwright-core'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import { attestationRecord, authorizationRecord, friend, jobRecord, profile, providerRecord, putRecord, putRecords } from '../src/dev/records.ts'
import { startConsole, type ConsoleService } from '../console/index.ts'
import type { AppView } from '../appview/index.ts'
import { cocoreCollections, listAllRecords, startAppView, tempDbPath } from './fixture/appview.ts'
import { launchBrowser, screenshot } from './fixture/browser.ts'
import { answerSignIn, consoleOpts as testConsoleOpts, sessionCookie, signInWithBrowser, testSecretKey } from './fixture/console.ts'
import { waitFor } from './fixture/wait.ts'
import { freePort } from './fixture/ports.ts'

let net: LocalNetwork
let av: AppView
let browser: Browser
const secretKey = testSecretKey()
const retry = { firstMs: 100, maxMs: 400, giveUpAfterMs: 120_000, attemptMs: 3_000 }

beforeAll(async () => {
  net = await LocalNetwork.create()
  av = await startAppView(net, tempDbPath(), { http: true })
  browser = await launchBrowser()
})
afterAll(async () => {
  await browser?.close()
  await av?.stop()
  await net?.close()
})


const consoleOpts = (dataDir: string, port = 0) => testConsoleOpts(net, av.url, { dataDir, port, secretKey, wipeRetry: retry })

/** Signs in through the PDS in the browser; returns the console session cookie. */
async function signIn(consoleUrl: string, handle: string, password: string): Promise<string> {
  const context = await browser.newContext()
  const cookie = await sessionCookie(await signInWithBrowser(context, consoleUrl, handle, password))
  await context.close()
  return cookie
}

/** A repo with records in many collections: 1,000+ friends plus one of most other kinds. */
async function populate(acct: LocalAccount, friends: LocalAccount[], n: number): Promise<number> {
  const signer = P256Signer.generate()
  await putRecord(acct.agent, acct.did, profile('to be wiped'), 'self')
  await putRecord(acct.agent, acct.did, providerRecord(signer))
  await putRecord(acct.agent, acct.did, attestationRecord(signer))
  const auth = await putRecord(acct.agent, acct.did, authorizationRecord(friends[0]!.did))
  await putRecords(acct.agent, acct.did, [jobRecord(auth), jobRecord(auth)])
  await putRecords(acct.agent, acct.did, Array.from({ length: n }, (_, i) => friend(friends[i % friends.length]!.did)))
  return n + 6
}

async function pdsCocoreCount(did: string): Promise<number> {
  let n = 0
  for (const collection of await cocoreCollections(net, did)) n += (await listAllRecords(net, did, collection)).length
  return n
}

const startWipe = (consoleUrl: string, cookie: string, confirm: string) =>
  fetch(`${consoleUrl}/account/wipe`, { method: 'POST', redirect: 'manual', headers: { cookie, origin: consoleUrl, 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams({ confirm }) })

function consoleRows(dbPath: string, did: string): Record<string, number> {
  const db = new Database(dbPath, { readonly: true })
  try {
    const out: Record<string, number> = {}
    for (const t of ['api_keys', 'console_sessions', 'usage_daily', 'audit_log', 'oauth_sessions']) out[t] = db.prepare(`SELECT count(*) FROM ${t} WHERE did = ?`).pluck().get(did) as number
    // The one activity entry left is the record that the wipe ran.
    if (out.audit_log) expect(db.prepare('SELECT action FROM audit_log WHERE did = ?').pluck().all(did)).toEqual(['wipe-end'])
    return out
  } finally {
    db.close()
  }
}

describe('wipe all my data', () => {
  it('removes 1,000+ records from the PDS and everything held here, with a report, after a typed confirmation', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'cocore-wipe-'))
    const svc = await startConsole({ ...consoleOpts(dataDir), index: av.consoleIndex() })
    const amy = await net.createAccount('amy.test', 'amy-pass')
    const ben = await net.createAccount('ben.test', 'ben-pass')
    const total = await populate(amy, [ben], 1_050)
    // A record about amy on someone else's repo: not hers to delete.
    const bensFriend = await putRecord(ben.agent, ben.did, friend(amy.did))
    await waitFor(() => av.db.$client.prepare('SELECT count(*) FROM records WHERE did = ?').pluck().get(amy.did) === total, 'amy indexed', 60_000)

    const context = await browser.newContext()
    const page = await signInWithBrowser(context, svc.url, 'amy.test', 'amy-pass')
    // Some rows the wipe must remove: an API key (with usage) and the audit trail.
    await page.goto(`${svc.url}/keys`)
    await page.locator('input[name=name]').fill('k')
    await page.getByRole('button', { name: 'Create key' }).click()
    const secret = (await page.textContent('#new-key'))!.trim()

    await page.goto(`${svc.url}/account`)
    await screenshot(page, 'console-your-data')
    await page.locator('input[name=confirm]').fill('wipe something else')
    await page.getByRole('button', { name: 'Wipe all my data' }).click()
    expect(await page.textContent('main')).toContain('To confirm, type exactly: wipe amy.test')
    expect(await pdsCocoreCount(amy.did)).toBe(total)

    await page.locator('input[name=confirm]').fill('wipe amy.test')
    await page.getByRole('button', { name: 'Wipe all my data' }).click()
    await waitFor(async () => (await page.textContent('#wipe-status'))?.trim() === 'done', 'wipe done', 120_000)
    const report = (await page.textContent('main'))!
    await screenshot(page, 'console-wipe-report')
    expect(report).toContain('Your data is wiped')
    expect(report).toContain(`${total} records deleted from your PDS.`)
    expect(report).toContain('oauthSessions: 1')
    expect(report).toContain("Records about you in other people's repos")
    for (const c of [ids.AccountFriend, ids.ComputeJob, ids.ComputeProvider, ids.AccountProfile]) expect(report).toContain(c)

    expect(await pdsCocoreCount(amy.did)).toBe(0)
    await waitFor(() => av.db.$client.prepare('SELECT count(*) FROM records WHERE did = ?').pluck().get(amy.did) === 0, 'index empty for amy')
    expect(consoleRows(join(dataDir, 'console.sqlite'), amy.did)).toEqual({ api_keys: 0, console_sessions: 0, usage_daily: 0, audit_log: 1, oauth_sessions: 0 })
    expect((await fetch(`${svc.url}/xrpc/${ids.AccountListApiKeys}`, { headers: { authorization: `Bearer ${secret}` } })).status).toBe(401)
    // Ben's record naming amy is still on ben's repo.
    expect((await ben.agent.com.atproto.repo.getRecord({ repo: ben.did, collection: ids.AccountFriend, rkey: bensFriend.uri.split('/').pop()! })).data.uri).toBe(bensFriend.uri)
    await context.close()
    await svc.close()
  })

  it('finishes after the PDS was unreachable in the middle', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'cocore-wipe-'))
    const svc = await startConsole(consoleOpts(dataDir))
    const cal = await net.createAccount('cal.test', 'cal-pass')
    const total = await populate(cal, [cal], 1_200)
    const cookie = await signIn(svc.url, 'cal.test', 'cal-pass')
    const res = await startWipe(svc.url, cookie, 'wipe cal.test')
    const jobId = res.headers.get('location')!.split('/').pop()!
    await waitFor(() => Object.values(svc.wiper.get(jobId)!.report.removed).reduce((a, b) => a + b, 0) > 0, 'first batch deleted')
    // The PDS goes away (connections refused), then comes back on the same port.
    const pdsServer = net.net.pds.server.server!
    const port = net.net.pds.port
    // Stop accepting (refused from now on), then cut the open HTTP connections. Not awaited:
    // close() also waits for the AppView's firehose WebSocket, which outlives this outage.
    pdsServer.close()
    pdsServer.closeAllConnections()
    await new Promise((r) => setTimeout(r, 1_500))
    const during = svc.wiper.get(jobId)!
    expect(during.status).toBe('running')
    await new Promise<void>((r) => pdsServer.listen(port, () => r()))
    const job = (await svc.wiper.wait(jobId))!
    expect(job.status).toBe('done')
    expect(Object.values(job.report.removed).reduce((a, b) => a + b, 0)).toBe(total)
    expect(await pdsCocoreCount(cal.did)).toBe(0)
    await svc.close()
  })

  it('resumes after the console process is killed in the middle', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'cocore-wipe-'))
    const port = await freePort()
    // Sign in with an in-process console, then hand its database to a child process.
    const first = await startConsole(consoleOpts(dataDir, port))
    const dee = await net.createAccount('dee.test', 'dee-pass')
    const total = await populate(dee, [dee], 1_400)
    const cookie = await signIn(first.url, 'dee.test', 'dee-pass')
    await first.close()

    const spawnConsole = () => {
      const child = spawn(process.execPath, [join(import.meta.dirname, 'fixture', 'console-process.ts'), JSON.stringify(consoleOpts(dataDir, port))], { stdio: ['ignore', 'pipe', 'inherit'] })
      const ready = new Promise<void>((resolve) => child.stdout!.on('data', (d: Buffer) => d.toString().includes('ready') && resolve()))
      return { child, ready }
    }
    const a = spawnConsole()
    await a.ready
    const url = `http://127.0.0.1:${port}`
    const res = await startWipe(url, cookie, 'wipe dee.test')
    expect(res.status).toBe(303)
    const jobId = res.headers.get('location')!.split('/').pop()!
    const dbPath = join(dataDir, 'console.sqlite')
    const removedSoFar = () => {
      const db = new Database(dbPath, { readonly: true })
      try {
        const r = JSON.parse(db.prepare('SELECT report FROM wipe_jobs WHERE id = ?').pluck().get(jobId) as string) as { removed: Record<string, number> }
        return Object.values(r.removed).reduce((x, y) => x + y, 0)
      } finally {
        db.close()
      }
    }
    await waitFor(() => removedSoFar() > 0, 'some records deleted before the kill', 60_000)
    a.child.kill('SIGKILL')
    await new Promise((r) => a.child.once('exit', r))
    const atKill = await pdsCocoreCount(dee.did)
    expect(atKill).toBeGreaterThan(0)

    const b = spawnConsole()
    await b.ready
    await waitFor(async () => (await (await fetch(`${url}/wipe/${jobId}`)).text()).includes('id="wipe-status">done'), 'resumed wipe done', 120_000)
    expect(await pdsCocoreCount(dee.did)).toBe(0)
    expect(removedSoFar()).toBe(total)
    expect(consoleRows(dbPath, dee.did)).toEqual({ api_keys: 0, console_sessions: 0, usage_daily: 0, audit_log: 1, oauth_sessions: 0 })
    b.child.kill('SIGTERM')
    await new Promise((r) => b.child.once('exit', r))
  })

  it('refuses to sign the account in while its wipe is under way', async () => {
    const svc = await startConsole(consoleOpts(mkdtempSync(join(tmpdir(), 'cocore-wipe-'))))
    const eve = await net.createAccount('eve.test', 'eve-pass')
    // A wipe of eve's data under way: its job row says so (started by no process here, so it stays so).
    const now = new Date().toISOString()
    svc.db.$client
      .prepare("INSERT INTO wipe_jobs (id, did, status, phase, report, created_at, updated_at) VALUES ('under-way', ?, 'running', 'pds', ?, ?, ?)")
      .run(eve.did, JSON.stringify({ removed: {}, failed: {}, local: {}, remaining: {}, kept: [] }), now, now)
    const context = await browser.newContext()
    const page = await context.newPage()
    await answerSignIn(page, svc.url, 'eve.test', 'eve-pass')
    expect(page.url().startsWith(`${svc.url}/oauth/callback?`)).toBe(true)
    expect(await page.textContent('main')).toContain('Wipe under way')
    expect((await context.cookies()).some((c) => c.name === 'cocore_session')).toBe(false)
    expect(svc.db.$client.prepare('SELECT count(*) FROM console_sessions WHERE did = ?').pluck().get(eve.did)).toBe(0)
    await context.close()
    await svc.close()
  })
})
