/**
 * Gap detection in the firehose indexer, against a real PLC + PDS. A commit
 * whose `since` (or `prevData`) does not name the last commit seen of its repo
 * means events were missed: the repo is counted under 'gap' and resynced from
 * `com.atproto.sync.getRepo`, and the index ends equal to the PDS. Commits of
 * other collections (app.bsky posts and likes) move the repo's head too, so a
 * long run of ordinary commits gives no gap, across a restart as well.
 */
import Database from 'better-sqlite3'
import { ids as bsky, type AtpAgent } from '@atproto/api'
import { cborToLex, readCar } from '@atproto/repo'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { AppView } from '../appview/index.ts'
import { isGap, type RepoState } from '../appview/indexer/store.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { friend, now, profile, putRecord } from '../src/dev/records.ts'
import { dumpIndex, pdsTruth, startAppView, tempDbPath, waitCaughtUp } from './fixture/appview.ts'
import { waitFor } from './fixture/wait.ts'

let net: LocalNetwork

beforeAll(async () => {
  net = await LocalNetwork.create()
})
afterAll(async () => {
  await net?.close()
})

const rkeyOf = (uri: string) => uri.split('/').pop()!
const post = (agent: AtpAgent, repo: string, text: string) => agent.com.atproto.repo.createRecord({ repo, collection: bsky.AppBskyFeedPost, record: { $type: bsky.AppBskyFeedPost, text, createdAt: now() } })
const deleteFriend = (a: LocalAccount, uri: string) => a.agent.com.atproto.repo.deleteRecord({ repo: a.did, collection: ids.AccountFriend, rkey: rkeyOf(uri) })
const gaps = (av: AppView) => av.store.rejectionCounts().filter((r) => r.reason === 'gap').reduce((n, r) => n + r.count, 0)
const indexed = (av: AppView, dids: string[]) =>
  (av.db.$client.prepare(`SELECT uri, cid FROM records WHERE did IN (${dids.map(() => '?').join(',')}) ORDER BY uri`).all(...dids) as { uri: string; cid: string }[]).map((r) => `${r.uri} ${r.cid}`).sort()
type RepoRow = { rev: string; head: string | null; headData: string | null; needsResync: number }
const REPO_ROW = 'SELECT rev, head, head_data AS headData, needs_resync AS needsResync FROM repos WHERE did = ?'
const repoRow = (av: AppView, did: string) => av.db.$client.prepare(REPO_ROW).get(did) as RepoRow
/** The same, read from the database file of a stopped AppView. */
function storedRepoRow(dbPath: string, did: string): RepoRow {
  const db = new Database(dbPath, { readonly: true })
  try {
    return db.prepare(REPO_ROW).get(did) as RepoRow
  } finally {
    db.close()
  }
}

/** The PDS's latest commit of a repo: its rev and its MST root (the `data` of the signed commit block). */
async function latestCommit(did: string): Promise<{ rev: string; data: string }> {
  const agent = net.net.pds.getAgent()
  const head = await agent.com.atproto.sync.getLatestCommit({ did })
  const car = await agent.com.atproto.sync.getBlocks({ did, cids: [head.data.cid] })
  const { blocks } = await readCar(car.data)
  const [[, bytes]] = [...blocks] as [[unknown, Uint8Array]]
  const commit = cborToLex(bytes) as { rev: string; data: unknown }
  return { rev: head.data.rev, data: String(commit.data) }
}

describe('isGap', () => {
  // Revs are TIDs: they sort in time order as strings.
  const state: RepoState = { rev: '3kaaaaaaaaa22', head: '3kbbbbbbbbb22', headData: 'bafyhead', needsResync: false }
  const next = { rev: '3kccccccccc22', since: state.head, prevData: 'bafyhead', data: null }

  it('judges a newer commit by its since and, when both are known, its prevData', () => {
    expect(isGap(state, next)).toBe(false)
    expect(isGap(state, { ...next, since: state.rev })).toBe(true)
    expect(isGap(state, { ...next, since: null })).toBe(true)
    // The same previous rev over another MST root: what the index holds is not what the commit was built on.
    expect(isGap(state, { ...next, prevData: 'bafyother' })).toBe(true)
    expect(isGap(state, { ...next, prevData: null })).toBe(false)
    expect(isGap({ ...state, headData: null }, { ...next, prevData: 'bafyother' })).toBe(false)
  })

  it('judges no gap when it cannot or need not', () => {
    const wrong = { ...next, since: 'nothing seen' }
    expect(isGap({ ...state, needsResync: true }, wrong)).toBe(false)
    expect(isGap({ ...state, head: null }, wrong)).toBe(false)
    expect(isGap(state, { ...wrong, since: undefined })).toBe(false)
    // At or behind the head: a replay, not a gap.
    expect(isGap(state, { ...wrong, rev: state.head! })).toBe(false)
  })
})

