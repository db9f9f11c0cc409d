/**
 * The AppView and the console as the reference network's console reads them,
 * on the real local network (PLC, PDS, firehose, AppView over HTTP, console):
 * every XRPC method the reference AppView serves is answered; getProfile's
 * aggregate, listAccounts' and listFriendEdges' items, field by field on
 * records published through the PDS, validated against the lexicons; and
 * service-auth JWTs from the PDS as console credentials, pinned to their
 * method, audience and lifetime.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { Secp256k1Keypair } from '@atproto/crypto'
import { createServiceJwt } from '@atproto/xrpc-server'
import type { AppView } from '../appview/index.ts'
import type { ConsoleService } from '../console/index.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { lexicons } from '../src/lexicon/validate.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import { attestationRecord, authorizationRecord, jobRecord, providerRecord, putRecord } from '../src/dev/records.ts'
import { startAppView, tempDbPath, waitCaughtUp } from './fixture/appview.ts'
import { startTestConsole } from './fixture/console.ts'
import { signedReceipt, usd } from './fixture/records.ts'

type Json = Record<string, any>

const DAY = 24 * 3600_000
const WEEK = 7 * DAY
const NOW = Date.now()
/** Monday 00:00 UTC of the current week, found by stepping back a day at a time (independently of the AppView's arithmetic). */
const currentMonday = (() => {
  let t = Math.floor(NOW / DAY) * DAY
  while (new Date(t).getUTCDay() !== 1) t -= DAY
  return t
})()
const oldestMonday = currentMonday - 51 * WEEK
/** A time inside week `w` of the profile series (0 = the oldest, 51 = this week: its first minutes, so in the past; negative = before the window). */
const inWeek = (w: number, hour = 0) => new Date(w === 51 ? currentMonday + (hour + 1) * 60_000 : oldestMonday + w * WEEK + 3 * DAY + hour * 3600_000).toISOString()
/** 52 zeros with the given weeks set. */
const weeks = (set: Record<number, number>) => Array.from({ length: 52 }, (_, i) => set[i] ?? 0)


let net: LocalNetwork
let av: AppView
let svc: ConsoleService
let alice: LocalAccount
let bob: LocalAccount
let carol: LocalAccount
let market: LocalAccount
const refs: Record<string, { uri: string; cid: string }> = {}

