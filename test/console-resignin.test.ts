/**
 * Signing in again while the account's previous OAuth session is still in
 * use (a job being published, a cached agent): found by `npm run stress`,
 * where background sign-ins raced the chats' job records. The previous
 * session must neither send the new token with its old DPoP key nor, when
 * the PDS refuses that, make the OAuth client delete the new session.
 */
import { TID } from '@atproto/common-web'
import type { Browser } from 'playwright-core'
import { afterAll, beforeAll, expect, it } from 'vitest'
import type { AppView } from '../appview/index.ts'
import type { ConsoleService } from '../console/index.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { startAppView, tempDbPath } from './fixture/appview.ts'
import { launchBrowser } from './fixture/browser.ts'
import { signInWithBrowser, startTestConsole } from './fixture/console.ts'

let net: LocalNetwork
let av: AppView
let svc: ConsoleService
let browser: Browser
let alice: LocalAccount
let bob: LocalAccount

beforeAll(async () => {
  net = await LocalNetwork.create()
  alice = await net.createAccount('alice.test', 'alice-pass')
  bob = await net.createAccount('bob.test', 'bob-pass')
  av = await startAppView(net, tempDbPath(), { http: true })
  svc = await startTestConsole(net, av.url)
  browser = await launchBrowser()
})
afterAll(async () => {
  await browser?.close()
  await svc?.close()
  await av?.stop()
  await net?.close()
})

const signIn = async () => {
  const context = await browser.newContext()
  await signInWithBrowser(context, svc.url, 'alice.test', 'alice-pass')
  await context.close()
}
const storedSessions = () => svc.db.$client.prepare('SELECT count(*) FROM oauth_sessions WHERE did = ?').pluck().get(alice.did) as number
const friendRecord = () => ({ $type: ids.AccountFriend, subject: bob.did, createdAt: new Date().toISOString() })

it('a session from before a new sign-in writes with the new one, and the new one survives', async () => {
  await signIn()
  // An agent from the first sign-in, as a job in flight holds it.
  const before = await svc.publisher.agent(alice.did)
  await signIn()
  expect(storedSessions()).toBe(1)

  const rkey = TID.nextStr()
  await before.com.atproto.repo.createRecord({ repo: alice.did, collection: ids.AccountFriend, rkey, record: friendRecord() })
  const onPds = await alice.agent.com.atproto.repo.getRecord({ repo: alice.did, collection: ids.AccountFriend, rkey })
  expect((onPds.data.value as { subject: string }).subject).toBe(bob.did)

  // The account's session is still there, and what the console makes from it now writes too.
  expect(storedSessions()).toBe(1)
  const now = await svc.publisher.agent(alice.did)
  await now.com.atproto.repo.createRecord({ repo: alice.did, collection: ids.AccountFriend, rkey: TID.nextStr(), record: friendRecord() })
  // And the earlier agent keeps working on the current session.
  await before.com.atproto.repo.createRecord({ repo: alice.did, collection: ids.AccountFriend, rkey: TID.nextStr(), record: friendRecord() })
  expect(storedSessions()).toBe(1)
})
