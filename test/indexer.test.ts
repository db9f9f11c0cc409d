/**
 * The firehose indexer against a real PLC + PDS: create/update/delete, restart
 * from the cursor, invalid records, bad signatures, account deletion.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { Secp256k1Keypair } from '@atproto/crypto'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { AppView } from '../appview/index.ts'
import { countRecords, startAppView, tempDbPath, waitCaughtUp } from './fixture/appview.ts'
import { friend, profile, putRecord, putRecords } from '../src/dev/records.ts'
import { waitFor } from './fixture/wait.ts'

let net: LocalNetwork
let alice: LocalAccount
let bob: LocalAccount

beforeAll(async () => {
  net = await LocalNetwork.create()
  alice = await net.createAccount('alice.test')
  bob = await net.createAccount('bob.test')
})
afterAll(async () => {
  await net?.close()
})

const row = (av: AppView, uri: string) => av.db.$client.prepare('SELECT * FROM records WHERE uri = ?').get(uri) as { body: string; cid: string } | undefined

describe('indexer', () => {
  it('applies create, update and delete, and resumes from its cursor after a stop', async () => {
    const dbPath = tempDbPath()
    let av = await startAppView(net, dbPath)
    const p = await putRecord(alice.agent, alice.did, profile('Alice'), 'self')
    const f = await putRecord(alice.agent, alice.did, friend(bob.did))
    await waitFor(() => row(av, f.uri), 'friend indexed')
    expect(JSON.parse(row(av, p.uri)!.body).displayName).toBe('Alice')
    expect((av.db.$client.prepare('SELECT handle FROM accounts WHERE did = ?').pluck().get(alice.did))).toBe('alice.test')

    const p2 = await putRecord(alice.agent, alice.did, profile('Alice B.'), 'self')
    await waitFor(() => row(av, p.uri)?.cid === p2.cid, 'profile updated')
    expect(JSON.parse(row(av, p.uri)!.body).displayName).toBe('Alice B.')

    await alice.agent.com.atproto.repo.deleteRecord({ repo: alice.did, collection: ids.AccountFriend, rkey: f.uri.split('/').pop()! })
    await waitFor(() => !row(av, f.uri), 'friend deleted')

    // Down: writes made meanwhile must all arrive after restart, exactly once.
    await av.stop()
    const cursorBefore = (await import('better-sqlite3')).default(dbPath).prepare('SELECT seq FROM cursors').pluck().get() as number
    expect(cursorBefore).toBeGreaterThan(0)
    const written = await putRecords(bob.agent, bob.did, [friend(alice.did), friend(alice.did), profile('Bob')])
    av = await startAppView(net, dbPath)
    await waitFor(() => written.every((w) => row(av, w.uri)), 'writes made while down indexed')
    expect(countRecords(av, 'did = ?', bob.did)).toBe(3)
    expect(av.indexer.stats.staleCommits).toBe(0)
    await av.stop()
  })

  it('does not index invalid records, and counts them by reason', async () => {
    const av = await startAppView(net, tempDbPath())
    const carol = await net.createAccount('carol.test')
    const bad = [
      { $type: ids.AccountProfile, displayName: 'x'.repeat(300), createdAt: new Date().toISOString() }, // too long
      { $type: ids.AccountFriend, createdAt: new Date().toISOString() }, // missing subject
      { $type: ids.AccountFriend, subject: 42, createdAt: new Date().toISOString() }, // wrong type
      { $type: ids.AccountFriend, subject: 'not a did', createdAt: new Date().toISOString() }, // bad format
    ]
    const badRefs = []
    for (const b of bad) badRefs.push(await putRecord(carol.agent, carol.did, b))
    const good = await putRecord(carol.agent, carol.did, friend(alice.did))
    await waitFor(() => row(av, good.uri), 'valid record indexed')
    for (const r of badRefs) expect(row(av, r.uri)).toBeUndefined()
    const counts = av.store.rejectionCounts()
    const n = (reason: string) => counts.filter((c) => c.reason === reason).reduce((a, c) => a + c.count, 0)
    expect(n('invalid-schema')).toBe(4)

    // An update that makes a valid record invalid removes it from the index.
    await putRecord(carol.agent, carol.did, { $type: ids.AccountFriend, subject: 'nope', createdAt: new Date().toISOString() }, good.uri.split('/').pop())
    await waitFor(() => !row(av, good.uri), 'now-invalid record removed')
    await av.stop()
  })

  it('rejects commits signed with a key that is not the DID\'s', async () => {
    const dave = await net.createAccount('dave.test')
    // Point dave's DID at a different signing key: the PDS keeps signing with the old one.
    const ctx = net.net.pds.ctx
    const wrongKey = await Secp256k1Keypair.create()
    await ctx.plcClient.updateAtprotoKey(dave.did, ctx.plcRotationKey, wrongKey.did())
    const av = await startAppView(net, tempDbPath())
    const forged = await putRecord(dave.agent, dave.did, friend(bob.did))
    const marker = await putRecord(alice.agent, alice.did, friend(dave.did))
    await waitFor(() => row(av, marker.uri), 'later commit of another repo indexed')
    await waitFor(() => av.store.rejectionCounts().some((c) => c.reason === 'bad-commit'), 'bad commit counted')
    expect(row(av, forged.uri)).toBeUndefined()
    await av.stop()
  })

  it('refreshes the handle on #identity', async () => {
    const av = await startAppView(net, tempDbPath())
    const gus = await net.createAccount('gus.test')
    const f = await putRecord(gus.agent, gus.did, friend(alice.did))
    await waitFor(() => row(av, f.uri), 'record indexed')
    const handle = () => av.db.$client.prepare('SELECT handle FROM accounts WHERE did = ?').pluck().get(gus.did)
    expect(handle()).toBe('gus.test')
    await gus.agent.com.atproto.identity.updateHandle({ handle: 'gus-renamed.test' })
    await waitFor(() => handle() === 'gus-renamed.test', 'handle refreshed')
    await av.stop()
  })

  it('hides a deactivated account, shows it again on reactivation, and resyncs the repo on #sync', async () => {
    const av = await startAppView(net, tempDbPath(), { http: true })
    const fay = await net.createAccount('fay.test')
    const f = await putRecord(fay.agent, fay.did, profile('Fay'), 'self')
    await waitFor(() => row(av, f.uri), 'record indexed')
    // Drift the index from the PDS: a row the repo does not hold. Only a resync from getRepo can notice.
    const bogus = `at://${fay.did}/${ids.AccountFriend}/3kzzzzzzzzzzz`
    av.db.$client
      .prepare("INSERT INTO records (uri, did, collection, rkey, cid, body, sort_at, indexed_at) VALUES (?, ?, ?, '3kzzzzzzzzzzz', ?, '{}', '', '')")
      .run(bogus, fay.did, ids.AccountFriend, f.cid)
    const getProfile = () => fetch(`${av.url}/xrpc/${ids.AccountGetProfile}?did=${fay.did}`).then((r) => r.status)
    expect(await getProfile()).toBe(200)

    await fay.agent.com.atproto.server.deactivateAccount({})
    await waitFor(async () => (await getProfile()) === 404, 'hidden while deactivated')
    expect(row(av, f.uri)).toBeDefined() // kept, only hidden

    await fay.agent.com.atproto.server.activateAccount()
    await waitFor(async () => (await getProfile()) === 200, 'shown again after reactivation')
    // Reactivation emits #sync: the repo is refetched and the drifted row is gone.
    await waitFor(() => !row(av, bogus), 'resynced from getRepo')
    expect(row(av, f.uri)).toBeDefined()
    await av.stop()
  })

  it('purges an account deleted on its PDS', async () => {
    const av = await startAppView(net, tempDbPath())
    const erin = await net.createAccount('erin.test')
    const refs = await putRecords(erin.agent, erin.did, [profile('Erin'), friend(alice.did), friend(bob.did)])
    await waitFor(() => refs.every((r) => row(av, r.uri)), 'erin indexed')
    const { token } = await requestDeleteToken(erin)
    await erin.agent.com.atproto.server.deleteAccount({ did: erin.did, password: erin.password, token })
    await waitFor(() => countRecords(av, 'did = ?', erin.did) === 0, 'erin purged')
    expect(av.db.$client.prepare('SELECT count(*) FROM accounts WHERE did = ?').pluck().get(erin.did)).toBe(0)
    // As after a crash just past the purge: the whole log is replayed, and the purged rows stay gone.
    av.db.$client.prepare('UPDATE cursors SET seq = 0').run()
    const dbPath = av.db.$client.name
    await av.stop()
    const again = await startAppView(net, dbPath)
    await waitCaughtUp(again, net)
    expect(countRecords(again, 'did = ?', erin.did)).toBe(0)
    // Every replayed commit was stale: none re-wrote a row, not even for a moment.
    expect(again.indexer.stats.recordsWritten).toBe(0)
    expect(again.indexer.stats.staleCommits).toBeGreaterThan(0)
    await again.stop()
  })
})

/** The PDS emails a deletion token; in dev-env it is readable from the PDS's database. */
async function requestDeleteToken(acct: LocalAccount): Promise<{ token: string }> {
  await acct.agent.com.atproto.server.requestAccountDelete()
  const res = await net.net.pds.ctx.accountManager.db.db
    .selectFrom('email_token')
    .selectAll()
    .where('did', '=', acct.did as never)
    .where('purpose', '=', 'delete_account')
    .executeTakeFirstOrThrow()
  return { token: res.token }
}
