/**
 * The XRPC read API against a local index (no network): filtering, paging
 * through every row with opaque keyset cursors, parameter and cursor errors,
 * hidden (deactivated) accounts, and output validated against the lexicons.
 */
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { TID } from '@atproto/common-web'
import { createApp } from '../appview/server.ts'
import { IndexStore } from '../appview/indexer/store.ts'
import { openDb } from '../src/db/index.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { validateRecord } from '../src/lexicon/validate.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import { attestationRecord, authorizationRecord, jobRecord, providerRecord } from '../src/dev/records.ts'
import { signedReceipt, usd } from './fixture/records.ts'

const CID = 'bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm'
const T0 = Date.now()
/** An ISO time `min` minutes before the start of the run. */
const ago = (min: number) => new Date(T0 - min * 60_000).toISOString()
/** A valid did:plc of letters only (base32 alphabet). */
const plc = (name: string) => `did:plc:${name.padEnd(24, 'z')}`
const letters = (i: number) => String.fromCharCode(97 + Math.floor(i / 26)) + String.fromCharCode(97 + (i % 26))

type Ref = { uri: string; cid: string }
type Json = Record<string, any>


function world() {
  const db = openDb(join(mkdtempSync(join(tmpdir(), 'read-api-')), 'index.sqlite'))
  const store = new IndexStore(db)
  const app = createApp({ db, store, validateOutput: true })

  /** Indexes one record (checked against its lexicon first), as the firehose indexer would. */
  const put = (did: string, record: Json, rkey = TID.nextStr()): Ref => {
    const collection = record.$type as string
    const valid = validateRecord(collection, record)
    if (!valid.success) throw new Error(`invalid ${collection}: ${valid.message}`)
    const uri = `at://${did}/${collection}/${rkey}`
    store.tx(() => store.applyCommit(did, TID.nextStr(), [{ action: 'create', uri, did, collection, rkey, cid: CID, record }]))
    return { uri, cid: CID }
  }

  const get = async (nsid: string, params: Record<string, string | number | boolean> = {}): Promise<{ status: number; body: Json }> => {
    const qs = new URLSearchParams(Object.entries(params).map(([k, v]): [string, string] => [k, String(v)]))
    const res = await app.request(`/xrpc/${nsid}${qs.size ? `?${qs}` : ''}`)
    return { status: res.status, body: (await res.json()) as Json }
  }

  /** Follows cursors to the end; fails on a repeated cursor or too many pages. */
  const pageAll = async (nsid: string, key: string, params: Record<string, string | number | boolean>) => {
    const items: Json[] = []
    const seen = new Set<string>()
    let cursor: string | undefined
    let pages = 0
    do {
      const res = await get(nsid, { ...params, ...(cursor ? { cursor } : {}) })
      expect(res.status, JSON.stringify(res.body).slice(0, 300)).toBe(200)
      items.push(...(res.body[key] as Json[]))
      cursor = res.body.cursor as string | undefined
      if (cursor) {
        expect(seen.has(cursor)).toBe(false)
        seen.add(cursor)
      }
      expect(++pages).toBeLessThan(1000)
    } while (cursor)
    return { items, pages }
  }

  return { db, store, app, put, get, pageAll }
}

const expectError = (res: { status: number; body: Json }, status: number, error: string) => {
  expect(res.status, JSON.stringify(res.body).slice(0, 300)).toBe(status)
  expect(res.body.error).toBe(error)
  expect(typeof res.body.message).toBe('string')
}

const BAD_CURSORS = ['!!not-base64!!', Buffer.from('["only-one"]').toString('base64url'), Buffer.from('{"a":1}').toString('base64url'), Buffer.from('[1,2]').toString('base64url')]

async function expectCursorErrors(w: ReturnType<typeof world>, nsid: string, params: Record<string, string> = {}) {
  for (const cursor of BAD_CURSORS) expectError(await w.get(nsid, { ...params, cursor }), 400, 'InvalidCursor')
}

async function expectLimitErrors(w: ReturnType<typeof world>, nsid: string, params: Record<string, string> = {}, max = 100_000) {
  for (const limit of ['0', '-1', 'abc', '1.5', String(max + 1)]) expectError(await w.get(nsid, { ...params, limit }), 400, 'InvalidRequest')
}

/** The (sortAt desc, uri desc) order of the record lists. */
const newestFirst = (a: { sortAt: string; uri: string }, b: { sortAt: string; uri: string }) =>
  a.sortAt < b.sortAt ? 1 : a.sortAt > b.sortAt ? -1 : a.uri < b.uri ? 1 : a.uri > b.uri ? -1 : 0

describe('xrpc routing', () => {
  it('answers an unknown method with 501 MethodNotImplemented', async () => {
    const w = world()
    expectError(await w.get('dev.cocore.nope'), 501, 'MethodNotImplemented')
  })
})

