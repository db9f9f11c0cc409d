/**
 * Two AppViews on the same firehose converge to identical state, also when
 * one starts late and backfills, and a backfill from scratch reproduces what
 * the live indexer built: the records, and the aggregates kept from them
 * (equal to their computation from scratch). Pagination stays exact while
 * rows arrive.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { backfill } from '../appview/indexer/backfill.ts'
import type { AppView } from '../appview/index.ts'
import { advanceWindows } from '../appview/indexer/aggregates.ts'
import { dumpIndex, startAppView, tempDbPath, waitCaughtUp } from './fixture/appview.ts'
import { dumpAggregates, expectedAggregates } from './fixture/aggregates.ts'
import { authorizationRecord, friend, jobRecord, profile, putRecord, putRecords } from '../src/dev/records.ts'

let net: LocalNetwork
let users: LocalAccount[] = []

beforeAll(async () => {
  net = await LocalNetwork.create()
  for (const h of ['ann', 'ben', 'cat', 'dan']) users.push(await net.createAccount(`${h}.test`))
})
afterAll(async () => {
  await net?.close()
})

/** Both AppViews' aggregates, their windows moved to the same time, are the same, and what the records make of them from scratch. */
function expectSameAggregates(a: AppView, b: AppView) {
  const now = Date.now()
  advanceWindows(a.db, now)
  advanceWindows(b.db, now)
  const dump = dumpAggregates(a.db)
  expect(dump.account_stats!.length).toBeGreaterThan(0)
  expect(dump).toEqual(expectedAggregates(a.db))
  expect(dumpAggregates(b.db)).toEqual(dump)
}

/** Creates, updates, deletes, invalid records and a deactivation across several repos. */
async function workload(round: number) {
  const [a, b, c, d] = users as [LocalAccount, LocalAccount, LocalAccount, LocalAccount]
  await putRecord(a.agent, a.did, profile(`Ann ${round}`), 'self')
  const fs = await putRecords(b.agent, b.did, users.map((u) => friend(u.did)))
  await b.agent.com.atproto.repo.deleteRecord({ repo: b.did, collection: ids.AccountFriend, rkey: fs[0]!.uri.split('/').pop()! })
  const auth = await putRecord(c.agent, c.did, authorizationRecord(d.did))
  await putRecords(c.agent, c.did, Array.from({ length: 30 }, () => jobRecord(auth)))
  await putRecord(d.agent, d.did, { $type: ids.AccountFriend, subject: 'not-a-did', createdAt: new Date().toISOString() })
  await putRecord(d.agent, d.did, profile(`Dan ${round}`), 'self')
}

describe('convergence', () => {
  let first: AppView
  let second: AppView

  it('two AppViews on the same PDS end with identical tables', async () => {
    first = await startAppView(net, tempDbPath('first'))
    second = await startAppView(net, tempDbPath('second'))
    await workload(1)
    await users[3]!.agent.com.atproto.server.deactivateAccount({})
    await workload(2).catch(() => undefined) // dan's writes fail while deactivated; the others land
    await users[3]!.agent.com.atproto.server.activateAccount()
    await waitCaughtUp(first, net)
    await waitCaughtUp(second, net)
    const dump = dumpIndex(first)
    expect(dump.split('\n').length).toBeGreaterThan(60)
    expect(dumpIndex(second)).toBe(dump)
    expectSameAggregates(first, second)
  })

  it('an AppView that starts late and backfills reaches the same state', async () => {
    const late = await startAppView(net, tempDbPath('late'), { replayFromStart: false })
    const result = await backfill({ store: late.store, indexer: late.indexer, idResolver: late.idResolver, sources: [net.pdsUrl] })
    expect(result.failed).toBe(0)
    await workload(3)
    await waitCaughtUp(first, net)
    await waitCaughtUp(late, net)
    expect(dumpIndex(late)).toBe(dumpIndex(first))
    expectSameAggregates(first, late)
    await late.stop()
  })

  it('deleting the database and backfilling yields exactly the live state, and a second backfill changes nothing', async () => {
    const fresh = await startAppView(net, tempDbPath('fresh'), { index: false })
    await waitCaughtUp(first, net)
    await backfill({ store: fresh.store, indexer: fresh.indexer, idResolver: fresh.idResolver, sources: [net.pdsUrl] })
    expect(dumpIndex(fresh)).toBe(dumpIndex(first))
    expectSameAggregates(first, fresh)
    const before = fresh.db.$client.prepare('SELECT uri, indexed_at FROM records ORDER BY uri').all()
    await backfill({ store: fresh.store, indexer: fresh.indexer, idResolver: fresh.idResolver, sources: [net.pdsUrl] })
    expect(fresh.db.$client.prepare('SELECT uri, indexed_at FROM records ORDER BY uri').all()).toEqual(before)
    expectSameAggregates(first, fresh)
    await fresh.stop()
    await first.stop()
    await second.stop()
  })
})

describe('pagination', () => {
  it('returns every row exactly once while new rows arrive', async () => {
    const av = await startAppView(net, tempDbPath('pages'), { http: true })
    const [, , c, d] = users as [LocalAccount, LocalAccount, LocalAccount, LocalAccount]
    const auth = await putRecord(c.agent, c.did, authorizationRecord(d.did))
    await putRecords(c.agent, c.did, Array.from({ length: 150 }, () => jobRecord(auth)))
    await waitCaughtUp(av, net)
    const existing = new Set(av.db.$client.prepare('SELECT uri FROM records WHERE collection = ? AND did = ?').pluck().all(ids.ComputeJob, c.did) as string[])
    const seen: string[] = []
    let cursor: string | undefined
    do {
      const q = new URLSearchParams({ requester: c.did, limit: '17', ...(cursor ? { cursor } : {}) })
      const res = await fetch(`${av.url}/xrpc/${ids.ComputeListJobs}?${q}`)
      const body = (await res.json()) as { jobs: { uri: string }[]; cursor?: string }
      seen.push(...body.jobs.map((j) => j.uri))
      cursor = body.cursor
      // Rows keep arriving between pages.
      await putRecords(c.agent, c.did, Array.from({ length: 5 }, () => jobRecord(auth)))
      await waitCaughtUp(av, net)
    } while (cursor)
    expect(new Set(seen).size).toBe(seen.length)
    for (const uri of existing) expect(seen).toContain(uri)
    await av.stop()
  })
})
