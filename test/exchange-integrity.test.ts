/**
 * Exchange integrity: dishonest providers, requesters and bystanders against
 * the real exchange on the real local network (PLC, PDS, firehose, AppView,
 * the console's ledger). One case per attack; in each, only the honest
 * settlement moves tokens. The policy here prices a token at 1 (in) and 2
 * (out) so that every lie is worth something.
 */
import { request } from 'node:http'
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { AppView } from '../appview/index.ts'
import { ApiKeys } from '../console/api-keys.ts'
import type { ConsoleService } from '../console/index.ts'
import { MAX_QUEUED_STEPS } from '../console/exchange/exchange.ts'
import { sha256Hex } from '../src/crypto/p256.ts'
import { signReceipt } from '../src/crypto/signing.ts'
import type { LocalAccount } from '../src/dev/network.ts'
import { putRecord } from '../src/dev/records.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { InferenceRequestFrame } from '../src/protocol/agent.ts'
import { constraintHashes } from '../src/protocol/job-constraints.ts'
import { signInWithBrowser } from './fixture/console.ts'
import { connectScripted, publishScriptedRecord, writeReceipt, type Behaviour, type ScriptedProvider, type ScriptedRecord } from './fixture/scripted-provider.ts'
import { settlingExchange, startStack, type Stack } from './fixture/stack.ts'
import { waitFor } from './fixture/wait.ts'

const POLICY = { grant: 5_000, floor: 100, tokenRate: { inputPerMTok: 1_000_000, outputPerMTok: 2_000_000 } }
/** What the scripted 'reply' provider reports: 7 in, one out per piece (4 pieces). */
const HONEST = { in: 7, out: 4 }
const honestPrice = HONEST.in + 2 * HONEST.out
const FLOOD_CHUNKS = 8_000

let stack: Stack
let av: AppView
let svc: ConsoleService
let alice: LocalAccount
let bob: LocalAccount
let carl: LocalAccount
let market: LocalAccount
let mallory: LocalAccount
const keys: Record<string, string> = {}

interface Machine {
  acct: LocalAccount
  published: ScriptedRecord
  p: ScriptedProvider
}
const machines: Record<string, Machine> = {}

type ConnectOpts = Partial<Parameters<typeof connectScripted>[4]> & { attestationClaims?: Record<string, unknown> }

async function machine(handle: string, model: string, behaviour: Behaviour, extra: Record<string, unknown> = {}, opts: ConnectOpts = {}): Promise<Machine> {
  const acct = await stack.net.createAccount(handle)
  return connectMachine(acct, model, behaviour, extra, opts)
}

async function connectMachine(acct: LocalAccount, model: string, behaviour: Behaviour, extra: Record<string, unknown> = {}, { attestationClaims, ...opts }: ConnectOpts = {}): Promise<Machine> {
  const published = await publishScriptedRecord(acct, model, extra, { attestation: true, attestationClaims })
  await waitFor(() => av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(published.attestation!.uri), `${acct.handle} records indexed`)
  const p = await connectScripted(svc.localUrl.replace('http', 'ws'), acct, market.did, published, { behaviour, models: [model], ...opts })
  return { acct, published, p }
}

const client = (who: LocalAccount, tier = '') => new OpenAI({ baseURL: `${svc.url}/v1${tier}`, apiKey: keys[who.did]!, maxRetries: 0 })
type Cocore = { cocore: { provider: string; job: string; receipt: string | null } }
const chat = async (who: LocalAccount, model: string, extra: Record<string, unknown> = {}, tier = '') =>
  (await client(who, tier).chat.completions.create({ model, messages: [{ role: 'user', content: `hello ${model}` }], max_tokens: 64, ...extra } as never)) as unknown as OpenAI.ChatCompletion & Cocore