beforeAll(async () => {
  net = await LocalNetwork.create()
  alice = await net.createAccount('alice.test')
  bob = await net.createAccount('bob.test')
  carol = await net.createAccount('carol.test')
  market = await net.createAccount('market.test')
  av = await startAppView(net, tempDbPath(), { http: true })
  svc = await startTestConsole(net, av.url, { index: av.consoleIndex(), exchangeDid: market.did })

  const put = (acct: LocalAccount, record: Json, rkey?: string) => putRecord(acct.agent, acct.did, record, rkey)
  const signer = P256Signer.generate()
  // Alice: a profile long ago, machines before and inside the window, jobs and receipts in a few weeks.
  refs.profile = await put(alice, { $type: ids.AccountProfile, displayName: 'Alice', bio: 'runs a box', avatarUrl: 'https://example.com/a.png', createdAt: inWeek(-18) }, 'self')
  refs.attestation = await put(alice, attestationRecord(signer)) // undated: not the account's first record
  refs.oldMachine = await put(alice, { ...usd(providerRecord(signer)), machineLabel: 'old', createdAt: inWeek(-8) })
  refs.midMachine = await put(alice, { ...usd(providerRecord(signer)), machineLabel: 'mid', active: false, createdAt: inWeek(10) })
  refs.newMachine = await put(alice, { ...usd(providerRecord(signer)), machineLabel: 'new', active: true, createdAt: inWeek(51, 1) })
  const auth = await put(alice, { ...usd(authorizationRecord(market.did)), createdAt: inWeek(-2) })
  for (const [w, hour] of [[-1, 0], [0, 0], [48, 0], [48, 5], [51, 2]] as const) refs[`job${w}.${hour}`] = await put(alice, { ...usd(jobRecord(auth)), createdAt: inWeek(w, hour) })
  const receipt = async (w: number, hour: number, ms: number, tokens: { in: number; out: number }) => {
    const completedAt = inWeek(w, hour)
    return put(alice, signedReceipt(signer, { job: refs['job48.0']!, requester: alice.did, attestation: refs.attestation!, completedAt, ms, tokens }))
  }
  await receipt(-3, 0, 50, { in: 1000, out: 1000 })
  await receipt(40, 0, 300, { in: 100, out: 1 })
  await receipt(40, 1, 200, { in: 7, out: 0 })
  await receipt(51, 3, 100, { in: 10, out: 5 })
  // Friends of Alice: Bob twice (counted once, at his first record), Carol this week. Alice friends Bob.
  refs.bobFirst = await put(bob, { $type: ids.AccountFriend, subject: alice.did, createdAt: '2020-01-01T00:00:00+02:00' })
  await put(bob, { $type: ids.AccountFriend, subject: alice.did, createdAt: inWeek(45) })
  await put(bob, { $type: ids.AccountFriend, subject: alice.did, createdAt: inWeek(20) })
  await put(carol, { $type: ids.AccountFriend, subject: alice.did, createdAt: inWeek(51) })
  await put(alice, { $type: ids.AccountFriend, subject: bob.did, createdAt: inWeek(30) })
  await waitCaughtUp(av, net)
}, 120_000)

afterAll(async () => {
  await svc?.close()
  await av?.stop()
  await net?.close()
})

async function xrpc(base: string, nsid: string, params: Record<string, string> = {}, init: RequestInit = {}): Promise<{ status: number; body: Json }> {
  const qs = new URLSearchParams(params)
  const res = await fetch(`${base}/xrpc/${nsid}${qs.size ? `?${qs}` : ''}`, init)
  return { status: res.status, body: (await res.json()) as Json }
}

/** Throws unless `value` is valid against the lexicon def `ref` (an output, or a def such as getProfile#profileView). */
function expectValid(ref: string, value: unknown) {
  const res = ref.includes('#') ? lexicons.validate(ref, value) : (lexicons.assertValidXrpcOutput(ref, value), { success: true })
  expect(res.success, res.success ? '' : String((res as { error: Error }).error)).toBe(true)
}

describe('inventory: every XRPC method the reference AppView serves', () => {
  // The reference AppView's reads: public GETs, answered by our AppView.
  const READS = [
    ids.ComputeListProviders,
    ids.AccountListProfiles,
    ids.AccountGetProfile,
    ids.AccountListIncomingFriends,
    ids.AccountListFriendEdges,
    ids.AccountListAccounts,
    ids.ComputeListReceipts,
    ids.ComputeListJobs,
    ids.ComputeListSettlements,
    ids.ComputeLatency,
    ids.ComputeModelActivity,
    ids.ComputeVerifyReceipt,
    ids.ComputeVerifySettlement,
  ]
  // Its authenticated methods (service auth there), answered by our console.
  const AUTHENTICATED = [ids.AccountListApiKeys, ids.AccountCreateApiKey, ids.AccountRevokeApiKey, ids.AccountDeleteApiKey, ids.InferenceDispatch]

  it('the AppView answers each read without credentials (400 for a missing parameter, never 501)', async () => {
    for (const nsid of READS) {
      const res = await xrpc(av.url, nsid)
      expect(res.status, `${nsid}: ${JSON.stringify(res.body)}`).toBeLessThan(500)
      expect([200, 400]).toContain(res.status)
    }
  })

  it('the console asks for credentials on each authenticated method (401, as the reference without a token)', async () => {
    for (const nsid of AUTHENTICATED) {
      const res = await xrpc(svc.url, nsid)
      expect(res.status, nsid).toBe(401)
      expect(res.body.error).toBe('AuthRequired')
    }
  })

  it('/healthz answers {"ok":true}', async () => {
    const res = await fetch(`${av.url}/healthz`)
    expect(res.status).toBe(200)
    expect(await res.json()).toEqual({ ok: true })
  })
})

