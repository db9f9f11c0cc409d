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
import type { ConsoleService } from '../console/index.ts'
import type { LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { signInWithBrowser } from './fixture/console.ts'
import { startStack, type Stack } from './fixture/stack.ts'

let svc: ConsoleService
let browser: Browser
let alice: LocalAccount
let bob: LocalAccount

let stack: Stack

beforeAll(async () => {
  const started = await startStack({ accounts: [['alice.test', 'alice-pass'], ['bob.test', 'bob-pass']] })
  stack = started
  ;({ svc, browser, accounts: [alice, bob] } = started)
})
afterAll(() => stack?.close())

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
