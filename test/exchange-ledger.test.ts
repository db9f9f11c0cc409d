/**
 * Settlement: the exchange's policy published once, welcome grants on first
 * sign-in only, the admission floor, and the pipeline from an indexed receipt
 * to a signed settlement on the exchange's repo that the AppView verifies,
 * with the ledger's books summing to zero. Real PDS, real firehose, real
 * AppView; receipts from the reference agent, and crafted ones (signed in the
 * reference format) for jobs the exchange never dispatched. The attacks on
 * dispatched jobs are in exchange-integrity.test.ts.
 */
import { createServer, connect, type Server, type Socket } from 'node:net'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import type { Browser } from 'playwright-core'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { AppView } from '../appview/index.ts'
import { ApiKeys } from '../console/api-keys.ts'
import { ISSUANCE } from '../console/exchange/ledger.ts'
import { Settler } from '../console/exchange/settlement.ts'
import type { ConsoleService } from '../console/index.ts'
import { P256Signer, sha256Hex } from '../src/crypto/p256.ts'
import { signReceipt } from '../src/crypto/signing.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { attestationRecord, authorizationRecord, hex32, jobRecord, putRecord } from '../src/dev/records.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { ProviderAgent } from '../src/provider/agent.ts'
import { startAppView, tempDbPath } from './fixture/appview.ts'
import { launchBrowser } from './fixture/browser.ts'
import { signInWithBrowser, startTestConsole } from './fixture/console.ts'
import { waitFor } from './fixture/wait.ts'
import { startBuiltinAgent } from './fixture/agent.ts'

let net: LocalNetwork
let av: AppView
let svc: ConsoleService
let browser: Browser
let alice: LocalAccount
let bob: LocalAccount
let host: LocalAccount
let market: LocalAccount
let souk: LocalAccount
let agentHost: LocalAccount
let agent: ProviderAgent
let pdsProxy: PausableProxy
const signer = P256Signer.generate()
let attestation: { uri: string; cid: string }