describe('getProfile', () => {
  it('returns the reference aggregate, field by field', async () => {
    const res = await xrpc(av.url, ids.AccountGetProfile, { did: alice.did })
    expect(res.status).toBe(200)
    expectValid(ids.AccountGetProfile, res.body)
    const p = res.body.profile
    expectValid(`${ids.AccountGetProfile}#profileView`, p)
    expect(Object.keys(p).sort()).toEqual(
      ['did', 'handle', 'displayName', 'bio', 'avatarUrl', 'joinedAt', 'lastActivityAt', 'machines', 'jobCount', 'receiptCount', 'incomingFriendsCount', 'weekSeries', 'latency'].sort(),
    )
    expect(p).toMatchObject({
      did: alice.did,
      handle: 'alice.test',
      displayName: 'Alice',
      bio: 'runs a box',
      avatarUrl: 'https://example.com/a.png',
      // The oldest dated record (the attestation has no time), and the newest.
      joinedAt: inWeek(-18),
      lastActivityAt: inWeek(51, 3),
      jobCount: 5,
      receiptCount: 4,
      // Bob (three records) and Carol.
      incomingFriendsCount: 2,
    })

    const machine = { chip: 'x86_64', ramGB: 32, supportedModels: ['llama-3-8b'], trustLevel: 'self-attested' }
    expect(p.machines).toEqual([
      { rkey: refs.newMachine!.uri.split('/').pop(), machineLabel: 'new', active: true, createdAt: inWeek(51, 1), ...machine },
      { rkey: refs.midMachine!.uri.split('/').pop(), machineLabel: 'mid', active: false, createdAt: inWeek(10), ...machine },
      { rkey: refs.oldMachine!.uri.split('/').pop(), machineLabel: 'old', active: null, createdAt: inWeek(-8), ...machine },
    ])

    expect(p.weekSeries).toEqual({
      oldestWeekStart: new Date(oldestMonday).toISOString().slice(0, 10),
      // Records before the window are not in any week.
      jobsDispatched: weeks({ 0: 1, 48: 2, 51: 1 }),
      receiptsServed: weeks({ 40: 2, 51: 1 }),
      // The machine from before the window counts from the first week.
      machinesIndexedCumulative: Array.from({ length: 52 }, (_, i) => (i < 10 ? 1 : i < 51 ? 2 : 3)),
      tokensIndexed: weeks({ 40: 108, 51: 15 }),
      // Bob at his first record (2020: before the window), Carol this week.
      trustedByNew: weeks({ 51: 1 }),
    })
    expect(new Date(`${p.weekSeries.oldestWeekStart}T00:00:00Z`).getUTCDay()).toBe(1)

    // Newest first: 100 (this week), 200, 300, 50; nearest rank.
    expect(p.latency).toEqual({ sampleCount: 4, p50Ms: 100, p95Ms: 300, avgMs: 163, lastMs: 100 })
  })

  it('has nulls, zeros and empty lists for an account with one friend record and no profile', async () => {
    const res = await xrpc(av.url, ids.AccountGetProfile, { did: carol.did })
    expect(res.status).toBe(200)
    expectValid(`${ids.AccountGetProfile}#profileView`, res.body.profile)
    expect(res.body.profile).toEqual({
      did: carol.did,
      handle: 'carol.test',
      displayName: null,
      bio: null,
      avatarUrl: null,
      joinedAt: inWeek(51),
      lastActivityAt: inWeek(51),
      machines: [],
      jobCount: 0,
      receiptCount: 0,
      incomingFriendsCount: 0,
      weekSeries: {
        oldestWeekStart: new Date(oldestMonday).toISOString().slice(0, 10),
        jobsDispatched: weeks({}),
        receiptsServed: weeks({}),
        machinesIndexedCumulative: weeks({}),
        tokensIndexed: weeks({}),
        trustedByNew: weeks({}),
      },
      latency: { sampleCount: 0, p50Ms: null, p95Ms: null, avgMs: null, lastMs: null },
    })
    expect((await xrpc(av.url, ids.AccountGetProfile, { did: bob.did })).body.profile.incomingFriendsCount).toBe(1)
  })

  it('is 404 for an account with no record, 400 without a DID', async () => {
    expect((await xrpc(av.url, ids.AccountGetProfile, { did: market.did })).status).toBe(404)
    expect((await xrpc(av.url, ids.AccountGetProfile, { did: 'alice' })).status).toBe(400)
  })
})