describe('firehose gaps', () => {
  it('a commit after missed events resyncs its repo from getRepo, for a commit of ours and one of another collection', async () => {
    const [alice, bob] = [await net.createAccount('alice.test'), await net.createAccount('bob.test')]
    const dids = [alice.did, bob.did]
    const dbPath = tempDbPath('gap')
    let av = await startAppView(net, dbPath)
    // A witness on the same firehose that misses nothing: both must end identical.
    const witness = await startAppView(net, tempDbPath('witness'))

    const a1 = await putRecord(alice.agent, alice.did, friend(bob.did))
    const a2 = await putRecord(alice.agent, alice.did, friend(bob.did))
    await putRecord(alice.agent, alice.did, profile('Alice'), 'self')
    await post(alice.agent, alice.did, 'before the gap')
    const b1 = await putRecord(bob.agent, bob.did, friend(alice.did))
    const b2 = await putRecord(bob.agent, bob.did, friend(alice.did))
    await post(bob.agent, bob.did, 'before the gap')
    await waitCaughtUp(av, net)
    expect(gaps(av)).toBe(0)
    await av.stop()

    // While it is down, records are created, updated and deleted...
    const a3 = await putRecord(alice.agent, alice.did, friend(bob.did))
    await deleteFriend(alice, a1.uri)
    await putRecord(alice.agent, alice.did, profile('Alice, renamed'), 'self')
    await post(alice.agent, alice.did, 'during the gap')
    const b3 = await putRecord(bob.agent, bob.did, friend(alice.did))
    await deleteFriend(bob, b1.uri)
    await post(bob.agent, bob.did, 'during the gap')
    // ...and it resumes from a cursor after them: those events are lost to it.
    const missedUpTo = (await net.net.pds.ctx.sequencer.curr())!
    const db = new Database(dbPath)
    expect(db.prepare('UPDATE cursors SET seq = ?').run(missedUpTo).changes).toBe(1)
    db.close()
    av = await startAppView(net, dbPath)
    // The hole is there: the deleted records are still indexed, the new ones are not.
    expect(indexed(av, dids)).toContain(`${a1.uri} ${a1.cid}`)
    expect(indexed(av, dids)).not.toContain(`${a3.uri} ${a3.cid}`)
    expect(indexed(av, dids)).toContain(`${b1.uri} ${b1.cid}`)

    // Alice's next commit is one of ours, Bob's one of another collection: neither follows what the index saw.
    const a4 = await putRecord(alice.agent, alice.did, friend(bob.did))
    await post(bob.agent, bob.did, 'after the gap')
    await waitCaughtUp(av, net)
    await waitFor(() => dids.every((d) => repoRow(av, d).needsResync === 0) && av.indexer.stats.resyncs >= 2, 'both repos resynced')

    expect(gaps(av)).toBe(2)
    expect(av.indexer.stats.gaps).toBe(2)
    const gapUris = av.store.db.$client.prepare("SELECT last_uri FROM rejections WHERE reason = 'gap'").pluck().all()
    expect(gapUris.length).toBe(1)
    expect([`at://${alice.did}`, `at://${bob.did}`]).toContain(gapUris[0])
    // A resync is no stale commit: the stale-rev rule is unchanged.
    expect(av.store.rejectionCounts().filter((r) => r.reason === 'stale-rev')).toEqual([])

    const truth = await pdsTruth(net, dids)
    expect(indexed(av, dids)).toEqual(truth)
    for (const uri of [a1.uri, b1.uri]) expect(truth.some((l) => l.startsWith(`${uri} `))).toBe(false)
    for (const r of [a2, a3, a4, b2, b3]) expect(truth).toContain(`${r.uri} ${r.cid}`)
    const body = av.db.$client.prepare('SELECT body FROM records WHERE uri = ?').pluck().get(`at://${alice.did}/${ids.AccountProfile}/self`) as string
    expect(JSON.parse(body).displayName).toBe('Alice, renamed')

    // The head is the PDS's latest commit again.
    for (const did of dids) {
      const latest = await latestCommit(did)
      expect(repoRow(av, did).head).toBe(latest.rev)
      expect(repoRow(av, did).headData).toBe(latest.data)
    }

    // The two AppViews, one of which missed events, hold the same index.
    await waitCaughtUp(witness, net)
    expect(gaps(witness)).toBe(0)
    expect(dumpIndex(av)).toBe(dumpIndex(witness))
    await av.stop()
    await witness.stop()
  })

  it('a long run of ordinary commits, mostly of other collections, gives no gap, across a restart', async () => {
    const users = [await net.createAccount('carol.test'), await net.createAccount('dave.test'), await net.createAccount('erin.test')]
    const dids = users.map((u) => u.did)
    const dbPath = tempDbPath('nogap')
    let av = await startAppView(net, dbPath)
    const live = new Map<string, string[]>(dids.map((d) => [d, []]))

    /** One round: per user, posts and likes (not ours), a friend created, sometimes one deleted, a commit mixing both, and a post. */
    const round = async (i: number) => {
      for (const [n, u] of users.entries()) {
        const p = await post(u.agent, u.did, `post ${i}`)
        await post(u.agent, u.did, `another post ${i}`)
        await u.agent.com.atproto.repo.createRecord({ repo: u.did, collection: bsky.AppBskyFeedLike, record: { $type: bsky.AppBskyFeedLike, subject: { uri: p.data.uri, cid: p.data.cid }, createdAt: now() } })
        const f = await putRecord(u.agent, u.did, friend(users[(n + 1) % users.length]!.did))
        live.get(u.did)!.push(f.uri)
        if (i % 3 === 2) await deleteFriend(u, live.get(u.did)!.shift()!)
        // One commit with an op of ours and one of another collection.
        await u.agent.com.atproto.repo.applyWrites({
          repo: u.did,
          writes: [
            { $type: 'com.atproto.repo.applyWrites#create', collection: bsky.AppBskyFeedPost, value: { $type: bsky.AppBskyFeedPost, text: `mixed ${i}`, createdAt: now() } },
            { $type: i === 0 ? 'com.atproto.repo.applyWrites#create' : 'com.atproto.repo.applyWrites#update', collection: ids.AccountProfile, rkey: 'self', value: profile(`${u.handle} ${i}`) },
          ],
        })
        await post(u.agent, u.did, `last post ${i}`)
      }
    }

    for (let i = 0; i < 6; i++) await round(i)
    await waitCaughtUp(av, net)
    await av.stop()
    // The heads moved by posts are written with the cursor: after a stop they are in the database.
    // (A post's MST root is not read: the next commit's prevData is checked after commits of ours.)
    for (const did of dids) expect(storedRepoRow(dbPath, did)).toMatchObject({ head: (await latestCommit(did)).rev, headData: null })
    // Written while it is down: it catches up from its own cursor, and the chain still holds.
    await round(6)
    av = await startAppView(net, dbPath)
    for (let i = 7; i < 10; i++) await round(i)
    await waitCaughtUp(av, net)

    // 10 rounds x 3 users x 7 commits, and every one followed the last one seen of its repo.
    expect(gaps(av)).toBe(0)
    expect(av.indexer.stats.gaps).toBe(0)
    expect(av.indexer.stats.resyncs).toBe(0)
    expect(av.store.rejectionCounts()).toEqual([])
    for (const did of dids) {
      // Through the store: heads moved by posts since the last cursor was written are still in memory.
      const row = av.store.repoState(did)!
      const latest = await latestCommit(did)
      expect(row.needsResync).toBe(false)
      // The last commit of each repo is a post: it moved the head, not the last applied rev.
      expect(row).toMatchObject({ head: latest.rev, headData: null })
      expect(row.rev < latest.rev).toBe(true)
    }
    expect(indexed(av, dids)).toEqual(await pdsTruth(net, dids))
    await av.stop()
  })
})