/** A TCP proxy in front of the PDS for the exchange's own writes: paused, the PDS is unreachable for it. */
interface PausableProxy {
  url: string
  pause(): void
  resume(): void
  close(): void
}
async function pausableProxy(target: string): Promise<PausableProxy> {
  const t = new URL(target)
  let paused = false
  const open = new Set<Socket>()
  const server: Server = createServer((client) => {
    if (paused) return client.destroy()
    const upstream = connect(Number(t.port), t.hostname)
    open.add(client)
    client.on('close', () => open.delete(client))
    client.pipe(upstream).pipe(client)
    client.on('error', () => upstream.destroy())
    upstream.on('error', () => client.destroy())
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    url: `http://127.0.0.1:${(server.address() as { port: number }).port}`,
    pause: () => {
      paused = true
      for (const s of open) s.destroy()
    },
    resume: () => (paused = false),
    close: () => server.close(),
  }
}

const exchangeOpts = (acct: LocalAccount, pdsUrl = net.pdsUrl) => ({
  index: av.consoleIndex(),
  exchangeDid: acct.did,
  exchangeAccount: { pdsUrl, identifier: acct.handle, password: acct.password },
  settleEveryMs: 100,
  outboxRetry: { firstMs: 100, maxMs: 400 },
})

beforeAll(async () => {
  net = await LocalNetwork.create()
  const accounts = await Promise.all(['alice.test', 'bob.test', 'gpu-host.test', 'market.test', 'souk.test', 'rig.test'].map((h) => net.createAccount(h)))
  ;[alice, bob, host, market, souk, agentHost] = accounts as [LocalAccount, LocalAccount, LocalAccount, LocalAccount, LocalAccount, LocalAccount]
  av = await startAppView(net, tempDbPath(), { http: true })
  pdsProxy = await pausableProxy(net.pdsUrl)
  svc = await startTestConsole(net, av.url, exchangeOpts(market, pdsProxy.url))
  attestation = await putRecord(host.agent, host.did, attestationRecord(signer))
  browser = await launchBrowser()
}, 120_000)

afterAll(async () => {
  await agent?.stop()
  await browser?.close()
  await svc?.close()
  pdsProxy?.close()
  await av?.stop()
  await net?.close()
})

const economy = () => svc.economy!
const indexed = (uri: string) => waitFor(() => av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(uri), `${uri} indexed`)
const listAll = async (acct: LocalAccount, collection: string) => (await acct.agent.com.atproto.repo.listRecords({ repo: acct.did, collection, limit: 100 })).data.records
const row = (uri: string) => svc.db.$client.prepare('SELECT * FROM settlements WHERE receipt_uri = ?').get(uri) as Record<string, unknown> | undefined
const xrpc = async (nsid: string, params: Record<string, string>) => (await fetch(`${av.url}/xrpc/${nsid}?${new URLSearchParams(params)}`)).json() as Promise<Record<string, unknown>>

/** A job of `requester` paid through `exchange`, and a receipt for it signed by `provider`, as the network writes them. */
async function craft(
  o: {
    requester?: LocalAccount
    provider?: LocalAccount
    exchange?: LocalAccount
    price?: number
    tokens?: { in: number; out: number }
    ceiling?: number
    authCeiling?: number
    authExpiresAt?: string
    jobExpiresAt?: string
    completedAt?: string
    proBono?: boolean
    job?: { uri: string; cid: string }
  } = {},
) {
  const requester = o.requester ?? alice
  const provider = o.provider ?? host
  let job = o.job
  // A reused job keeps its own commitment.
  const commitment = job
    ? ((await requester.agent.com.atproto.repo.getRecord({ repo: requester.did, collection: ids.ComputeJob, rkey: job.uri.split('/').pop()! })).data.value as { inputCommitment: string }).inputCommitment
    : hex32()
  if (!job) {
    const auth = await putRecord(requester.agent, requester.did, { ...authorizationRecord((o.exchange ?? market).did, o.authCeiling ?? 1_000_000), ...(o.authExpiresAt ? { expiresAt: o.authExpiresAt } : {}) })
    job = await putRecord(requester.agent, requester.did, { ...jobRecord(auth, commitment, 'llama-3-8b', o.ceiling ?? 1_000_000), ...(o.jobExpiresAt ? { expiresAt: o.jobExpiresAt } : {}) })
  }
  const completedAt = o.completedAt ?? new Date().toISOString()
  const receipt = signReceipt(
    {
      $type: ids.ComputeReceipt,
      job,
      requester: requester.did,
      model: 'llama-3-8b',
      inputCommitment: commitment,
      outputCommitment: sha256Hex('out'),
      tokens: o.tokens ?? { in: 10_000, out: 20_000 },
      startedAt: new Date(Date.parse(completedAt) - 1000).toISOString(),
      completedAt,
      price: { amount: o.price ?? 5, currency: 'CC' },
      attestation,
      ...(o.proBono !== undefined ? { proBono: o.proBono } : {}),
    },
    signer,
  )
  const ref = await putRecord(provider.agent, provider.did, receipt)
  return { receipt: ref, job }
}

describe('policy and grants', () => {
  it('publishes the policy and attestation once, and again only when the policy changes', async () => {
    expect(await listAll(market, ids.ComputeExchangePolicy)).toHaveLength(1)
    const [att] = await listAll(market, ids.ComputeExchangeAttestation)
    expect(att!.value).toMatchObject({ exchange: market.did, signingKeyFingerprint: economy().key.fingerprint, signingKeyJwk: economy().key.publicJwk })
    const [policy] = await listAll(market, ids.ComputeExchangePolicy)
    expect(policy!.value).toMatchObject({ exchange: market.did, fee: { bps: 500, currency: 'CC' }, tokenGrant: 1_000_000, tokenFloor: 1_000, treasuryDid: market.did })
    // A restart with the same policy publishes nothing; a changed fee publishes a new policy and attestation.
    const dataDir = mkdtempSync(join(tmpdir(), 'cocore-policy-'))
    const again = await startTestConsole(net, av.url, { ...exchangeOpts(market), dataDir, signingKey: JSON.stringify(economy().key.signer.privateKey.export({ format: 'jwk' })) })
    await again.close()
    expect(await listAll(market, ids.ComputeExchangePolicy)).toHaveLength(1)
    expect(await listAll(market, ids.ComputeExchangeAttestation)).toHaveLength(1)
    const changed = await startTestConsole(net, av.url, { ...exchangeOpts(market), dataDir, policy: { feeBps: 250 }, signingKey: JSON.stringify(economy().key.signer.privateKey.export({ format: 'jwk' })) })
    await changed.close()
    expect(await listAll(market, ids.ComputeExchangePolicy)).toHaveLength(2)
  })

  it('grants the welcome tokens on the first sign-in only, never on a read, and publishes the grant', async () => {
    const issued = economy().ledger.issued()
    // Reads by anyone, about anyone, mint nothing.
    await fetch(`${svc.url}/exchange/providers`)
    await xrpc(ids.ComputeListSettlements, {})
    await fetch(`${svc.url}/v1/models`, { headers: { authorization: 'Bearer cocore_nope' } })
    expect(economy().ledger.issued()).toBe(issued)
    for (let i = 0; i < 2; i++) (await signInWithBrowser(browser, svc.url, alice.handle, alice.password)).close()
    expect(economy().ledger.balance(alice.did)).toBe(1_000_000)
    expect(economy().ledger.issued()).toBe(issued + 1_000_000)
    await waitFor(async () => (await listAll(market, ids.AccountTokenGrant)).some((r) => (r.value as { recipient: string }).recipient === alice.did), 'grant published')
    expect((await listAll(market, ids.AccountTokenGrant)).filter((r) => (r.value as { recipient: string }).recipient === alice.did)).toHaveLength(1)
  })
})

describe('settlement', () => {
  it('settles a receipt from the reference agent: signed settlement on the exchange repo, verified by the AppView, balances moved', async () => {
    agent = await startBuiltinAgent(net.pdsUrl, agentHost, { url: svc.url, did: market.did })
    const key = new ApiKeys(svc.db).create(alice.did, 'sdk', ['inference']).secret
    const before = { alice: economy().ledger.balance(alice.did), rig: economy().ledger.balance(agentHost.did), treasury: economy().ledger.balance(market.did) }
    const res = (await new OpenAI({ baseURL: `${svc.url}/v1`, apiKey: key, maxRetries: 0 }).chat.completions.create({ model: 'builtin', messages: [{ role: 'user', content: 'settle me' }] })) as unknown as { cocore: { receipt: string } }
    const receiptUri = res.cocore.receipt
    const settled = await waitFor(() => row(receiptUri), 'receipt decided')
    expect(settled).toMatchObject({ outcome: 'settled', requester_did: alice.did, provider_did: agentHost.did })
    const amount = settled.amount as number
    const fee = settled.fee as number
    expect(amount).toBeGreaterThan(0)
    expect(fee).toBe(Math.floor((amount * 500) / 10_000))
    expect(economy().ledger.balance(alice.did)).toBe(before.alice - amount)
    expect(economy().ledger.balance(agentHost.did)).toBe(before.rig + amount - fee)
    expect(economy().ledger.balance(market.did)).toBe(before.treasury + fee)
    // Published, indexed, and verified by the AppView with the key the exchange attested.
    const out = await waitFor(() => economy().outbox.get(`settlement:${receiptUri}`)?.uri, 'settlement published')
    await indexed(out)
    const verdict = await xrpc(ids.ComputeVerifySettlement, { uri: out })
    expect(verdict).toMatchObject({ ok: true })
  })

  it('refuses receipts for jobs it never dispatched, whatever they claim, and leaves those of another exchange alone', async () => {
    const start = economy().ledger.balance(alice.did)
    const variants = [{ price: 5 }, { price: 50, authCeiling: 10 }, { price: 0, tokens: { in: 0, out: 0 }, proBono: true }, { requester: host, provider: host, price: 20 }]
    const made = []
    for (const v of variants) made.push(await craft(v))
    const theirs = await craft({ price: 11, exchange: souk })
    for (const m of made) expect(await waitFor(() => row(m.receipt.uri), 'decided')).toMatchObject({ outcome: 'refused', finding_code: 'job-not-dispatched' })
    // Decided in the same pass as later receipts: by then the other exchange's receipt was seen and left.
    const after = await craft({ price: 1 })
    await waitFor(() => row(after.receipt.uri), 'decided')
    expect(row(theirs.receipt.uri)).toBeUndefined()
    expect(economy().ledger.balance(alice.did)).toBe(start)
  })

  it('decides a receipt once when two pipelines see it at the same time', async () => {
    // An exchange whose own pass never runs during the test: only the twins below decide.
    const quiet = await startTestConsole(net, av.url, { ...exchangeOpts(souk), settleEveryMs: 3_600_000 })
    const quietAgent = await startBuiltinAgent(net.pdsUrl, host, { url: quiet.url, did: souk.did })
    try {
      ;(await signInWithBrowser(browser, quiet.url, alice.handle, alice.password)).close()
      const key = new ApiKeys(quiet.db).create(alice.did, 'sdk', ['inference']).secret
      const res = (await new OpenAI({ baseURL: `${quiet.url}/v1`, apiKey: key, maxRetries: 0 }).chat.completions.create({ model: 'builtin', messages: [{ role: 'user', content: 'twice' }] })) as unknown as { cocore: { receipt: string } }
      await indexed(res.cocore.receipt)
      const e = quiet.economy!
      const twin = () => new Settler(e.settlerOpts)
      const decided = await Promise.all([twin(), twin(), twin()].map(async (s) => s.pass()))
      // The first pass decides every receipt of this exchange; the others find them decided.
      expect(decided.filter((n) => n > 0)).toHaveLength(1)
      const count = (sql: string) => quiet.db.$client.prepare(sql).pluck().get(`settlement:${res.cocore.receipt}`)
      expect(count('SELECT COUNT(*) FROM ledger_txns WHERE ref = ?')).toBe(1)
      expect(count('SELECT COUNT(*) FROM exchange_outbox WHERE ref = ?')).toBe(1)
    } finally {
      await quietAgent.stop()
      await quiet.close()
    }
  })

  /** A chat through the reference agent; the URI of its receipt. */
  const chatReceipt = async (content: string) => {
    const key = new ApiKeys(svc.db).create(alice.did, 'sdk', ['inference']).secret
    const res = (await new OpenAI({ baseURL: `${svc.url}/v1`, apiKey: key, maxRetries: 0 }).chat.completions.create({ model: 'builtin', messages: [{ role: 'user', content }] })) as unknown as { cocore: { receipt: string } }
    return res.cocore.receipt
  }

  it('publishes every settlement exactly once after its PDS comes back', async () => {
    pdsProxy.pause()
    const made: string[] = []
    for (const n of [1, 2, 3]) made.push(await chatReceipt(`while the exchange PDS is away ${n}`))
    for (const m of made) expect(await waitFor(() => row(m), 'decided while the PDS is down')).toMatchObject({ outcome: 'settled' })
    await waitFor(() => made.every((m) => (economy().outbox.get(`settlement:${m}`)?.attempts ?? 0) >= 1), 'publication attempts failed')
    expect(made.every((m) => economy().outbox.get(`settlement:${m}`)!.status === 'pending')).toBe(true)
    pdsProxy.resume()
    await waitFor(() => economy().outbox.pending() === 0, 'outbox drained', 30_000)
    const onRepo = (await listAll(market, ids.ComputeSettlement)).map((r) => (r.value as { receipt: { uri: string } }).receipt.uri)
    for (const m of made) expect(onRepo.filter((u) => u === m)).toHaveLength(1)
  })

  it('keeps the books at zero, the holds equal to the open jobs, after many jobs', async () => {
    const made = await Promise.all(Array.from({ length: 8 }, (_, i) => chatReceipt(`job number ${i} ${'word '.repeat(i)}`)))
    for (const m of made) expect(await waitFor(() => row(m), 'decided')).toMatchObject({ outcome: 'settled' })
    const l = economy().ledger
    expect(l.total()).toBe(0)
    expect(l.unbalanced()).toEqual([])
    expect(l.drift()).toEqual([])
    expect(l.heldTotal()).toBe(svc.exchange!.book.holdsTotal())
    const balances = l.accounts().reduce((s, a) => s + a.balance, 0)
    expect(balances + l.balance(ISSUANCE)).toBe(0)
    // Every settled row moved exactly what it says: the treasury holds the fees.
    const fees = svc.db.$client.prepare("SELECT COALESCE(SUM(fee), 0) FROM settlements WHERE outcome = 'settled'").pluck().get() as number
    expect(l.balance(market.did)).toBe(fees)
  })
})

describe('grants over time', () => {
  it('credits the refresh once per window, only to accounts that signed in', async () => {
    const e = economy()
    const week = e.policy.refresh.cadenceMinutes * 60_000
    const before = e.ledger.balance(alice.did)
    expect(e.refresh(alice.did)).toBe(false) // the window she joined in is covered by her welcome grant
    expect(e.refresh(alice.did, Date.now() + week)).toBe(true)
    expect(e.refresh(alice.did, Date.now() + week)).toBe(false)
    expect(e.refresh(alice.did, Date.now() + 2 * week)).toBe(true)
    expect(e.ledger.balance(alice.did)).toBe(before + 2 * e.policy.refresh.amountPerDid)
    const stranger = 'did:plc:neversignedinaaaaaaaaaaaa'
    expect(e.refresh(stranger, Date.now() + week)).toBe(false)
    expect(e.ledger.balance(stranger)).toBe(0)
    expect(e.ledger.total()).toBe(0)
  })

  it('distributes patronage once per window, pro rata, from the treasury, and publishes it', async () => {
    const e = economy()
    const month = e.policy.patronage.cadenceDays * 86_400_000
    // The reference agent's jobs cost a token or two, too little for a fee: the treasury is given something to share.
    e.ledger.post('grant', 'grant:test:treasury', [{ account: market.did, amount: 10_000 }, { account: ISSUANCE, amount: -10_000 }])
    const treasury = e.ledger.balance(market.did)
    expect(treasury).toBeGreaterThan(0)
    const balances = Object.fromEntries([alice, bob, host, agentHost].map((a) => [a.did, e.ledger.balance(a.did)]))
    // The window that is open now, closed a month from now.
    const paid = e.patronage(Date.now() + month)
    expect(paid).toBeGreaterThan(0)
    expect(paid).toBeLessThanOrEqual(Math.floor((treasury * e.policy.patronage.fractionBps) / 10_000))
    expect(e.patronage(Date.now() + month)).toBe(0)
    expect(e.ledger.balance(market.did)).toBe(treasury - paid)
    const credited = [alice, bob, host, agentHost].reduce((s, a) => s + e.ledger.balance(a.did) - balances[a.did]!, 0)
    expect(credited).toBe(paid)
    expect(e.ledger.total()).toBe(0)
    await waitFor(async () => (await listAll(market, ids.AccountTokenPatronage)).length >= 2, 'patronage published')
    const records = (await listAll(market, ids.AccountTokenPatronage)).map((r) => r.value as { recipient: string; tokensCredited: number; totalPatronage: number })
    expect(records.reduce((s, r) => s + r.tokensCredited, 0)).toBe(paid)
  })
})

describe('reading the ledger', () => {
  const call = async (nsid: string, init: { key?: string; cookie?: string; params?: Record<string, string> } = {}) => {
    const res = await fetch(`${svc.url}/xrpc/${nsid}?${new URLSearchParams(init.params ?? {})}`, { headers: { ...(init.key ? { authorization: `Bearer ${init.key}` } : {}) } })
    return { status: res.status, body: (await res.json()) as Record<string, any> }
  }

  it("shows an account its own balance and history only, with a cursor; the policy and the treasury's aggregate to anyone", async () => {
    const keys = new ApiKeys(svc.db)
    const aliceKey = keys.create(alice.did, 'reader', ['read']).secret
    const bobKey = keys.create(bob.did, 'reader', ['read']).secret
    const mine = await call(ids.OrgCocoreexchangeLedgerGetBalance, { key: aliceKey })
    expect(mine.body).toMatchObject({ did: alice.did, balance: economy().ledger.balance(alice.did), held: economy().ledger.held(alice.did), available: economy().ledger.available(alice.did), currency: 'CC', floor: 1_000, admissible: true })
    expect((await call(ids.OrgCocoreexchangeLedgerGetBalance, { key: bobKey })).body.did).toBe(bob.did)
    expect((await call(ids.OrgCocoreexchangeLedgerGetBalance)).status).toBe(401)
    // Pages of 3, newest first, covering the whole history once.
    const seen: number[] = []
    let cursor: string | undefined
    do {
      const page = await call(ids.OrgCocoreexchangeLedgerListEntries, { key: aliceKey, params: { limit: '3', ...(cursor ? { cursor } : {}) } })
      expect(page.status).toBe(200)
      seen.push(...page.body.entries.map((x: { id: number }) => x.id))
      cursor = page.body.cursor
    } while (cursor)
    expect(seen).toEqual(economy().ledger.history(alice.did, 1000).map((h) => h.txnId))
    expect(new Set(seen).size).toBe(seen.length)
    const sum = economy().ledger.history(alice.did, 1000).reduce((s, h) => s + h.amount, 0)
    expect(sum).toBe(economy().ledger.balance(alice.did))

    const policy = await call(ids.OrgCocoreexchangeLedgerGetPolicy)
    expect(policy.status).toBe(200)
    expect(policy.body).toMatchObject({ exchange: market.did, signingKeyFingerprint: economy().key.fingerprint, value: { fee: { bps: 500 } } })
    const treasury = await call(ids.OrgCocoreexchangeLedgerGetTreasury)
    expect(treasury.body).toMatchObject({ treasury: market.did, balance: economy().ledger.balance(market.did), booksBalanced: true, currency: 'CC' })
    expect(treasury.body.settlements).toBeGreaterThan(5)
  })

  it('refuses a job under the admission floor with insufficient_quota', async () => {
    const dee = await net.createAccount('dee.test')
    const key = new ApiKeys(svc.db).create(dee.did, 'poor', ['inference']).secret
    const err = await new OpenAI({ baseURL: `${svc.url}/v1`, apiKey: key, maxRetries: 0 }).chat.completions.create({ model: 'builtin', messages: [{ role: 'user', content: 'x' }] }).catch((e) => e)
    expect(err).toMatchObject({ status: 429, code: 'insufficient_quota' })
    expect(String(err.message)).toMatch(/admission floor/)
  })

  it('shows the balance and history on the dashboard, and puts the ledger in the export', async () => {
    const page = await signInWithBrowser(browser, svc.url, alice.handle, alice.password)
    expect(Number(await page.locator('#balance').textContent())).toBe(economy().ledger.balance(alice.did))
    expect(await page.locator('#ledger tr').count()).toBeGreaterThan(3)
    const download = await page.request.post(`${svc.url}/account/export`, { headers: { origin: svc.url } })
    const data = (await download.json()) as { ledger: { balance: number; entries: unknown[]; settlements: { outcome: string }[] } }
    expect(data.ledger.balance).toBe(economy().ledger.balance(alice.did))
    expect(data.ledger.entries.length).toBe(economy().ledger.history(alice.did, 1000).length)
    expect(data.ledger.settlements.some((s) => s.outcome === 'refused')).toBe(true)
    await page.close()
  })
})