describe('compute record lists', () => {
  const w = world()
  const signer = P256Signer.generate()
  const EX = plc('exchange')
  const EX2 = plc('exchangetwo')
  const R1 = plc('requesterone')
  const R2 = plc('requestertwo')
  const P1 = plc('providerone')
  const P2 = plc('providertwo')
  const P3 = plc('providerthree')

  type Indexed = Ref & { sortAt: string }
  const jobs: Record<string, Indexed[]> = { [R1]: [], [R2]: [] }
  const receipts: (Indexed & { provider: string; requester: string; job: string })[] = []
  const settlements: (Indexed & { receipt: string; requester: string; exchange: string })[] = []
  const providers: (Indexed & { did: string })[] = []
  let minute = 0
  const tick = () => ago(20_000 - ++minute)

  const auth = { [R1]: w.put(R1, { ...usd(authorizationRecord(EX)), createdAt: tick() }), [R2]: w.put(R2, { ...usd(authorizationRecord(EX)), createdAt: tick() }) }
  const attestation = { [P1]: w.put(P1, attestationRecord(signer)), [P2]: w.put(P2, attestationRecord(signer)), [P3]: w.put(P3, attestationRecord(signer)) }
  for (const [did, n] of [[P1, 55], [P2, 2], [P3, 3]] as const) {
    for (let i = 0; i < n; i++) {
      const createdAt = tick()
      providers.push({ ...w.put(did, { ...usd(providerRecord(signer)), createdAt }), sortAt: createdAt, did })
    }
  }
  const addJob = (requester: string) => {
    const createdAt = tick()
    const ref = { ...w.put(requester, { ...usd(jobRecord(auth[requester]!)), createdAt }), sortAt: createdAt }
    jobs[requester]!.push(ref)
    return ref
  }
  const addReceipt = (provider: string, requester: string, job: Ref) => {
    const completedAt = tick()
    const record = signedReceipt(signer, { job, requester, attestation: attestation[provider]!, completedAt, ms: 1000, price: 42 })
    const ref = { ...w.put(provider, record), sortAt: completedAt, provider, requester, job: job.uri }
    receipts.push(ref)
    return ref
  }
  const addSettlement = (exchange: string, receipt: Ref, requester: string) => {
    const settledAt = tick()
    const money = (amount: number) => ({ amount, currency: 'USD' })
    const record = {
      $type: ids.ComputeSettlement,
      receipt,
      requesterAuthorization: auth[requester]!,
      amountCharged: money(42),
      providerPayout: money(40),
      exchangeFee: money(2),
      processorReference: Buffer.from('ref').toString('base64'),
      status: 'settled',
      settledAt,
    }
    settlements.push({ ...w.put(exchange, record), sortAt: settledAt, receipt: receipt.uri, requester, exchange })
  }

  for (let i = 0; i < 57; i++) addReceipt(P1, R1, addJob(R1))
  for (let i = 0; i < 5; i++) addReceipt(P2, R2, addJob(R2))
  for (let i = 0; i < 3; i++) addReceipt(P3, R2, addJob(R2))
  receipts.filter((r) => r.provider === P1).slice(0, 30).forEach((r) => addSettlement(EX, r, R1))
  receipts.filter((r) => r.provider !== P1).forEach((r) => addSettlement(EX, r, R2))
  addSettlement(EX2, receipts[40]!, R1)
  addSettlement(EX2, receipts[41]!, R1)
  // Deactivated accounts keep their rows in the index, hidden from every read.
  w.store.setStatus(P3, false, 'deactivated')
  w.store.setStatus(EX2, false, 'suspended')

  const uris = (xs: Json[]) => xs.map((x) => x.uri as string)
  const expected = <T extends Indexed>(xs: T[]) => uris([...xs].sort(newestFirst))

  it('listReceipts filters by provider, requester and job, and pages through all rows', async () => {
    const p1 = await w.pageAll(ids.ComputeListReceipts, 'receipts', { provider: P1, limit: 10 })
    expect(p1.pages).toBe(6)
    expect(uris(p1.items)).toEqual(expected(receipts.filter((r) => r.provider === P1)))
    expect(p1.items[0]).toMatchObject({ collection: ids.ComputeReceipt, repo: P1, cid: CID })
    expect(p1.items[0]!.body.requester).toBe(R1)

    const all = await w.pageAll(ids.ComputeListReceipts, 'receipts', { limit: 7 })
    expect(uris(all.items)).toEqual(expected(receipts.filter((r) => r.provider !== P3)))

    const r2 = await w.pageAll(ids.ComputeListReceipts, 'receipts', { requester: R2, limit: 2 })
    expect(uris(r2.items)).toEqual(expected(receipts.filter((r) => r.provider === P2)))

    const one = receipts[12]!
    expect(uris((await w.get(ids.ComputeListReceipts, { job: one.job })).body.receipts)).toEqual([one.uri])
    expect((await w.get(ids.ComputeListReceipts, { provider: P2, requester: R1 })).body.receipts).toEqual([])

    // A page that ends exactly at the last row carries no cursor.
    const exact = await w.get(ids.ComputeListReceipts, { requester: R2, limit: 5 })
    expect(exact.body.receipts).toHaveLength(5)
    expect(exact.body.cursor).toBeUndefined()
    // Default page size.
    expect((await w.get(ids.ComputeListReceipts)).body.receipts).toHaveLength(62)
  })

  it('listReceipts hides deactivated providers', async () => {
    expect((await w.get(ids.ComputeListReceipts, { provider: P3 })).body.receipts).toEqual([])
    w.store.setStatus(P3, true, null)
    expect((await w.get(ids.ComputeListReceipts, { provider: P3 })).body.receipts).toHaveLength(3)
    w.store.setStatus(P3, false, 'deactivated')
  })

  it('listReceipts rejects malformed cursors and invalid params', async () => {
    await expectCursorErrors(w, ids.ComputeListReceipts)
    await expectLimitErrors(w, ids.ComputeListReceipts, {}, 200)
    expectError(await w.get(ids.ComputeListReceipts, { provider: 'not-a-did' }), 400, 'InvalidRequest')
    expectError(await w.get(ids.ComputeListReceipts, { job: 'nope' }), 400, 'InvalidRequest')
  })

  it('listProviders pages through all visible provider records', async () => {
    const all = await w.pageAll(ids.ComputeListProviders, 'providers', { limit: 10 })
    expect(all.items).toHaveLength(57)
    expect(uris(all.items)).toEqual(expected(providers.filter((p) => p.did !== P3)))
    await expectCursorErrors(w, ids.ComputeListProviders)
    await expectLimitErrors(w, ids.ComputeListProviders, {}, 200)
  })

  it('listJobs returns the jobs of one requester, paged', async () => {
    const r1 = await w.pageAll(ids.ComputeListJobs, 'jobs', { requester: R1, limit: 10 })
    expect(r1.items).toHaveLength(57)
    expect(uris(r1.items)).toEqual(expected(jobs[R1]!))
    expect(r1.items.every((j) => j.repo === R1 && j.collection === ids.ComputeJob)).toBe(true)
    const r2 = await w.pageAll(ids.ComputeListJobs, 'jobs', { requester: R2, limit: 3 })
    expect(uris(r2.items)).toEqual(expected(jobs[R2]!))
    expect((await w.get(ids.ComputeListJobs, { requester: P1 })).body).toEqual({ jobs: [] })
    w.store.setStatus(R2, false, 'deactivated')
    expect((await w.get(ids.ComputeListJobs, { requester: R2 })).body.jobs).toEqual([])
    w.store.setStatus(R2, true, null)
  })

  it('listJobs rejects a missing or malformed requester, bad limits and cursors', async () => {
    expectError(await w.get(ids.ComputeListJobs), 400, 'InvalidRequest')
    expectError(await w.get(ids.ComputeListJobs, { requester: 'alice' }), 400, 'InvalidRequest')
    await expectLimitErrors(w, ids.ComputeListJobs, { requester: R1 }, 500)
    await expectCursorErrors(w, ids.ComputeListJobs, { requester: R1 })
  })

  it('listSettlements filters by receipt and requester, and pages through all rows', async () => {
    const visibleSettlements = settlements.filter((s) => s.exchange !== EX2)
    const all = await w.pageAll(ids.ComputeListSettlements, 'settlements', { limit: 10 })
    expect(all.items).toHaveLength(38)
    expect(uris(all.items)).toEqual(expected(visibleSettlements))

    const r1 = await w.pageAll(ids.ComputeListSettlements, 'settlements', { requester: R1, limit: 4 })
    expect(uris(r1.items)).toEqual(expected(visibleSettlements.filter((s) => s.requester === R1)))
    expect(r1.items).toHaveLength(30)
    const r2 = await w.pageAll(ids.ComputeListSettlements, 'settlements', { requester: R2, limit: 4 })
    expect(uris(r2.items)).toEqual(expected(visibleSettlements.filter((s) => s.requester === R2)))

    const s = visibleSettlements[7]!
    expect(uris((await w.get(ids.ComputeListSettlements, { receipt: s.receipt })).body.settlements)).toEqual([s.uri])
    expect(uris((await w.get(ids.ComputeListSettlements, { receipt: s.receipt, requester: R1 })).body.settlements)).toEqual([s.uri])
    expect((await w.get(ids.ComputeListSettlements, { receipt: s.receipt, requester: R2 })).body.settlements).toEqual([])
    // Settlements of a suspended exchange are hidden.
    expect((await w.get(ids.ComputeListSettlements, { receipt: receipts[40]!.uri })).body.settlements).toEqual([])
  })

  it('listSettlements rejects malformed params and cursors', async () => {
    expectError(await w.get(ids.ComputeListSettlements, { requester: 'x' }), 400, 'InvalidRequest')
    expectError(await w.get(ids.ComputeListSettlements, { receipt: 'not a uri' }), 400, 'InvalidRequest')
    await expectLimitErrors(w, ids.ComputeListSettlements, {}, 200)
    await expectCursorErrors(w, ids.ComputeListSettlements, { requester: R1 })
  })
})

