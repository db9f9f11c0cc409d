/**
 * npm run bench:wipe [-- --records N]
 *
 * Records/s of the console's wipe (describeRepo, listRecords, applyWrites
 * deletes of 200) against the baseline of deleting one record per
 * deleteRecord call, both against the same local PDS in the same run, on
 * repos of N dev.cocore records each.
 *
 * The wipe runs with a password session standing in for the user's OAuth
 * session: the PDS calls are the same, and OAuth needs a browser.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { openDb } from '../src/db/index.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { friend, putRecords } from '../src/dev/records.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { Wiper } from '../console/wipe.ts'
import type { Publisher } from '../console/publisher.ts'

const { values } = parseArgs({ options: { records: { type: 'string', default: '1000' } } })
const N = Number(values.records)
if (!Number.isSafeInteger(N) || N < 1) throw new Error('--records: a positive integer')

const tmp = mkdtempSync(join(tmpdir(), 'cocore-bench-wipe-'))
process.env.TMPDIR = tmp
const net = await LocalNetwork.create()
try {
  const populate = async (handle: string): Promise<LocalAccount> => {
    const acct = await net.createAccount(handle)
    await putRecords(acct.agent, acct.did, Array.from({ length: N }, () => friend(acct.did)))
    return acct
  }
  const count = async (acct: LocalAccount) => (await acct.agent.com.atproto.repo.listRecords({ repo: acct.did, collection: ids.AccountFriend, limit: 100 })).data.records.length

  // Baseline: one deleteRecord per record (list a page, delete each).
  const base = await populate('one-by-one.test')
  let t0 = performance.now()
  for (;;) {
    const page = await base.agent.com.atproto.repo.listRecords({ repo: base.did, collection: ids.AccountFriend, limit: 100 })
    if (page.data.records.length === 0) break
    for (const r of page.data.records) await base.agent.com.atproto.repo.deleteRecord({ repo: base.did, collection: ids.AccountFriend, rkey: r.uri.split('/').pop()! })
  }
  const baseSec = (performance.now() - t0) / 1000
  if ((await count(base)) !== 0) throw new Error('baseline left records behind')

  // The wipe job, end to end (verification included).
  const subject = await populate('wiped.test')
  const db = openDb(join(tmp, 'console.sqlite'))
  const publisher = { agent: async () => subject.agent } as unknown as Publisher
  const wiper = new Wiper({ db, publisher, purgeIndex: null, revokeOAuth: async () => {} })
  t0 = performance.now()
  const job = (await wiper.wait(wiper.start(subject.did).id))!
  const wipeSec = (performance.now() - t0) / 1000
  const removed = Object.values(job.report.removed).reduce((a, b) => a + b, 0)
  if (job.status !== 'done' || removed !== N || (await count(subject)) !== 0) throw new Error(`wipe did not finish cleanly: ${job.status}, ${removed}/${N}`)
  db.$client.close()

  const rows: [string, string][] = [
    ['records per repo', String(N)],
    ['baseline: one deleteRecord per record', `${(N / baseSec).toFixed(0)} records/s (${baseSec.toFixed(2)} s)`],
    ['wipe job: applyWrites x200 + verification', `${(N / wipeSec).toFixed(0)} records/s (${wipeSec.toFixed(2)} s)`],
    ['speed-up', `${(baseSec / wipeSec).toFixed(1)}x`],
  ]
  const w = Math.max(...rows.map((r) => r[0].length))
  console.log(rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join('\n'))
} finally {
  await net.close()
  rmSync(tmp, { recursive: true, force: true })
}