const requestOf = (m: Machine, jobUri: string) => m.p.requests.find((r) => r.job_uri === jobUri)!
const economy = () => svc.economy!
const ledger = () => economy().ledger
const book = () => svc.exchange!.book
const decision = (receiptUri: string) => svc.db.$client.prepare('SELECT * FROM settlements WHERE receipt_uri = ?').get(receiptUri) as Record<string, unknown> | undefined
const decided = (receiptUri: string) => waitFor(() => decision(receiptUri), `${receiptUri} decided`)
const indexed = (uri: string) => waitFor(() => av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(uri), `${uri} indexed`)
const jobRecordOf = async (jobUri: string) => {
  const [, , did, collection, rkey] = jobUri.split('/')
  return (await alice.agent.com.atproto.repo.getRecord({ repo: did!, collection: collection!, rkey: rkey! })).data.value as Record<string, any>
}

/** The books after every case: zero-sum, nothing below zero, holds matching open jobs. */
function checkBooks() {
  const l = ledger()
  expect(l.total()).toBe(0)
  expect(l.unbalanced()).toEqual([])
  expect(l.drift()).toEqual([])
  expect(l.heldTotal()).toBe(book().holdsTotal())
  const below = svc.db.$client.prepare("SELECT account FROM ledger_balances WHERE substr(account, 1, 1) != '@' AND (balance < 0 OR balance - held < 0)").all()
  expect(below).toEqual([])
  // Each dispatched job paid at most once, only to the provider it was sent to, never beyond its ceiling.
  const paid = svc.db.$client
    .prepare("SELECT s.job_uri AS job, COUNT(*) AS n, MAX(s.provider_did = j.provider_did) AS toDispatched, MAX(s.amount <= j.ceiling) AS withinCeiling FROM settlements s JOIN exchange_jobs j ON j.job_uri = s.job_uri WHERE s.outcome = 'settled' GROUP BY s.job_uri")
    .all() as { n: number; toDispatched: number; withinCeiling: number }[]
  for (const p of paid) expect(p).toMatchObject({ n: 1, toDispatched: 1, withinCeiling: 1 })
}

beforeAll(async () => {
  stack = await startStack({
    accounts: ['alice.test', 'bob.test', 'carl.test', 'market.test', 'mallory.test'],
    console: ([, , , market], av, net) => settlingExchange(market, av, net, { policy: POLICY, firstChunkTimeoutMs: 3000 }),
  })
  ;({ av, svc } = stack)
  ;[alice, bob, carl, market, mallory] = stack.accounts as LocalAccount[] as [LocalAccount, LocalAccount, LocalAccount, LocalAccount, LocalAccount]
  for (const who of [alice, bob, carl]) {
    // Signing in gives the OAuth session that publishes job records, and the welcome grant.
    await (await signInWithBrowser(stack.browser, svc.url, who.handle, who.password)).close()
    keys[who.did] = new ApiKeys(svc.db).create(who.did, 'sdk', ['inference']).secret
  }
  machines.rig = await machine('rig.test', 'honest-1', 'reply')
  machines.inflater = await machine('inflater.test', 'inflate-1', 'reply', {}, { reported: { tokens_in: 7, tokens_out: 500_000_000 } })
  machines.slow = await machine('slow.test', 'slow-1', 'slow')
  // 32 MB of reply: more than loopback's socket buffers hold, so a client that does not read holds it back.
  machines.flood = await machine('flood.test', 'flood-1', 'flood', {}, { floodChunks: FLOOD_CHUNKS, floodChunkBytes: 4096 })
  machines.dropper = await machine('dropper.test', 'drop-1', 'drop-after-first')
  machines.giver = await machine('giver.test', 'give-1', 'reply', { proBono: { mode: 'any' } })
  machines.attested = await machine('claims.test', 'claim-1', 'reply', { trustLevel: 'hardware-attested', tier: 'attested-confidential' }, { attestationClaims: { secureEnclaveAvailable: true, sipEnabled: true, secureBootEnabled: true } })
}, 180_000)