describe('latency and model activity', () => {
  const w = world()
  const signer = P256Signer.generate()
  const A = plc('provideralpha')
  const B = plc('providerbeta')
  const C = plc('providergamma')
  const REQ = plc('requester')
  const job = { uri: `at://${REQ}/${ids.ComputeJob}/${TID.nextStr()}`, cid: CID }
  const att = { uri: `at://${A}/${ids.ComputeAttestation}/${TID.nextStr()}`, cid: CID }

  const receipt = (provider: string, model: string, completedMinAgo: number, durationMs: number, tokens = { in: 10, out: 5 }) => {
    const completedAt = ago(completedMinAgo)
    w.put(provider, signedReceipt(signer, { job, requester: REQ, attestation: att, completedAt, ms: durationMs, model, tokens }))
  }
  const H = 60
  const D = 24 * H
  receipt(A, 'm1', 30, 100)
  receipt(A, 'm1', 2 * H, 200)
  receipt(A, 'm1', 3 * H, 300)
  receipt(A, 'm1', 4 * H, 400)
  receipt(A, 'm1', 5 * H, 500)
  receipt(A, 'm1', 8 * D, 99_999) // beyond the latency window, inside the month
  receipt(A, 'm3', 40 * D, 1) // beyond every window
  receipt(B, 'm2', 2 * D, 1000, { in: 100, out: 1 })
  receipt(B, 'm2', 3 * D, -50) // completed before it started: no latency sample, still a request
  receipt(B, 'm1', 6 * D, 50)
  receipt(C, 'm1', 20, 77_777)
  w.store.setStatus(C, false, 'deactivated')

  it('latency reports nearest-rank percentiles over the last 7 days, overall, by provider and by model', async () => {
    const res = await w.get(ids.ComputeLatency)
    expect(res.status).toBe(200)
    expect(Date.parse(res.body.generatedAt)).toBeGreaterThanOrEqual(T0)
    expect(res.body.overall).toEqual({ sampleCount: 7, p50Ms: 300, p95Ms: 1000, avgMs: 364, lastMs: 100 })
    expect(res.body.byProvider).toEqual([
      { did: A, stats: { sampleCount: 5, p50Ms: 300, p95Ms: 500, avgMs: 300, lastMs: 100 } },
      { did: B, stats: { sampleCount: 2, p50Ms: 50, p95Ms: 1000, avgMs: 525, lastMs: 1000 } },
    ])
    expect(res.body.byModel).toEqual([
      { modelId: 'm1', stats: { sampleCount: 6, p50Ms: 200, p95Ms: 500, avgMs: 258, lastMs: 100 } },
      { modelId: 'm2', stats: { sampleCount: 1, p50Ms: 1000, p95Ms: 1000, avgMs: 1000, lastMs: 1000 } },
    ])
  })

  it('latency has null stats without samples', async () => {
    const empty = world()
    const res = await empty.get(ids.ComputeLatency)
    expect(res.status).toBe(200)
    expect(res.body).toMatchObject({ overall: { sampleCount: 0, p50Ms: null, p95Ms: null, avgMs: null, lastMs: null }, byProvider: [], byModel: [] })
  })

  it('modelActivity counts requests and tokens per model and provider over hour/day/week/month', async () => {
    const res = await w.get(ids.ComputeModelActivity)
    expect(res.status).toBe(200)
    const win = (h: number, d: number, wk: number, m: number, tokW = 15, tokM = tokW) => ({
      hour: { requests: h, tokens: h * 15 },
      day: { requests: d, tokens: d * 15 },
      week: { requests: wk, tokens: wk === 0 ? 0 : tokW },
      month: { requests: m, tokens: tokM },
    })
    expect(res.body.models).toEqual([
      {
        modelId: 'm1',
        totals: win(1, 5, 6, 7, 6 * 15, 7 * 15),
        byProvider: [
          { did: A, stats: win(1, 5, 5, 6, 5 * 15, 6 * 15) },
          { did: B, stats: win(0, 0, 1, 1, 15, 15) },
        ],
      },
      { modelId: 'm2', totals: win(0, 0, 2, 2, 116, 116), byProvider: [{ did: B, stats: win(0, 0, 2, 2, 116, 116) }] },
    ])
    expect(Date.parse(res.body.generatedAt)).toBeGreaterThanOrEqual(T0)
    expect((await world().get(ids.ComputeModelActivity)).body.models).toEqual([])
  })
})

