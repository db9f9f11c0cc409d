/**
 * "Wipe all my data" freezes the account before anything is deleted: its API
 * keys are revoked and every console session of it ended in the same
 * transaction that records the job, before the first PDS call, so nothing
 * can act for the account while the wipe runs. Without a PDS or a browser
 * (test/console-wipe.test.ts runs whole wipes against the local PDS).
 *
 *   npx vitest run test/console-wipe-freeze.test.ts
 */
import { afterAll, beforeAll, expect, it } from 'vitest'
import { ApiKeys } from '../console/api-keys.ts'
import type { ConsoleService } from '../console/index.ts'
import type { Publisher } from '../console/publisher.ts'
import { ConsoleSessions } from '../console/sessions.ts'
import { Wiper } from '../console/wipe.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { startTestConsole } from './fixture/console.ts'

const DAVE = 'did:plc:daveddddddddddddddddddddd'
const OTHER = 'did:plc:otherooooooooooooooooooo'
let svc: ConsoleService

beforeAll(async () => {
  // No PDS: the wipe's first PDS call fails and the job stops "incomplete" soon after.
  svc = await startTestConsole(null, 'http://127.0.0.1:1', { wipeRetry: { firstMs: 10, maxMs: 20, giveUpAfterMs: 300, attemptMs: 500 } })
})
afterAll(async () => {
  await svc?.close()
})

const liveKeys = (did: string) => svc.db.$client.prepare('SELECT count(*) FROM api_keys WHERE did = ? AND revoked_at IS NULL').pluck().get(did) as number
const sessionsOf = (did: string) => svc.db.$client.prepare('SELECT count(*) FROM console_sessions WHERE did = ?').pluck().get(did) as number

it('revokes the keys and ends every console session of the account when the wipe starts, and only that account', async () => {
  const keys = new ApiKeys(svc.db)
  const sessions = new ConsoleSessions(svc.db, Buffer.alloc(32))
  const [k1, k2] = [keys.create(DAVE, 'one', ['read', 'keys:manage']), keys.create(DAVE, 'two', ['inference'])]
  const [here, elsewhere] = [sessions.create(DAVE, 'this browser', undefined), sessions.create(DAVE, 'another device', undefined)]
  const others = { key: keys.create(OTHER, 'other', ['keys:manage']), session: sessions.create(OTHER, 'other', undefined) }
  const xrpc = (auth: Record<string, string>) => fetch(`${svc.url}/xrpc/${ids.AccountListApiKeys}`, { headers: auth })
  expect((await xrpc({ authorization: `Bearer ${k1.secret}` })).status).toBe(200)

  const res = await fetch(`${svc.url}/account/wipe`, {
    method: 'POST',
    redirect: 'manual',
    headers: { cookie: `cocore_session=${here.token}`, origin: svc.url, 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ confirm: `wipe ${DAVE}` }),
  })
  expect(res.status).toBe(303)
  const jobId = res.headers.get('location')!.split('/').pop()!

  // Frozen as the wipe starts, whatever the PDS does next.
  expect(liveKeys(DAVE)).toBe(0)
  expect(sessionsOf(DAVE)).toBe(0)
  for (const k of [k1, k2]) expect((await xrpc({ authorization: `Bearer ${k.secret}` })).status).toBe(401)
  for (const s of [here, elsewhere]) {
    expect((await xrpc({ cookie: `cocore_session=${s.token}` })).status).toBe(401)
    expect((await fetch(`${svc.url}/keys`, { redirect: 'manual', headers: { cookie: `cocore_session=${s.token}` } })).headers.get('location')).toBe('/')
  }
  // Another account is untouched.
  expect((await xrpc({ authorization: `Bearer ${others.key.secret}` })).status).toBe(200)
  expect((await xrpc({ cookie: `cocore_session=${others.session.token}` })).status).toBe(200)

  // The wipe cannot reach a PDS here: it stops, says so, and the account stays frozen.
  const job = (await svc.wiper.wait(jobId))!
  expect(job.status).toBe('incomplete')
  expect(job.report.local.consoleSessions).toBe(2)
  expect(liveKeys(DAVE)).toBe(0)
  expect(sessionsOf(DAVE)).toBe(0)
})

it('freezes before the first call to the PDS', async () => {
  const did = 'did:plc:erineeeeeeeeeeeeeeeeeeeee'
  new ApiKeys(svc.db).create(did, 'k', ['read'])
  new ConsoleSessions(svc.db, Buffer.alloc(32)).create(did, 'ua', undefined)
  const seen: { liveKeys: number; sessions: number }[] = []
  // The PDS, as the wipe reaches it: it records what could still act for the account, then refuses.
  const publisher = {
    agent: async () => {
      seen.push({ liveKeys: liveKeys(did), sessions: sessionsOf(did) })
      throw Object.assign(new Error('refused by the test PDS'), { status: 400 })
    },
  } as unknown as Publisher
  const wiper = new Wiper({ db: svc.db, publisher, purgeIndex: null, revokeOAuth: async () => {}, retry: { firstMs: 10, maxMs: 20, giveUpAfterMs: 100 } })
  const job = wiper.start(did)
  await wiper.wait(job.id)
  expect(seen.length).toBeGreaterThan(0)
  expect(seen).toEqual(seen.map(() => ({ liveKeys: 0, sessions: 0 })))
})