afterAll(async () => {
  for (const m of Object.values(machines)) m.p.close()
  await stack?.close()
})

describe('the honest path', () => {
  it('settles the dispatched provider receipt within the relayed counts; the hold is released', async () => {
    const before = ledger().balance(alice.did)
    const res = await chat(alice, 'honest-1')
    expect(res.usage).toMatchObject({ prompt_tokens: HONEST.in, completion_tokens: HONEST.out })
    const row = book().get(res.cocore.job)!
    expect(row).toMatchObject({ providerDid: machines.rig!.acct.did, state: 'completed', reportedIn: HONEST.in, reportedOut: HONEST.out, relayedChunks: 4 })
    expect(row.attestationKey).toBe(machines.rig!.published.record.attestationPubKey)
    expect(ledger().held(alice.did)).toBe(row.ceiling)
    const receipt = await writeReceipt(machines.rig!.acct, machines.rig!.published, requestOf(machines.rig!, res.cocore.job), { tokens: HONEST, price: honestPrice })
    expect(await decided(receipt.uri)).toMatchObject({ finding_code: null, outcome: 'settled', amount: honestPrice, provider_did: machines.rig!.acct.did, job_uri: res.cocore.job })
    expect(ledger().balance(alice.did)).toBe(before - honestPrice)
    expect(ledger().held(alice.did)).toBe(0)
    expect(book().get(res.cocore.job)!.state).toBe('settled')
    checkBooks()
  })
})