describe('accounts, profiles and friends', () => {
  const w = world()
  const ALICE = plc('alice')
  const BOB = plc('bob')
  const CAROL = plc('carol')
  const DAVE = plc('dave')
  const ERIN = plc('erin')
  const fillers = Array.from({ length: 57 }, (_, i) => plc(`filler${letters(i)}`))
  const signer = P256Signer.generate()

  /** What each visible account should look like: times are minutes ago. */
  interface Model {
    did: string
    handle?: string
    displayName?: string
    avatarUrl?: string
    providerCount: number
    last: number
    joined: number
  }
  const model: Model[] = []
  const friendRecs: { friender: string; subject: string; uri: string; minAgo: number }[] = []
  const profiles: { uri: string; sortAt: string; did: string }[] = []

  const profile = (did: string, minAgo: number, fields: Json = {}) => {
    const createdAt = ago(minAgo)
    profiles.push({ ...w.put(did, { $type: ids.AccountProfile, createdAt, ...fields }, 'self'), sortAt: createdAt, did })
  }
  const friend = (friender: string, subject: string, minAgo: number) => {
    const ref = w.put(friender, { $type: ids.AccountFriend, subject, createdAt: ago(minAgo) })
    friendRecs.push({ friender, subject, uri: ref.uri, minAgo })
  }
  const provider = (did: string, minAgo: number) => w.put(did, { ...usd(providerRecord(signer)), createdAt: ago(minAgo) })

  profile(ALICE, 1000, { displayName: 'Alice' })
  provider(ALICE, 500)
  provider(ALICE, 400)
  friend(ALICE, BOB, 10)
  w.store.setHandle(ALICE, 'alice.test')
  model.push({ did: ALICE, handle: 'alice.test', displayName: 'Alice', providerCount: 2, last: 10, joined: 1000 })

  profile(BOB, 900, { displayName: 'Bob', handle: 'Bob.Example', avatarUrl: 'https://example.com/b.png' })
  friend(BOB, ALICE, 800)
  friend(BOB, ALICE, 50)
  friend(BOB, BOB, 40)
  model.push({ did: BOB, handle: 'Bob.Example', displayName: 'Bob', avatarUrl: 'https://example.com/b.png', providerCount: 0, last: 40, joined: 900 })

  friend(CAROL, ALICE, 300)
  friend(CAROL, BOB, 20)
  friend(CAROL, DAVE, 15)
  w.store.setHandle(CAROL, 'carol.test')
  model.push({ did: CAROL, handle: 'carol.test', providerCount: 0, last: 15, joined: 300 })

  profile(DAVE, 5, { displayName: 'Dave' })
  friend(DAVE, ALICE, 5)
  w.store.setHandle(DAVE, 'dave.test')
  w.store.setStatus(DAVE, false, 'deactivated')

  profile(ERIN, 2000, { displayName: '', handle: '' })
  provider(ERIN, 1)
  model.push({ did: ERIN, providerCount: 1, last: 1, joined: 2000 })

  fillers.forEach((did, i) => {
    // Pairs of fillers share a time, so order ties are broken by DID across page boundaries.
    const t = 3000 + Math.floor(i / 2)
    profile(did, t)
    friend(did, ALICE, t)
    const handle = i % 3 === 0 ? `filler-${i}.test` : undefined
    if (handle) w.store.setHandle(did, handle)
    model.push({ did, ...(handle ? { handle } : {}), providerCount: 0, last: t, joined: t })
  })

  const cmpStr = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0)
  const order = (sortBy: 'recent' | 'newest', xs = model) =>
    [...xs].sort((a, b) => (sortBy === 'recent' ? a.last - b.last : a.joined - b.joined) || cmpStr(a.did, b.did))
  // Absent values are null, as the reference AppView answers.
  const view = (m: Model) => ({
    did: m.did,
    handle: m.handle ?? null,
    displayName: m.displayName ?? null,
    avatarUrl: m.avatarUrl ?? null,
    joinedAt: ago(m.joined),
    lastActivityAt: ago(m.last),
    providerCount: m.providerCount,
    isProvider: m.providerCount > 0,
  })
  const dids = (xs: Json[]) => xs.map((x) => x.did as string)

  it('getProfile returns the profile page aggregate, nulls for absent values, or 404', async () => {
    const res = await w.get(ids.AccountGetProfile, { did: ALICE })
    expect(res.status).toBe(200)
    const { weekSeries, machines, ...rest } = res.body.profile
    expect(rest).toEqual({
      did: ALICE,
      handle: 'alice.test',
      displayName: 'Alice',
      bio: null,
      avatarUrl: null,
      joinedAt: ago(1000),
      lastActivityAt: ago(10),
      jobCount: 0,
      receiptCount: 0,
      // Bob, Carol and the fillers; Dave is deactivated.
      incomingFriendsCount: 59,
      latency: { sampleCount: 0, p50Ms: null, p95Ms: null, avgMs: null, lastMs: null },
    })
    const machine = { machineLabel: 'test box', chip: 'x86_64', ramGB: 32, supportedModels: ['llama-3-8b'], active: null, trustLevel: 'self-attested' }
    expect(machines).toEqual([
      { rkey: expect.any(String), ...machine, createdAt: ago(400) },
      { rkey: expect.any(String), ...machine, createdAt: ago(500) },
    ])
    expect(weekSeries.trustedByNew.reduce((a: number, b: number) => a + b, 0)).toBe(59)
    expect(weekSeries.machinesIndexedCumulative[51]).toBe(2)

    // An account with records but no profile record has a page of nulls; its handle comes from its DID document.
    const carol = (await w.get(ids.AccountGetProfile, { did: CAROL })).body.profile
    expect(carol).toMatchObject({ did: CAROL, handle: 'carol.test', displayName: null, bio: null, avatarUrl: null, joinedAt: ago(300), lastActivityAt: ago(15), machines: [], incomingFriendsCount: 0 })
    // A profile's own handle is used when the DID document gave none.
    expect((await w.get(ids.AccountGetProfile, { did: BOB })).body.profile).toMatchObject({ handle: 'Bob.Example', avatarUrl: 'https://example.com/b.png', incomingFriendsCount: 3 })
    // Empty strings read as absent.
    expect((await w.get(ids.AccountGetProfile, { did: ERIN })).body.profile).toMatchObject({ handle: null, displayName: null })
    expectError(await w.get(ids.AccountGetProfile, { did: DAVE }), 404, 'NotFound')
    expectError(await w.get(ids.AccountGetProfile, { did: plc('nobody') }), 404, 'NotFound')
    expectError(await w.get(ids.AccountGetProfile, { did: 'alice' }), 400, 'InvalidRequest')
    expectError(await w.get(ids.AccountGetProfile), 400, 'InvalidRequest')
  })

  it('listProfiles pages through all visible profiles', async () => {
    const all = await w.pageAll(ids.AccountListProfiles, 'profiles', { limit: 10 })
    expect(all.items).toHaveLength(60)
    expect(all.items.map((p) => p.uri)).toEqual([...profiles.filter((p) => p.did !== DAVE)].sort(newestFirst).map((p) => p.uri))
    expect((await w.get(ids.AccountListProfiles)).body.profiles).toHaveLength(60)
    await expectCursorErrors(w, ids.AccountListProfiles)
    await expectLimitErrors(w, ids.AccountListProfiles, {}, 500)
  })

  it('listAccounts sorts by recent activity or by join time, paging with cursors', async () => {
    for (const sortBy of ['recent', 'newest'] as const) {
      const all = await w.pageAll(ids.AccountListAccounts, 'accounts', { sortBy, limit: 10 })
      expect(all.items).toEqual(order(sortBy).map(view))
      expect(all.items).toHaveLength(61)
    }
    const first = await w.get(ids.AccountListAccounts)
    expect(first.body).toMatchObject({ total: 61, limit: 24, offset: 0, sortBy: 'recent', providersOnly: false, excludeViewerFriends: false })
    expect(first.body.q).toBeUndefined()
    expect(dids(first.body.accounts)).toEqual(dids(order('recent').slice(0, 24)))
    expect(dids(first.body.accounts.slice(0, 4))).toEqual([ERIN, ALICE, CAROL, BOB])
    // Every page reports the total of the whole filtered set.
    const second = await w.get(ids.AccountListAccounts, { cursor: first.body.cursor })
    expect(second.body.total).toBe(61)
    expect(dids(second.body.accounts)).toEqual(dids(order('recent').slice(24, 48)))
  })

  it('listAccounts supports offset for reference clients, and the cursor continues after it', async () => {
    const res = await w.get(ids.AccountListAccounts, { sortBy: 'newest', limit: 5, offset: 3 })
    expect(res.body).toMatchObject({ total: 61, limit: 5, offset: 3, sortBy: 'newest' })
    expect(dids(res.body.accounts)).toEqual(dids(order('newest').slice(3, 8)))
    const next = await w.get(ids.AccountListAccounts, { sortBy: 'newest', limit: 5, cursor: res.body.cursor })
    expect(dids(next.body.accounts)).toEqual(dids(order('newest').slice(8, 13)))
    // Offset is ignored once a cursor is given.
    const withBoth = await w.get(ids.AccountListAccounts, { sortBy: 'newest', limit: 5, offset: 40, cursor: res.body.cursor })
    expect(dids(withBoth.body.accounts)).toEqual(dids(order('newest').slice(8, 13)))
    const past = await w.get(ids.AccountListAccounts, { offset: 100 })
    expect(past.body).toMatchObject({ accounts: [], total: 61, offset: 100 })
    expect(past.body.cursor).toBeUndefined()
    const last = await w.get(ids.AccountListAccounts, { offset: 58, limit: 3 })
    expect(last.body.accounts).toHaveLength(3)
    expect(last.body.cursor).toBeUndefined()
  })

  it('listAccounts filters providers, the viewer and the viewer’s friends', async () => {
    const prov = await w.get(ids.AccountListAccounts, { providersOnly: true })
    expect(prov.body).toMatchObject({ total: 2, providersOnly: true })
    expect(prov.body.accounts).toEqual([view(model.find((m) => m.did === ERIN)!), view(model.find((m) => m.did === ALICE)!)])

    const notCarol = await w.get(ids.AccountListAccounts, { viewerDid: CAROL, limit: 100 })
    expect(notCarol.body.total).toBe(60)
    expect(dids(notCarol.body.accounts)).toEqual(dids(order('recent').filter((m) => m.did !== CAROL)))

    const carolsFriends = await w.get(ids.AccountListAccounts, { viewerDid: CAROL, excludeViewerFriends: true, limit: 100 })
    expect(carolsFriends.body).toMatchObject({ total: 58, excludeViewerFriends: true })
    expect(dids(carolsFriends.body.accounts)).toEqual(dids(order('recent').filter((m) => ![CAROL, ALICE, BOB].includes(m.did))))

    // Without a viewer the friend filter has nothing to apply to.
    expect((await w.get(ids.AccountListAccounts, { excludeViewerFriends: true })).body).toMatchObject({ total: 61, excludeViewerFriends: true })

    const bobView = await w.pageAll(ids.AccountListAccounts, 'accounts', { viewerDid: BOB, excludeViewerFriends: true, providersOnly: true, limit: 1 })
    expect(dids(bobView.items)).toEqual([ERIN])
  })

  it('listAccounts searches handles and DIDs with q', async () => {
    const bob = await w.get(ids.AccountListAccounts, { q: '  @BOB.ex ' })
    expect(bob.body).toMatchObject({ total: 1, q: '  @BOB.ex ' })
    expect(bob.body.accounts).toEqual([view(model.find((m) => m.did === BOB)!)])
    expect(dids((await w.get(ids.AccountListAccounts, { q: 'alice.TEST' })).body.accounts)).toEqual([ALICE])
    expect(dids((await w.get(ids.AccountListAccounts, { q: 'dave' })).body.accounts)).toEqual([])

    const byDid = await w.pageAll(ids.AccountListAccounts, 'accounts', { q: 'filler', limit: 10, sortBy: 'newest' })
    expect(dids(byDid.items)).toEqual(dids(order('newest', model.filter((m) => m.did.includes('filler')))))
    const byHandle = await w.get(ids.AccountListAccounts, { q: 'filler-1', limit: 100 })
    expect(byHandle.body.total).toBe(model.filter((m) => m.handle?.startsWith('filler-1')).length)
    expect((await w.get(ids.AccountListAccounts, { q: '@' })).body.total).toBe(61)
  })

  it('listAccounts rejects bad params and cursors', async () => {
    await expectCursorErrors(w, ids.AccountListAccounts)
    await expectLimitErrors(w, ids.AccountListAccounts, {}, 100)
    expectError(await w.get(ids.AccountListAccounts, { sortBy: 'oldest' }), 400, 'InvalidRequest')
    expectError(await w.get(ids.AccountListAccounts, { offset: -1 }), 400, 'InvalidRequest')
    expectError(await w.get(ids.AccountListAccounts, { viewerDid: 'me' }), 400, 'InvalidRequest')
    expectError(await w.get(ids.AccountListAccounts, { providersOnly: 'yes' }), 400, 'InvalidRequest')
  })

  it('listIncomingFriends lists each friender once, by its oldest friend record, paged', async () => {
    const expectedFriends = [BOB, CAROL, ...fillers]
      .map((friender) => {
        const oldest = friendRecs.filter((f) => f.friender === friender && f.subject === ALICE).sort((a, b) => b.minAgo - a.minAgo)[0]!
        return { friender, oldest }
      })
      .sort((a, b) => a.oldest.minAgo - b.oldest.minAgo || cmpStr(a.friender, b.friender))
      .map(({ friender, oldest }) => {
        const handle = model.find((m) => m.did === friender)!.handle
        return {
          friender,
          // The handle comes from the account, never from the friender's profile.
          ...(handle && friender !== BOB ? { frienderHandle: handle } : {}),
          subject: ALICE,
          uri: oldest.uri,
          createdAt: ago(oldest.minAgo),
        }
      })
    const all = await w.pageAll(ids.AccountListIncomingFriends, 'friends', { did: ALICE, limit: 10 })
    expect(all.items).toEqual(expectedFriends)
    expect(all.items).toHaveLength(59)
    expect(all.items.slice(0, 2).map((f) => f.friender)).toEqual([CAROL, BOB])
    const first = await w.get(ids.AccountListIncomingFriends, { did: ALICE, limit: 10 })
    expect(first.body.total).toBe(59)
    expect((await w.get(ids.AccountListIncomingFriends, { did: ALICE, cursor: first.body.cursor })).body.total).toBe(59)

    // Bob friended by Alice and Carol (and himself); Dave's friend records are hidden.
    const bob = await w.get(ids.AccountListIncomingFriends, { did: BOB })
    expect(bob.body.friends.map((f: Json) => f.friender)).toEqual([ALICE, CAROL, BOB])
    expect(bob.body.total).toBe(3)
    expect(bob.body.cursor).toBeUndefined()
    expect((await w.get(ids.AccountListIncomingFriends, { did: ERIN })).body).toEqual({ friends: [], total: 0 })
  })

  it('listIncomingFriends rejects bad params and cursors', async () => {
    expectError(await w.get(ids.AccountListIncomingFriends), 400, 'InvalidRequest')
    expectError(await w.get(ids.AccountListIncomingFriends, { did: 'alice' }), 400, 'InvalidRequest')
    await expectLimitErrors(w, ids.AccountListIncomingFriends, { did: ALICE }, 200)
    await expectCursorErrors(w, ids.AccountListIncomingFriends, { did: ALICE })
  })

  it('listFriendEdges returns distinct non-self edges between visible accounts, paged', async () => {
    const hidden = new Set([DAVE])
    // Each pair once, with the createdAt of its oldest record.
    const edges = new Map<string, { friender: string; subject: string; createdAt: string; minAgo: number }>()
    for (const f of friendRecs) {
      if (f.friender === f.subject || hidden.has(f.friender) || hidden.has(f.subject)) continue
      const key = `${f.friender} ${f.subject}`
      if ((edges.get(key)?.minAgo ?? -1) < f.minAgo) edges.set(key, { friender: f.friender, subject: f.subject, createdAt: ago(f.minAgo), minAgo: f.minAgo })
    }
    const want = [...edges.values()].map(({ minAgo: _, ...e }) => e).sort((a, b) => cmpStr(a.friender, b.friender) || cmpStr(a.subject, b.subject))
    expect(want).toHaveLength(61)
    const all = await w.pageAll(ids.AccountListFriendEdges, 'edges', { limit: 10 })
    expect(all.items).toEqual(want)
    expect(all.pages).toBe(7)
    const first = await w.get(ids.AccountListFriendEdges, { limit: 10 })
    expect(first.body.total).toBe(61)
    expect((await w.get(ids.AccountListFriendEdges)).body).toEqual({ edges: want, total: 61 })
    await expectCursorErrors(w, ids.AccountListFriendEdges)
    await expectLimitErrors(w, ids.AccountListFriendEdges, {}, 20000)
  })

  it('a reactivated account shows up again', async () => {
    w.store.setStatus(DAVE, true, 'active')
    expect((await w.get(ids.AccountGetProfile, { did: DAVE })).body.profile.displayName).toBe('Dave')
    expect((await w.get(ids.AccountListAccounts, { limit: 2 })).body.accounts[1]).toMatchObject({ did: DAVE, handle: 'dave.test', displayName: 'Dave' })
    expect((await w.get(ids.AccountListAccounts)).body.total).toBe(62)
    expect((await w.get(ids.AccountListIncomingFriends, { did: ALICE })).body.total).toBe(60)
    expect((await w.get(ids.AccountListFriendEdges)).body.total).toBe(63)
    w.store.setStatus(DAVE, false, 'deactivated')
  })
})

