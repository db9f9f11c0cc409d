/**
 * The settlement pipeline survives being killed between its steps: after
 * the decision is committed (ledger + outbox) and before it is published, and
 * after it is published and before that is recorded. The restarted exchange
 * finishes the job: every settlement on the exchange's repo exactly once,
 * every ledger movement exactly once.
 *
 * The jobs are entered in the exchange's dispatch book (its database file,
 * through the book's own API) as its gateway records a job it sent to the
 * provider and saw complete: settlement pays only such jobs, and sending them
 * through a provider is not what this test is about.
 */
import type { ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { P256Signer, sha256Hex } from '../src/crypto/p256.ts'
import { signReceipt } from '../src/crypto/signing.ts'
import { UsageCounters } from '../console/api-keys.ts'
import { DispatchBook } from '../console/exchange/dispatch-book.ts'
import { ISSUANCE, Ledger } from '../console/exchange/ledger.ts'
import { DEFAULT_POLICY } from '../console/exchange/policy.ts'
import { openDb } from '../src/db/index.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { attestationRecord, authorizationRecord, hex32, jobRecord, putRecord } from '../src/dev/records.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { consoleOpts } from './fixture/console.ts'
import { spawnExchange } from './fixture/spawn-exchange.ts'
import { waitFor } from './fixture/wait.ts'

let net: LocalNetwork
let alice: LocalAccount
let host: LocalAccount
let market: LocalAccount
let child: ChildProcess | undefined
let opts: ReturnType<typeof consoleOpts>
const signer = P256Signer.generate()
let attestation: { uri: string; cid: string }

beforeAll(async () => {
  net = await LocalNetwork.create()
  alice = await net.createAccount('alice.test')
  host = await net.createAccount('gpu-host.test')
  market = await net.createAccount('market.test')
  attestation = await putRecord(host.agent, host.did, attestationRecord(signer))
  opts = consoleOpts(net, 'http://unused', {
    exchangeDid: market.did,
    exchangeAccount: { pdsUrl: net.pdsUrl, identifier: market.handle, password: market.password },
    settleEveryMs: 100,
    outboxRetry: { firstMs: 100, maxMs: 400 },
  })
}, 60_000)

afterAll(async () => {
  if (child && child.exitCode === null) child.kill('SIGKILL')
  await net?.close()
})

/** Starts the exchange process; resolves when it is listening. */
const start = (crashAfter?: 'decide' | 'publish'): Promise<ChildProcess> =>
  spawnExchange({ appviewDbPath: join(opts.dataDir, 'appview.sqlite'), pdsUrl: net.pdsUrl, plcUrl: net.plcUrl, console: opts }, crashAfter ? { COCORE_TEST_CRASH_AFTER: crashAfter } : {})

const exited = (p: ChildProcess) => (p.exitCode !== null || p.signalCode !== null ? Promise.resolve() : new Promise<void>((r) => p.once('exit', () => r())))

/** Enters a job in the running exchange's dispatch book as sent to `host` and completed (the requester granted tokens once). */
function dispatched(records: { auth: { uri: string; cid: string }; job: { uri: string; cid: string }; authRecord: Record<string, unknown>; jobRecord: Record<string, unknown> }) {
  const db = openDb(opts.dbPath)
  try {
    const ledger = new Ledger(db)
    ledger.post('grant', `grant:welcome:${alice.did}`, [{ account: alice.did, amount: 1_000_000 }, { account: ISSUANCE, amount: -1_000_000 }])
    const book = new DispatchBook({ db, policy: DEFAULT_POLICY, ledger, usage: new UsageCounters(db), dailyTokenLimit: 1e12 })
    const jobUri = records.job.uri
    const sizes = { inputBytes: 10_000, maxTokensOut: 20_000 }
    book.admit({ requesterDid: alice.did, model: 'llama-3-8b', records: { ...records, publish: async () => undefined }, proBono: false, ...sizes, ceiling: book.ceilingFor(sizes.inputBytes, sizes.maxTokensOut), expiresAt: records.jobRecord.expiresAt as string })
    book.dispatched(jobUri, { did: host.did, machine: 'key', recordUri: `at://${host.did}/${ids.ComputeProvider}/self`, attestationKey: Buffer.from(signer.rawPublicKey()).toString('base64') })
    book.completed(jobUri, { in: 10_000, out: 20_000 }, { chunks: 100, bytes: 20_000 })
    book.recorded(jobUri)
  } finally {
    db.$client.close()
  }
}

async function receipt(price: number) {
  const commitment = hex32()
  const authRecord = authorizationRecord(market.did)
  const auth = await putRecord(alice.agent, alice.did, authRecord)
  const record = { ...jobRecord(auth, commitment), maxTokensOut: 20_000 }
  const job = await putRecord(alice.agent, alice.did, record)
  dispatched({ auth, job, authRecord, jobRecord: record })
  const completedAt = new Date().toISOString()
  return putRecord(
    host.agent,
    host.did,
    signReceipt(
      {
        $type: ids.ComputeReceipt,
        job,
        requester: alice.did,
        model: 'llama-3-8b',
        inputCommitment: commitment,
        outputCommitment: sha256Hex('out'),
        tokens: { in: 10_000, out: 20_000 },
        startedAt: completedAt,
        completedAt,
        price: { amount: price, currency: 'CC' },
        attestation,
      },
      signer,
    ),
  )
}

/** The exchange's books and outbox, read from its database file while it is stopped. */
function books() {
  const db = openDb(opts.dbPath)
  try {
    const c = db.$client
    return {
      settled: c.prepare("SELECT receipt_uri AS uri FROM settlements WHERE outcome = 'settled'").pluck().all() as string[],
      txns: c.prepare("SELECT ref FROM ledger_txns WHERE kind = 'settlement'").pluck().all() as string[],
      outbox: c.prepare("SELECT ref, status, rkey FROM exchange_outbox WHERE ref LIKE 'settlement:%'").all() as { ref: string; status: string; rkey: string }[],
      total: c.prepare('SELECT COALESCE(SUM(amount), 0) FROM ledger_entries').pluck().get() as number,
    }
  } finally {
    db.$client.close()
  }
}

const settlementsOnRepo = async () =>
  (await market.agent.com.atproto.repo.listRecords({ repo: market.did, collection: ids.ComputeSettlement, limit: 100 })).data.records.map((r) => ({
    rkey: r.uri.split('/').pop()!,
    receipt: (r.value as { receipt: { uri: string } }).receipt.uri,
  }))

it('resumes after a kill between the decision and the publication, and between the publication and its record', async () => {
  // Killed right after the first decision was committed: nothing published yet.
  child = await start('decide')
  const first = await receipt(12)
  await exited(child)
  let b = books()
  expect(b.settled).toEqual([first.uri])
  expect(b.txns).toEqual([`settlement:${first.uri}`])
  expect(b.outbox).toMatchObject([{ status: 'pending' }])
  expect(await settlementsOnRepo()).toEqual([])

  // Restarted, and killed right after a settlement is published, before that is recorded.
  child = await start('publish')
  const second = await receipt(13)
  await exited(child)
  b = books()
  const published = (await settlementsOnRepo()).map((s) => s.rkey)
  expect(published).toHaveLength(1)
  expect(b.outbox.find((o) => o.rkey === published[0])).toMatchObject({ status: 'pending' })

  // Restarted without faults: everything published, once.
  child = await start()
  await waitFor(async () => (await settlementsOnRepo()).length === 2 && books().outbox.every((o) => o.status === 'published'), 'all published', 30_000)
  child.kill('SIGTERM')
  await exited(child)
  b = books()
  const onRepo = await settlementsOnRepo()
  expect(onRepo.map((s) => s.receipt).sort()).toEqual([first.uri, second.uri].sort())
  // At the rkeys chosen when they were decided: a re-publication rewrote, never added.
  expect(onRepo.map((s) => s.rkey).sort()).toEqual(b.outbox.map((o) => o.rkey).sort())
  expect(b.txns.sort()).toEqual([`settlement:${first.uri}`, `settlement:${second.uri}`].sort())
  expect(b.total).toBe(0)
}, 120_000)
