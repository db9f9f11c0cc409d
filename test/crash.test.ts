/**
 * An indexer process killed with SIGKILL in the middle of a stream of
 * thousands of records, then restarted from the same database: the index ends
 * equal to the PDS's truth, nothing lost and nothing applied twice.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import Database from 'better-sqlite3'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { pdsTruth, tempDbPath } from './fixture/appview.ts'
import { friend, profile, putRecord, putRecords } from '../src/dev/records.ts'
import { waitFor } from './fixture/wait.ts'

let net: LocalNetwork
const users: LocalAccount[] = []

beforeAll(async () => {
  net = await LocalNetwork.create()
  for (const h of ['kim', 'lee', 'max']) users.push(await net.createAccount(`${h}.test`))
})
afterAll(async () => {
  await net?.close()
})

function startIndexer(dbPath: string): { child: ChildProcess; cursor: () => number; ready: Promise<void> } {
  const child = spawn(process.execPath, [join(import.meta.dirname, 'fixture', 'indexer-process.ts'), dbPath, net.pdsUrl, net.plcUrl], {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  let cursor = -1
  let ready!: () => void
  const readyP = new Promise<void>((r) => (ready = r))
  child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
    for (const line of chunk.split('\n')) {
      if (line === 'ready') ready()
      const m = /^cursor (-?\d+)$/.exec(line)
      if (m) cursor = Number(m[1])
    }
  })
  return { child, cursor: () => cursor, ready: readyP }
}

/** Thousands of records in commits of every size, with updates and deletes mixed in. */
async function stream(user: LocalAccount, rounds: number) {
  for (let i = 0; i < rounds; i++) {
    const batch = await putRecords(user.agent, user.did, Array.from({ length: 100 }, (_, k) => friend(users[k % users.length]!.did)))
    await putRecord(user.agent, user.did, profile(`${user.did} ${i}`), 'self')
    for (const ref of batch.slice(0, 3)) {
      await user.agent.com.atproto.repo.deleteRecord({ repo: user.did, collection: ids.AccountFriend, rkey: ref.uri.split('/').pop()! })
    }
  }
}

it('recovers from SIGKILL mid-stream to exactly the PDS truth', async () => {
  const dbPath = tempDbPath('crash')
  const first = startIndexer(dbPath)
  await first.ready
  const writing = Promise.all(users.map((u) => stream(u, 12)))
  // Kill once it has indexed part of the stream, while writes are still coming.
  const count = () => {
    const db = new Database(dbPath, { readonly: true, fileMustExist: true })
    try {
      return db.prepare('SELECT count(*) FROM records').pluck().get() as number
    } finally {
      db.close()
    }
  }
  await waitFor(() => count() > 500, 'some records indexed before the kill', 60_000)
  first.child.kill('SIGKILL')
  await new Promise((r) => first.child.once('exit', r))
  const atKill = count()
  await writing
  const target = (await net.net.pds.ctx.sequencer.curr())!

  const second = startIndexer(dbPath)
  await waitFor(() => second.cursor() >= target, 'restarted indexer caught up', 60_000)
  second.child.kill('SIGTERM')
  await new Promise((r) => second.child.once('exit', r))

  const truth = await pdsTruth(net, users.map((u) => u.did))
  expect(truth.length).toBeGreaterThan(3000)
  expect(atKill).toBeLessThan(truth.length)
  const db = new Database(dbPath, { readonly: true })
  const indexed = (db.prepare('SELECT uri || \' \' || cid FROM records ORDER BY 1').pluck().all() as string[]).sort()
  db.close()
  expect(indexed).toEqual(truth)
})
