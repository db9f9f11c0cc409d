/**
 * Faults (issue 6 §3): the whole system as deployed (the exchange, i.e.
 * AppView + console + ledger, in one process; the reference provider agent
 * in another; the real PDS and PLC in this one) while the PDS goes down,
 * slows down and answers errors, and while the exchange and the provider are
 * killed with SIGKILL at random points and restarted; in the middle of
 * indexing, a wipe, chat jobs and their settlements.
 *
 * After recovery: the index equals the PDS's truth, the wipe completed, every
 * receipt decided exactly once (settled once on the exchange's repo and in
 * its books when the exchange relayed its job to the end; else refused as
 * job-not-completed), no balance moved twice, holds equal the open jobs, and
 * every chat request got an answer (a complete, correct reply or a clean
 * error; never silence).
 *
 * Seeded: `COCORE_FUZZ_SEED` picks the faults and their timing,
 * `COCORE_FAULT_ROUNDS` (default 7, one of each kind of fault) how many rounds run.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import Database from 'better-sqlite3'
import type { Browser } from 'playwright-core'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { ApiKeys } from '../console/api-keys.ts'
import { openDb } from '../src/db/index.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { friend, profile, putRecords } from '../src/dev/records.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { BuiltinEngine } from '../src/provider/engine.ts'
import type { ChatMessage } from '../src/protocol/input.ts'
import { cocoreCollections, listAllRecords, pdsTruth } from './fixture/appview.ts'
import { launchBrowser } from './fixture/browser.ts'
import { consoleOpts, sessionCookie, signInWithBrowser } from './fixture/console.ts'
import { fuzzConfig, rng, type Rng } from './fixture/fuzz.ts'
import { injectPdsFaults, type PdsFaults } from './fixture/pds-faults.ts'
import { freePort } from './fixture/ports.ts'
import { spawnExchange } from './fixture/spawn-exchange.ts'
import { waitFor } from './fixture/wait.ts'

const ROUNDS = Number(process.env.COCORE_FAULT_ROUNDS ?? 7)
const { seed } = fuzzConfig(0)

let net: LocalNetwork
let faults: PdsFaults
let browser: Browser
let alice: LocalAccount
let bob: LocalAccount
let rig: LocalAccount
let market: LocalAccount
let opts: ReturnType<typeof consoleOpts>
let consoleUrl: string
let appviewDbPath: string
let exchange: ChildProcess | undefined
let provider: ChildProcess | undefined
const providerKeyFile = join(mkdtempSync(join(tmpdir(), 'cocore-faults-agent-')), 'key.json')
const log: string[] = []

beforeAll(async () => {
  net = await LocalNetwork.create()
  // Before any client connects, so every connection is the faults' to cut.
  faults = injectPdsFaults(net.net.pds.server.server!)
  alice = await net.createAccount('alice.test')
  bob = await net.createAccount('bob.test')
  rig = await net.createAccount('rig.test')
  market = await net.createAccount('market.test')
  const port = await freePort()
  consoleUrl = `http://127.0.0.1:${port}`
  opts = consoleOpts(net, 'http://unused', {
    port,
    exchangeDid: market.did,
    exchangeAccount: { pdsUrl: net.pdsUrl, identifier: market.handle, password: market.password },
    settleEveryMs: 200,
    outboxRetry: { firstMs: 100, maxMs: 1_000 },
    wipeRetry: { firstMs: 100, maxMs: 1_000, giveUpAfterMs: 600_000, attemptMs: 5_000 },
    firstChunkTimeoutMs: 5_000,
    // A provider silent for three pings (3 s) is dropped, and its jobs answered with an error.
    pingIntervalMs: 1_000,
  })
  appviewDbPath = join(opts.dataDir, 'appview.sqlite')
  exchange = await startExchange()
  provider = startProvider()
  browser = await launchBrowser()
}, 120_000)

afterAll(async () => {
  faults?.set('ok')
  for (const p of [exchange, provider]) if (p && p.exitCode === null && p.signalCode === null) p.kill('SIGKILL')
  await browser?.close()
  await net?.close()
})

/** The exchange process (AppView + console + ledger); resolves once it listens. */
const startExchange = () => spawnExchange({ appviewDbPath, pdsUrl: net.pdsUrl, plcUrl: net.plcUrl, console: opts })