describe('listAccounts and listFriendEdges', () => {
  it('listAccounts items carry joinedAt and isProvider, and null for absent profile fields', async () => {
    const res = await xrpc(av.url, ids.AccountListAccounts, { sortBy: 'newest' })
    expect(res.status).toBe(200)
    expectValid(ids.AccountListAccounts, res.body)
    expect(res.body.accounts).toEqual([
      { did: carol.did, handle: 'carol.test', displayName: null, avatarUrl: null, joinedAt: inWeek(51), lastActivityAt: inWeek(51), providerCount: 0, isProvider: false },
      { did: alice.did, handle: 'alice.test', displayName: 'Alice', avatarUrl: 'https://example.com/a.png', joinedAt: inWeek(-18), lastActivityAt: inWeek(51, 3), providerCount: 3, isProvider: true },
      { did: bob.did, handle: 'bob.test', displayName: null, avatarUrl: null, joinedAt: '2019-12-31T22:00:00.000Z', lastActivityAt: inWeek(45), providerCount: 0, isProvider: false },
    ])
  })

  it('listFriendEdges edges carry the createdAt of their oldest record, as published', async () => {
    const res = await xrpc(av.url, ids.AccountListFriendEdges)
    expect(res.status).toBe(200)
    expectValid(ids.AccountListFriendEdges, res.body)
    const edges = new Map(res.body.edges.map((e: Json) => [`${e.friender} ${e.subject}`, e.createdAt]))
    expect(edges).toEqual(
      new Map([
        [`${bob.did} ${alice.did}`, '2020-01-01T00:00:00+02:00'],
        [`${carol.did} ${alice.did}`, inWeek(51)],
        [`${alice.did} ${bob.did}`, inWeek(30)],
      ]),
    )
    expect(res.body.total).toBe(3)
  })
})