describe('a dishonest provider', () => {
  it("is refused when it claims someone else's job, and the provider that did the work is paid", async () => {
    const res = await chat(alice, 'honest-1')
    // Mallory never connected: a self-signed attestation and a receipt copying the public job record.
    const published = await publishScriptedRecord(mallory, 'honest-1', {}, { attestation: true })
    const job = await jobRecordOf(res.cocore.job)
    const req = { job_uri: res.cocore.job, job_cid: book().get(res.cocore.job)!.jobCid, requester_did: alice.did, input_commitment: job.inputCommitment, model: 'honest-1' } as InferenceRequestFrame
    const forged = await writeReceipt(mallory, published, req, { tokens: { in: 100, out: 100 }, price: 250 })
    expect(await decided(forged.uri)).toMatchObject({ outcome: 'refused', finding_code: 'not-dispatched-provider' })
    const before = ledger().balance(alice.did)
    const honest = await writeReceipt(machines.rig!.acct, machines.rig!.published, requestOf(machines.rig!, res.cocore.job), { tokens: HONEST, price: honestPrice })
    expect(await decided(honest.uri)).toMatchObject({ outcome: 'settled', amount: honestPrice })
    expect(ledger().balance(alice.did)).toBe(before - honestPrice)
    expect(ledger().balance(mallory.did)).toBe(0)
    checkBooks()
  })

  it('is refused when its token counts exceed what was relayed or what the job allowed, and nothing moves', async () => {
    const before = ledger().balance(alice.did)
    // It reported 500M output tokens for 4 chunks: the exchange's own count bounds it.
    const res = await chat(alice, 'inflate-1')
    const row = book().get(res.cocore.job)!
    expect(row.reportedOut).toBe(500_000_000)
    const inflater = machines.inflater!
    const big = await writeReceipt(inflater.acct, inflater.published, requestOf(inflater, res.cocore.job), { tokens: { in: 7, out: 500_000_000 }, price: row.ceiling })
    expect(await decided(big.uri)).toMatchObject({ outcome: 'refused', finding_code: 'tokens-out-over-relayed' })
    // Its hold is released: the job is over.
    expect(book().get(res.cocore.job)!.state).toBe('refused')
    // An honest count for a lying input count is refused too (the exchange counted the prompt's bytes).
    const res2 = await chat(alice, 'honest-1')
    const inBig = await writeReceipt(machines.rig!.acct, machines.rig!.published, requestOf(machines.rig!, res2.cocore.job), { tokens: { in: 100_000, out: 4 }, price: 200 })
    expect(await decided(inBig.uri)).toMatchObject({ outcome: 'refused', finding_code: 'tokens-in-over-counted' })
    // Within the counts but over the ceiling held, or over the policy's rate.
    const res3 = await chat(alice, 'honest-1')
    const over = await writeReceipt(machines.rig!.acct, machines.rig!.published, requestOf(machines.rig!, res3.cocore.job), { tokens: HONEST, price: honestPrice + 1 })
    expect(await decided(over.uri)).toMatchObject({ outcome: 'refused', finding_code: 'over-token-rate' })
    expect(ledger().balance(alice.did)).toBe(before)
    expect(ledger().held(alice.did)).toBe(0)
    checkBooks()
  })

  it('is paid once per job however many receipts it writes, and not for a job it failed', async () => {
    const res = await chat(alice, 'honest-1')
    const req = requestOf(machines.rig!, res.cocore.job)
    const first = await writeReceipt(machines.rig!.acct, machines.rig!.published, req, { tokens: HONEST, price: honestPrice })
    expect(await decided(first.uri)).toMatchObject({ outcome: 'settled' })
    const second = await writeReceipt(machines.rig!.acct, machines.rig!.published, req, { tokens: HONEST, price: honestPrice })
    expect(await decided(second.uri)).toMatchObject({ outcome: 'refused', finding_code: 'job-already-decided' })
    // Dropped after its first chunk: the requester got an error, the provider gets nothing.
    const err = await chat(alice, 'drop-1').catch((e) => e)
    expect(err).toMatchObject({ status: 502, code: 'provider_failed' })
    const dropper = machines.dropper!
    const failedReq = dropper.p.requests.at(-1)!
    expect(book().get(failedReq.job_uri)).toMatchObject({ state: 'failed', hold: 0 })
    const late = await writeReceipt(dropper.acct, dropper.published, failedReq, { tokens: { in: 7, out: 1 }, price: 9 })
    expect(await decided(late.uri)).toMatchObject({ outcome: 'refused', finding_code: 'job-not-completed' })
    checkBooks()
  })

  it('is refused when its receipt names other constraints than the job carried (structured output)', async () => {
    const schema = { type: 'object', properties: { answer: { type: 'string' } } }
    const res = await chat(alice, 'honest-1', { response_format: { type: 'json_schema', json_schema: { name: 'a', schema } } })
    const req = requestOf(machines.rig!, res.cocore.job)
    expect(req.output_schema).toMatchObject({ name: 'a', schema })
    const other = await writeReceipt(machines.rig!.acct, machines.rig!.published, req, { tokens: HONEST, price: honestPrice, params: { outputSchemaHash: sha256Hex('{"type":"array"}') } })
    expect(await decided(other.uri)).toMatchObject({ outcome: 'refused', finding_code: 'constraints-mismatch' })
    // The right hash settles (a second job: the first is decided).
    const res2 = await chat(alice, 'honest-1', { response_format: { type: 'json_schema', json_schema: { name: 'a', schema } } })
    const req2 = requestOf(machines.rig!, res2.cocore.job)
    const right = await writeReceipt(machines.rig!.acct, machines.rig!.published, req2, { tokens: HONEST, price: honestPrice, params: constraintHashes({ outputSchema: req2.output_schema }) })
    expect(await decided(right.uri)).toMatchObject({ outcome: 'settled' })
    checkBooks()
  })

  it('cannot charge for a pro bono job', async () => {
    const before = ledger().balance(alice.did)
    const res = await chat(alice, 'give-1', {}, '/probono')
    expect(book().get(res.cocore.job)).toMatchObject({ proBono: true, ceiling: 0, hold: 0 })
    const giver = machines.giver!
    const charged = await writeReceipt(giver.acct, giver.published, requestOf(giver, res.cocore.job), { tokens: HONEST, price: 0, proBono: false })
    expect(await decided(charged.uri)).toMatchObject({ outcome: 'refused', finding_code: 'pro-bono-charged' })
    expect(ledger().balance(alice.did)).toBe(before)
    checkBooks()
  })

  it('is never offered on the verified tier on its own word (a record claiming hardware attestation, an attestation claiming a Secure Enclave key), even live-challenged and countersigned', async () => {
    const claims = machines.attested!
    expect(await chat(alice, 'claim-1', {}, '/verified').catch((e) => e)).toMatchObject({ status: 503, code: 'verified_tier_unavailable' })
    expect(claims.p.requests).toHaveLength(0)
    // Everything this exchange can check of it holds: it answered its challenge, and its jobs on the default tier are countersigned.
    await chat(alice, 'claim-1')
    expect(claims.p.requests).toHaveLength(1)
    expect(claims.p.requests[0]!.brokerage_countersignature).toMatchObject({ authority: svc.brokerage!.did })
    expect(await chat(alice, 'claim-1', {}, '/verified').catch((e) => e)).toMatchObject({ status: 503, code: 'verified_tier_unavailable' })
    expect(claims.p.requests).toHaveLength(1)
  })

  it('cannot grow the exchange memory by flooding a requester that does not read: the job ends and the provider is told to stop', async () => {
    const flood = machines.flood!
    const body = JSON.stringify({ model: 'flood-1', messages: [{ role: 'user', content: 'flood me' }], stream: true, max_tokens: 1_000 })
    // A client that sends its request and then never reads the answer.
    const req = request(`${svc.url}/v1/chat/completions`, { method: 'POST', headers: { authorization: `Bearer ${keys[alice.did]}`, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } })
    const status = new Promise<{ code: number; body: string }>((resolve) =>
      req.on('response', (res) => {
        if (res.statusCode === 200) return res.pause(), resolve({ code: 200, body: '' })
        let text = ''
        res.on('data', (d: Buffer) => (text += d.toString())).on('end', () => resolve({ code: res.statusCode!, body: text }))
      }),
    )
    req.end(body)
    expect(await status).toMatchObject({ code: 200 })
    const session = await waitFor(() => flood.p.requests.at(-1)?.session_id, 'job sent')
    await waitFor(() => flood.p.cancels.includes(session), 'job cancelled at the provider', 30_000)
    // The stream ends when the client goes (it never reads); the job is then over, cancelled mid-reply.
    req.destroy()
    const jobUri = flood.p.requests.at(-1)!.job_uri
    const row = await waitFor(() => (book().get(jobUri)!.state === 'cancelled' ? book().get(jobUri) : null), 'job ended')
    // It relayed what the requester's socket took before it stopped reading, far less than what was sent.
    expect(row.relayedChunks).toBeLessThan(FLOOD_CHUNKS - MAX_QUEUED_STEPS)
    checkBooks()
  })
})