/** The reference provider agent (`npm run provider`), on its built-in engine. */
function startProvider(): ChildProcess {
  return spawn(
    process.execPath,
    ['scripts/provider.ts', '--pds', net.pdsUrl, '--identifier', rig.handle, '--exchange', consoleUrl, '--exchange-did', market.did, '--key-file', providerKeyFile, '--models', 'builtin', '--token-delay-ms', '15', '--log-level', 'error'],
    { env: { ...process.env, COCORE_PROVIDER_PASSWORD: rig.password }, stdio: ['ignore', 'ignore', 'inherit'] },
  )
}

async function kill(p: ChildProcess | undefined): Promise<void> {
  if (!p || p.exitCode !== null || p.signalCode !== null) return
  const gone = new Promise<void>((r) => p.once('exit', () => r()))
  p.kill('SIGKILL')
  await gone
}

/** A write of the test's own that must land whatever the PDS is going through. */
async function persist<T>(what: string, f: () => Promise<T>): Promise<T> {
  for (let i = 0; ; i++) {
    try {
      return await f()
    } catch (err) {
      if (i > 200) throw new Error(`${what}: ${(err as Error).message}`)
      await new Promise((r) => setTimeout(r, 100))
    }
  }
}

type ChatOutcome = { kind: 'ok'; text: string } | { kind: 'error'; detail: string } | { kind: 'cut'; detail: string } | { kind: 'hang' }

/**
 * One streamed chat through the OpenAI-compatible API. An answer is a
 * complete reply, an error object (as the status or as a stream event), or
 * the connection closing under a killed exchange; nothing after 90 s is a hang.
 */