describe('service-auth JWTs on the console', () => {
  /** A token minted by the account's PDS, as a reference client gets one. */
  const pdsToken = async (acct: LocalAccount, lxm: string, aud = market.did) => (await acct.agent.com.atproto.server.getServiceAuth({ aud, lxm })).data.token
  const bearer = (token: string) => ({ authorization: `Bearer ${token}` })
  const post = (token: string, input: unknown): RequestInit => ({ method: 'POST', headers: { ...bearer(token), 'content-type': 'application/json' }, body: JSON.stringify(input) })

  it('are accepted for the method they name, acting for their issuer', async () => {
    const created = await xrpc(svc.url, ids.AccountCreateApiKey, {}, post(await pdsToken(alice, ids.AccountCreateApiKey), { name: 'from my PDS' }))
    expect(created.status, JSON.stringify(created.body)).toBe(200)
    expect(created.body.key).toMatchObject({ name: 'from my PDS' })
    const listed = await xrpc(svc.url, ids.AccountListApiKeys, {}, { headers: bearer(await pdsToken(alice, ids.AccountListApiKeys)) })
    expect(listed.status).toBe(200)
    expect(listed.body.keys.map((k: Json) => k.id)).toEqual([created.body.key.id])
    // Bob's token sees Bob's keys only; /api/xrpc is the same door.
    const bobs = await fetch(`${svc.url}/api/xrpc/${ids.AccountListApiKeys}`, { headers: bearer(await pdsToken(bob, ids.AccountListApiKeys)) })
    expect(await bobs.json()).toEqual({ keys: [] })
    const audit = svc.db.$client.prepare(`SELECT action, detail FROM audit_log WHERE did = ? AND action = 'api-key-create'`).all(alice.did) as { detail: string }[]
    expect(JSON.parse(audit[0]!.detail)).toMatchObject({ via: 'service-auth' })

    const revoked = await xrpc(svc.url, ids.AccountRevokeApiKey, {}, post(await pdsToken(alice, ids.AccountRevokeApiKey), { id: created.body.key.id }))
    expect(revoked.body).toEqual({ revoked: true })
    const deleted = await xrpc(svc.url, ids.AccountDeleteApiKey, {}, post(await pdsToken(alice, ids.AccountDeleteApiKey), { id: created.body.key.id }))
    expect(deleted.body).toEqual({ deleted: true })
  })

  it('reach dispatch: past authentication, the exchange asks for a console sign-in (no PDS session to publish the job)', async () => {
    const input = { model: 'llama-3-8b', prompt: 'hi', maxTokensOut: 8, priceCeiling: { amount: 1000, currency: 'CC' } }
    const res = await xrpc(svc.url, ids.InferenceDispatch, {}, post(await pdsToken(alice, ids.InferenceDispatch), input))
    expect(res.status, JSON.stringify(res.body)).toBe(403)
    expect(res.body.error).toBe('PdsSessionRequired')
    const wrong = await xrpc(svc.url, ids.InferenceDispatch, {}, post(await pdsToken(alice, ids.AccountListApiKeys), input))
    expect(wrong.status).toBe(401)
    expect(wrong.body.error).toBe('BadJwtLexiconMethod')
  })

  it('are refused for another method, another audience, expired, too long-lived, replayed or badly signed', async () => {
    const list = (token: string) => xrpc(svc.url, ids.AccountListApiKeys, {}, { headers: bearer(token) })
    const refused = async (token: string, error: string) => {
      const res = await list(token)
      expect(res.status, JSON.stringify(res.body)).toBe(401)
      expect(res.body.error).toBe(error)
    }
    await refused(await pdsToken(alice, ids.AccountCreateApiKey), 'BadJwtLexiconMethod')
    await refused(await pdsToken(alice, ids.AccountListApiKeys, bob.did), 'BadJwtAudience')

    const keypair = await net.net.pds.ctx.actorStore.keypair(alice.did)
    const sign = (exp: number, kp = keypair) => createServiceJwt({ iss: alice.did, aud: market.did, lxm: ids.AccountListApiKeys, keypair: kp, exp })
    const now = Math.floor(Date.now() / 1000)
    expect((await list(await sign(now + 60))).status).toBe(200)
    await refused(await sign(now - 10), 'JwtExpired')
    await refused(await sign(now + 3600), 'BadJwt')
    await refused(await sign(now + 60, await Secp256k1Keypair.create()), 'BadJwtSignature')

    const once = await pdsToken(alice, ids.AccountListApiKeys)
    expect((await list(once)).status).toBe(200)
    await refused(once, 'JwtReplayed')
  })

  it('are refused by a console with no service DID', async () => {
    const plain = await startTestConsole(net, av.url)
    try {
      const res = await xrpc(plain.url, ids.AccountListApiKeys, {}, { headers: bearer(await pdsToken(alice, ids.AccountListApiKeys)) })
      expect(res.status).toBe(401)
      expect(res.body.error).toBe('AuthRequired')
    } finally {
      await plain.close()
    }
  })
})