describe('a dishonest requester', () => {
  it('cannot avoid paying with its own zero-price receipt', async () => {
    const res = await chat(bob, 'honest-1')
    const job = book().get(res.cocore.job)!
    // Bob publishes a receipt for his own job from his own repo, as if he were the provider (a self-loop).
    const published = await publishScriptedRecord(bob, 'honest-1', {}, { attestation: true })
    const req = requestOf(machines.rig!, res.cocore.job)
    const own = await writeReceipt(bob, published, req, { tokens: { in: 0, out: 0 }, price: 0 })
    expect(await decided(own.uri)).toMatchObject({ outcome: 'refused', finding_code: 'not-dispatched-provider' })
    const before = { bob: ledger().balance(bob.did), treasury: ledger().balance(market.did) }
    const honest = await writeReceipt(machines.rig!.acct, machines.rig!.published, req, { tokens: HONEST, price: honestPrice })
    const row = await decided(honest.uri)
    expect(row).toMatchObject({ outcome: 'settled', amount: honestPrice })
    expect(ledger().balance(bob.did)).toBe(before.bob - honestPrice)
    // Not a self-loop: the fee is charged.
    expect(ledger().balance(market.did)).toBe(before.treasury + (row.fee as number))
    expect(job.providerDid).toBe(machines.rig!.acct.did)
    checkBooks()
  })

  it('cannot strand the provider by deleting the job and authorization after the work', async () => {
    const res = await chat(bob, 'honest-1')
    const row = book().get(res.cocore.job)!
    for (const uri of [row.jobUri, row.authUri]) {
      const [, , , collection, rkey] = uri.split('/')
      await bob.agent.com.atproto.repo.deleteRecord({ repo: bob.did, collection: collection!, rkey: rkey! })
    }
    await waitFor(() => !av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(row.jobUri), 'job record gone from the index')
    const before = ledger().balance(bob.did)
    const receipt = await writeReceipt(machines.rig!.acct, machines.rig!.published, requestOf(machines.rig!, res.cocore.job), { tokens: HONEST, price: honestPrice })
    expect(await decided(receipt.uri)).toMatchObject({ outcome: 'settled', amount: honestPrice })
    expect(ledger().balance(bob.did)).toBe(before - honestPrice)
    checkBooks()
  })

  it('gets its ceiling from the policy: a larger one is clamped, a zero one is refused outside pro bono', async () => {
    const sdk = (priceCeiling: unknown) =>
      fetch(`${svc.url}/xrpc/${ids.InferenceDispatch}`, {
        method: 'POST',
        headers: { authorization: `Bearer ${keys[bob.did]}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'honest-1', prompt: 'ceiling', maxTokensOut: 32, priceCeiling }),
      })
    const zero = await sdk({ amount: 0, currency: 'CC' })
    expect(zero.status).toBe(400)
    expect(await zero.json()).toMatchObject({ error: 'InvalidCeiling' })
    const huge = await sdk({ amount: 1_000_000_000, currency: 'CC' })
    expect(huge.status).toBe(200)
    const meta = /event: meta\ndata: (.*)\n/.exec(await huge.text())![1]!
    const jobUri = (JSON.parse(meta) as { jobUri: string }).jobUri
    const row = book().get(jobUri)!
    expect(row.ceiling).toBe(book().ceilingFor(row.inputBytes, 32))
    expect(row.ceiling).toBeLessThan(1_000)
    await waitFor(() => book().get(jobUri)!.recorded, 'job records published')
    expect((await jobRecordOf(jobUri)).priceCeiling).toEqual({ amount: row.ceiling, currency: 'CC' })
  })

  it('cannot commit more than its balance with jobs started at once; holds come back at the deadline', async () => {
    const available = ledger().available(carl.did)
    const ceiling = book().ceilingFor(200, 1_000)
    const fits = Math.floor((available - POLICY.floor) / ceiling) + 1
    const n = fits + 4
    const acs = Array.from({ length: n }, () => new AbortController())
    const started = acs.map((ac) =>
      client(carl)
        .chat.completions.create({ model: 'slow-1', messages: [{ role: 'user', content: 'x' }], max_tokens: 1_000, stream: true }, { signal: ac.signal })
        .then(async (s) => {
          for await (const _ of s) break
          return 'admitted'
        })
        .catch((e: { status?: number; code?: string }) => (e.status === 429 && e.code === 'insufficient_quota' ? 'refused' : `other ${String(e.code ?? e)}`)),
    )
    const outcomes = await Promise.all(started)
    expect(outcomes.filter((o) => o === 'admitted').length).toBeGreaterThanOrEqual(1)
    expect(outcomes.filter((o) => o === 'admitted').length).toBeLessThanOrEqual(fits)
    expect(outcomes.filter((o) => o === 'refused').length).toBeGreaterThanOrEqual(n - fits)
    expect(outcomes.every((o) => o === 'admitted' || o === 'refused')).toBe(true)
    expect(ledger().available(carl.did)).toBeGreaterThanOrEqual(0)
    expect(ledger().held(carl.did)).toBeLessThanOrEqual(ledger().balance(carl.did))
    for (const ac of acs) ac.abort()
    await waitFor(() => !svc.db.$client.prepare("SELECT 1 FROM exchange_jobs WHERE requester_did = ? AND state IN ('admitted', 'running')").get(carl.did), 'jobs ended')
    // Cancelled mid-reply: the holds stay for a receipt until the deadline, then come back.
    expect(ledger().held(carl.did)).toBeGreaterThan(0)
    book().expire(Date.now() + 3 * 3600_000)
    expect(ledger().held(carl.did)).toBe(0)
    checkBooks()
  })
})

describe('self-loops', () => {
  it('are fee-free only when the exchange sent the job to the requester own machine', async () => {
    const self = await stack.net.createAccount('selfie.test')
    await (await signInWithBrowser(stack.browser, svc.url, self.handle, self.password)).close()
    keys[self.did] = new ApiKeys(svc.db).create(self.did, 'sdk', ['inference']).secret
    const m = await connectMachine(self, 'self-1', 'reply')
    machines.self = m
    const before = { self: ledger().balance(self.did), treasury: ledger().balance(market.did) }
    const res = await chat(self, 'self-1')
    const receipt = await writeReceipt(self, m.published, requestOf(m, res.cocore.job), { tokens: HONEST, price: honestPrice })
    expect(await decided(receipt.uri)).toMatchObject({ outcome: 'settled', amount: honestPrice, fee: 0 })
    expect(ledger().balance(self.did)).toBe(before.self)
    expect(ledger().balance(market.did)).toBe(before.treasury)
    checkBooks()
  })
})

describe('a bystander', () => {
  it('is refused for a job this exchange never dispatched, even one whose authorization names it', async () => {
    const published = await publishScriptedRecord(mallory, 'honest-1', {}, { attestation: true })
    const auth = await putRecord(mallory.agent, mallory.did, {
      $type: ids.ComputePaymentAuthorization,
      exchange: market.did,
      ceiling: { amount: 1000, currency: 'CC' },
      scope: 'singleJob',
      nonce: 'n'.repeat(32),
      expiresAt: new Date(Date.now() + 3600_000).toISOString(),
      createdAt: new Date().toISOString(),
    })
    const commitment = sha256Hex('x')
    const job = await putRecord(mallory.agent, mallory.did, {
      $type: ids.ComputeJob,
      model: 'honest-1',
      inputCommitment: commitment,
      maxTokensOut: 10,
      priceCeiling: { amount: 1000, currency: 'CC' },
      acceptedTrustLevel: 'self-attested',
      paymentAuthorization: auth,
      nonce: 'm'.repeat(32),
      expiresAt: new Date(Date.now() + 3600_000).toISOString(),
      createdAt: new Date().toISOString(),
    })
    await indexed(job.uri)
    const receipt = await putRecord(
      mallory.agent,
      mallory.did,
      signReceipt(
        {
          $type: ids.ComputeReceipt,
          job,
          requester: mallory.did,
          model: 'honest-1',
          inputCommitment: commitment,
          outputCommitment: sha256Hex('y'),
          tokens: { in: 1, out: 1 },
          startedAt: new Date(Date.now() - 1000).toISOString(),
          completedAt: new Date().toISOString(),
          price: { amount: 3, currency: 'CC' },
          attestation: published.attestation!,
        },
        published.signer,
      ),
    )
    expect(await decided(receipt.uri)).toMatchObject({ outcome: 'refused', finding_code: 'job-not-dispatched' })
    expect(ledger().balance(mallory.did)).toBe(0)
    checkBooks()
  })
})