async function chat(key: string, messages: ChatMessage[]): Promise<ChatOutcome> {
  const signal = AbortSignal.timeout(90_000)
  let res: Response
  try {
    res = await fetch(`${consoleUrl}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'builtin', messages, stream: true, max_tokens: 24 }),
      signal,
    })
  } catch (err) {
    return signal.aborted ? { kind: 'hang' } : { kind: 'cut', detail: (err as Error).message }
  }
  let body: string
  try {
    body = await res.text()
  } catch (err) {
    return signal.aborted ? { kind: 'hang' } : { kind: 'cut', detail: `after ${res.status}: ${(err as Error).message}` }
  }
  if (res.status !== 200) {
    let error: { code?: string } | undefined
    try {
      error = (JSON.parse(body) as { error?: { code?: string } }).error
    } catch {
      throw new Error(`HTTP ${res.status} with a body that is not JSON: ${JSON.stringify(body.slice(0, 300))}`)
    }
    expect(error?.code, `a ${res.status} carries an OpenAI error object: ${body}`).toBeTruthy()
    return { kind: 'error', detail: `${res.status} ${error!.code}` }
  }
  let text = ''
  let done = false
  for (const event of body.split('\n\n')) {
    const data = event.replace(/^data: /, '')
    if (!data) continue
    if (data === '[DONE]') {
      done = true
      continue
    }
    const chunk = JSON.parse(data) as { error?: { code?: string }; choices?: { delta?: { content?: string } }[] }
    if (chunk.error) return { kind: 'error', detail: `stream ${chunk.error.code}` }
    text += chunk.choices?.[0]?.delta?.content ?? ''
  }
  // A stream that ends without [DONE] was cut (the exchange was killed mid-reply).
  return done ? { kind: 'ok', text } : { kind: 'cut', detail: 'stream ended early' }
}

const engine = new BuiltinEngine()
const expected = (messages: ChatMessage[]) => engine.plan({ model: 'builtin', messages, maxTokens: 24, params: {} }).pieces.join('')

function readDb<T>(path: string, f: (db: Database.Database) => T): T {
  const db = new Database(path, { readonly: true })
  try {
    return f(db)
  } finally {
    db.close()
  }
}

/** The AppView's index: every record as `uri cid`. */
const indexed = () => readDb(appviewDbPath, (db) => (db.prepare('SELECT uri, cid FROM records ORDER BY uri').all() as { uri: string; cid: string }[]).map((r) => `${r.uri} ${r.cid}`))

const listAll = (repo: string, collection: string) => listAllRecords(net, repo, collection)

const FAULTS = ['pds-down', 'pds-slow', 'pds-error', 'kill-exchange', 'kill-provider', 'kill-both', 'stall-provider'] as const

/** One fault, at a moment drawn from the seed, held for a while. */
async function injectOne(r: Rng, round: number, kind: (typeof FAULTS)[number]): Promise<void> {
  await new Promise((res) => setTimeout(res, r.range(100, 1_500)))
  log.push(`round ${round}: ${kind}`)
  switch (kind) {
    case 'pds-down':
    case 'pds-error':
    case 'pds-slow':
      faults.set(kind === 'pds-down' ? 'down' : kind === 'pds-error' ? 'error' : 'slow', r.range(200, 1_500))
      await new Promise((res) => setTimeout(res, r.range(500, 3_000)))
      faults.set('ok')
      return
    case 'kill-exchange':
    case 'kill-both':
      await kill(exchange)
      if (kind === 'kill-both') await kill(provider)
      exchange = await startExchange()
      if (kind === 'kill-both') provider = startProvider()
      return
    case 'stall-provider':
      // Stopped, not gone: its connection stays open and silent until the exchange stops waiting for it.
      provider!.kill('SIGSTOP')
      await new Promise((res) => setTimeout(res, r.range(2_000, 6_000)))
      provider!.kill('SIGCONT')
      return
    case 'kill-provider':
      await kill(provider)
      await new Promise((res) => setTimeout(res, r.range(0, 1_000)))
      provider = startProvider()
  }
}

it('recovers from PDS outages, slowness and errors, and from SIGKILLs of the exchange and the provider, to a consistent state', async () => {
  const r = rng(seed)
  // Every kind of fault in each run of seven rounds, in an order drawn from the seed.
  const order = [...FAULTS].map((f) => ({ f, k: r.next() })).sort((a, b) => a.k - b.k).map((x) => x.f)
  // Sign-ins (the OAuth sessions publish job records and run the wipe), before any fault.
  const aliceCookie = await sessionCookie(await signInWithBrowser(await browser.newContext(), consoleUrl, alice.handle, alice.password))
  const bobCookie = await sessionCookie(await signInWithBrowser(await browser.newContext(), consoleUrl, bob.handle, bob.password))
  expect(aliceCookie).toBeTruthy()
  const key = (() => {
    const db = openDb(opts.dbPath)
    try {
      return new ApiKeys(db).create(alice.did, 'faults', ['inference']).secret
    } finally {
      db.$client.close()
    }
  })()
  // Bob's repo, to be wiped under faults.
  await putRecords(bob.agent, bob.did, [profile('bob'), ...Array.from({ length: 150 }, () => friend(alice.did))])
  await waitFor(async () => (await chat(key, [{ role: 'user', content: 'ready?' }])).kind === 'ok', 'a first chat through the provider', 60_000)

  const outcomes: { messages: ChatMessage[]; outcome: ChatOutcome }[] = []
  let wipeLocation: string | null = null
  for (let round = 0; round < ROUNDS; round++) {
    const rr = r.fork()
    const work: Promise<unknown>[] = []
    // The fault, after a random delay, while chats stream (a reply takes ~0.4 s) and records change.
    let faulted = false
    work.push(injectOne(rr, round, order[round % order.length]!).finally(() => (faulted = true)))
    for (let w = 0; w < 3; w++) {
      work.push(
        (async () => {
          for (let i = 0; !faulted || i < 1; i++) {
            const messages: ChatMessage[] = [{ role: 'user', content: `round ${round} worker ${w} chat ${i}: ${rr.int(1e9)}` }]
            const outcome = await chat(key, messages)
            outcomes.push({ messages, outcome })
            // Refused at once while something is down: pace the retries as a client would.
            if (outcome.kind !== 'ok') await new Promise((res) => setTimeout(res, 100))
          }
        })(),
      )
    }
    // Indexing: Alice's records come and go.
    work.push(
      persist('alice writes', () => putRecords(alice.agent, alice.did, Array.from({ length: 10 }, () => friend(rig.did)))).then(async (refs) => {
        for (const ref of refs.filter(() => rr.chance(0.4))) {
          await persist('alice deletes', () => alice.agent.com.atproto.repo.deleteRecord({ repo: alice.did, collection: ids.AccountFriend, rkey: ref.uri.split('/').pop()! }))
        }
      }),
    )
    // The wipe starts in the first round, under whatever fault comes.
    if (round === 0) {
      work.push(
        persist('start the wipe', async () => {
          const res = await fetch(`${consoleUrl}/account/wipe`, {
            method: 'POST',
            redirect: 'manual',
            headers: { cookie: bobCookie, origin: consoleUrl, 'content-type': 'application/x-www-form-urlencoded' },
            body: new URLSearchParams({ confirm: `wipe ${bob.handle}` }),
          })
          if (res.status !== 303) throw new Error(`wipe answered ${res.status}`)
          wipeLocation = res.headers.get('location')
        }),
      )
    }
    await Promise.all(work)
    // The next round starts once the provider is back (a killed one takes a few seconds to reconnect).
    await waitFor(async () => (await chat(key, [{ role: 'user', content: 'back?' }])).kind === 'ok', `round ${round}: serving again`, 90_000)
  }
  faults.set('ok')

  // Every request was answered; the replies that completed are the engine's, whole.
  expect(outcomes.filter((o) => o.outcome.kind === 'hang'), log.join('; ')).toEqual([])
  for (const { messages, outcome } of outcomes) if (outcome.kind === 'ok') expect(outcome.text).toBe(expected(messages))
  const kinds = outcomes.map((o) => o.outcome.kind)
  expect(kinds.filter((k) => k === 'ok').length).toBeGreaterThan(0)
  // And after recovery the system serves again.
  await waitFor(async () => (await chat(key, [{ role: 'user', content: 'after' }])).kind === 'ok', 'a chat after recovery', 60_000)

  // The wipe completed: nothing of ours left on Bob's PDS, and its job says done.
  expect(wipeLocation).toMatch(/^\/wipe\//)
  const wipeId = wipeLocation!.split('/').pop()!
  await waitFor(() => readDb(opts.dbPath, (db) => db.prepare("SELECT status FROM wipe_jobs WHERE id = ? AND status = 'done'").pluck().get(wipeId)), 'the wipe finished', 120_000)
  for (const c of await cocoreCollections(net, bob.did)) expect(await listAll(bob.did, c), c).toEqual([])

  // Every receipt the provider published is decided once: settled (once on the exchange's repo and in its
  // books) when the exchange relayed its job to the end and published its records; otherwise refused, the
  // job having failed (its records not written, the provider failing, or the exchange killed mid-job).
  // (Stable for a second: the last chats' receipts may still be on their way.)
  const decisions = () => readDb(opts.dbPath, (db) => db.prepare('SELECT receipt_uri AS uri, outcome, finding_code AS code FROM settlements ORDER BY receipt_uri').all() as { uri: string; outcome: string; code: string | null }[])
  const settledState = async () => ({
    receipts: await listAll(rig.did, ids.ComputeReceipt),
    settled: (await listAll(market.did, ids.ComputeSettlement)).map((x) => (x.value.receipt as { uri: string }).uri).sort(),
    decided: decisions(),
  })
  let seen: Awaited<ReturnType<typeof settledState>> | null = null
  const { receipts: receiptRecords, settled, decided } = await waitFor(
    async () => {
      const before = await settledState()
      await new Promise((res) => setTimeout(res, 1_000))
      const after = (seen = await settledState())
      const uris = after.receipts.map((x) => x.uri).sort()
      const settledRows = after.decided.filter((d) => d.outcome === 'settled').map((d) => d.uri)
      const stable = JSON.stringify(before) === JSON.stringify(after)
      return uris.length > 0 && stable && JSON.stringify(after.decided.map((d) => d.uri)) === JSON.stringify(uris) && JSON.stringify(after.settled) === JSON.stringify(settledRows) ? after : null
    },
    'every receipt decided, and every settlement published',
    120_000,
  ).catch((err: Error) => {
    // What was still undecided or unpublished, for the failure's message.
    const decidedUris = new Set(seen?.decided.map((d) => d.uri))
    const undecided = seen?.receipts.filter((r) => !decidedUris.has(r.uri)).map((r) => r.uri)
    throw new Error(`${err.message}; undecided ${JSON.stringify(undecided)}; decided ${JSON.stringify(seen?.decided)}; published ${seen?.settled.length}`)
  })
  const receipts = receiptRecords.map((x) => x.uri).sort()
  expect(decided.map((d) => d.uri)).toEqual(receipts)
  for (const d of decided.filter((x) => x.outcome === 'refused')) expect(d.code, d.uri).toBe('job-not-completed')
  const settledUris = decided.filter((d) => d.outcome === 'settled').map((d) => d.uri)
  expect(settledUris.length).toBeGreaterThan(0)
  // Alice is charged only for jobs she authorized: each settled receipt's job record, and the authorization
  // it cites, are on her PDS.
  const jobs = new Map((await listAll(alice.did, ids.ComputeJob)).map((j) => [j.uri, j.value]))
  const auths = new Set((await listAll(alice.did, ids.ComputePaymentAuthorization)).map((a) => a.uri))
  for (const rec of receiptRecords.filter((r) => settledUris.includes(r.uri))) {
    const job = jobs.get((rec.value.job as { uri: string }).uri)
    expect(job, `the job of ${rec.uri}`).toBeDefined()
    expect(auths.has((job!.paymentAuthorization as { uri: string }).uri)).toBe(true)
  }
  expect(settled).toEqual(settledUris)
  const books = readDb(opts.dbPath, (db) => ({
    rows: db.prepare("SELECT receipt_uri AS uri, amount, fee FROM settlements WHERE outcome = 'settled' ORDER BY receipt_uri").all() as { uri: string; amount: number; fee: number }[],
    txns: db.prepare("SELECT ref FROM ledger_txns WHERE kind = 'settlement' ORDER BY ref").pluck().all() as string[],
    unbalanced: db.prepare('SELECT txn_id FROM ledger_entries GROUP BY txn_id HAVING SUM(amount) != 0').pluck().all(),
    aliceBalance: db.prepare('SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE account = ?').pluck().get(alice.did) as number,
    grants: db.prepare("SELECT COALESCE(SUM(e.amount), 0) FROM ledger_entries e JOIN ledger_txns t ON t.id = e.txn_id WHERE t.kind != 'settlement' AND e.account = ?").pluck().get(alice.did) as number,
    held: db.prepare('SELECT COALESCE(SUM(held), 0) FROM ledger_balances').pluck().get() as number,
    holds: db.prepare('SELECT COALESCE(SUM(hold), 0) FROM exchange_jobs').pluck().get() as number,
  }))
  expect(books.rows.map((x) => x.uri)).toEqual(settledUris)
  expect(books.txns.length).toBe(settledUris.length)
  expect(new Set(books.txns).size).toBe(books.txns.length)
  expect(books.unbalanced).toEqual([])
  expect(books.held).toBe(books.holds)
  // Alice paid each settled job once: her balance is what she was granted less the charges.
  const charged = books.rows.reduce((s, x) => s + x.amount, 0)
  expect(books.aliceBalance).toBe(books.grants - charged)

  // The index equals the PDS's truth.
  const dids = [alice.did, bob.did, rig.did, market.did]
  const truth = await pdsTruth(net, dids)
  await waitFor(() => JSON.stringify(indexed()) === JSON.stringify(truth), 'the index caught up with the PDS', 120_000).catch(() => undefined)
  expect(indexed()).toEqual(truth)
  const details: Record<string, number> = {}
  for (const { outcome: o } of outcomes) if (o.kind === 'error' || o.kind === 'cut') details[`${o.kind}: ${o.detail}`] = (details[`${o.kind}: ${o.detail}`] ?? 0) + 1
  console.log(
    `faults: seed ${seed}, ${ROUNDS} rounds: ${log.join('; ')}\nchats ${kinds.length}: ok ${kinds.filter((k) => k === 'ok').length}, ${JSON.stringify(details)}\nPDS requests met by each mode: ${JSON.stringify(faults.met)}; receipts ${receipts.length}, settled ${settledUris.length}`,
  )
}, 900_000)