describe('query plans', () => {
  it('getProfile reads only the account’s own index ranges and kept aggregates (EXPLAIN QUERY PLAN), never a network-wide range', async () => {
    const w = world()
    const did = plc('planner')
    w.put(did, { $type: ids.AccountProfile, createdAt: ago(5) }, 'self')
    const client = w.db.$client
    const prepare = client.prepare.bind(client)
    const prepared: string[] = []
    client.prepare = ((sql: string) => {
      prepared.push(sql)
      return prepare(sql)
    }) as typeof client.prepare
    try {
      expect((await w.get(ids.AccountGetProfile, { did })).status).toBe(200)
    } finally {
      client.prepare = prepare
    }
    const tables = /\b(records|account_stats|account_weeks|friend_counts)\b/
    const reads = prepared.filter((sql) => tables.test(sql))
    expect(reads.length).toBeGreaterThanOrEqual(6)
    for (const sql of reads) {
      const holes = (sql.match(/\?/g) ?? []).length
      const plan = (prepare(`EXPLAIN QUERY PLAN ${sql}`).all(...Array(holes).fill('x')) as { detail: string }[]).map((p) => p.detail)
      const onTables = plan.filter((d) => / (records|account_stats|account_weeks|friend_counts|p) /.test(`${d} `) && !/accounts_hidden/.test(d))
      expect(onTables.length, sql).toBeGreaterThan(0)
      // A SEARCH bounded by the account (did=? or subject=?), or one row by its key (the profile's uri=?), not a SCAN nor a range of a whole collection.
      for (const d of onTables) expect(d, sql).toMatch(/^SEARCH \w+ USING (COVERING )?INDEX \w+ \(.*\b(did|subject|subject_did|uri)=\?/)
    }
  })
})
