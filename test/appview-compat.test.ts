/**
 * The AppView and the console as the reference network's console reads them,
 * on the real local network (PLC, PDS, firehose, AppView over HTTP, console):
 * every XRPC method the reference AppView serves is answered; getProfile's
 * aggregate, listAccounts' and listFriendEdges' items, field by field on
 * records published through the PDS, validated against the lexicons;
 * service-auth JWTs from the PDS as console credentials, pinned to their
 * method, audience and lifetime, made to the console or to the AppView
 * (directly and through the PDS's `atproto-proxy`), which hands the
 * console's methods over; and device pairing end to end.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { Secp256k1Keypair } from '@atproto/crypto'
import { createServiceJwt } from '@atproto/xrpc-server'
import { ConsoleSessions } from '../console/sessions.ts'
import type { AppView } from '../appview/index.ts'
import type { ConsoleService } from '../console/index.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { lexicons } from '../src/lexicon/validate.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import { attestationRecord, authorizationRecord, jobRecord, providerRecord, putRecord } from '../src/dev/records.ts'
import { startAppView, tempDbPath, waitCaughtUp } from './fixture/appview.ts'
import { signInWithBrowser, startTestConsole } from './fixture/console.ts'
import { launchBrowser } from './fixture/browser.ts'
import { freePort } from './fixture/ports.ts'
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
/** The AppView's DID: the audience of the tokens a PDS mints for `#cocore_appview`. */
let appviewDid: string
const refs: Record<string, { uri: string; cid: string }> = {}

beforeAll(async () => {
  net = await LocalNetwork.create()
  alice = await net.createAccount('alice.test')
  bob = await net.createAccount('bob.test')
  carol = await net.createAccount('carol.test')
  market = await net.createAccount('market.test')
  // Addressed as localhost, whose did:web a PDS resolves over http: the PDS can proxy to it.
  const port = await freePort()
  av = await startAppView(net, tempDbPath(), { http: true, port, publicUrl: `http://localhost:${port}` })
  appviewDid = `did:web:localhost%3A${port}`
  svc = await startTestConsole(net, av.url, { index: av.consoleIndex(), exchangeDid: market.did })
  av.linkConsole(svc.appviewLink)

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

  it('the console asks for credentials on each authenticated method (401, as the reference without a token), and so does the AppView, which hands them to it', async () => {
    for (const base of [svc.url, av.url]) {
      for (const nsid of [...AUTHENTICATED, ids.DevicePairConfirm]) {
        const res = await xrpc(base, nsid, {}, lexicons.getDef(nsid)?.type === 'procedure' ? { method: 'POST' } : {})
        expect(res.status, `${base} ${nsid}`).toBe(401)
        expect(res.body.error).toBe('AuthRequired')
      }
    }
  })

  it('device pairing is served without credentials on the AppView and on the console (/xrpc and /api/xrpc, where the network\'s agent calls)', async () => {
    for (const base of [av.url, svc.url, `${svc.url}/api`]) {
      const started = await xrpc(base, ids.DevicePairStart, {}, { method: 'POST' })
      expect(started.status, base).toBe(200)
      expectValid(ids.DevicePairStart, started.body)
      expect((await xrpc(base, ids.DevicePairPoll, { deviceId: started.body.deviceId })).body).toEqual({ status: 'pending' })
      expect((await xrpc(base, ids.DevicePairPoll)).status).toBe(400)
    }
  })

  it('the AppView publishes #cocore_appview in its did:web document', async () => {
    const doc = await (await fetch(`${av.url}/.well-known/did.json`)).json()
    expect(doc).toMatchObject({ id: appviewDid, service: [{ id: '#cocore_appview', type: 'CocoreAppView', serviceEndpoint: `http://localhost:${new URL(av.url).port}` }] })
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

/** A token minted by the account's PDS, as a reference client gets one (audience: the AppView unless told). */
const mint = async (acct: LocalAccount, lxm: string, aud = appviewDid) => (await acct.agent.com.atproto.server.getServiceAuth({ aud, lxm })).data.token
const bearer = (token: string) => ({ authorization: `Bearer ${token}` })
const postJson = (headers: Record<string, string>, input: unknown): RequestInit => ({ method: 'POST', headers: { ...headers, 'content-type': 'application/json' }, body: JSON.stringify(input) })
const DISPATCH = { model: 'llama-3-8b', prompt: 'hi', maxTokensOut: 8, priceCeiling: { amount: 1000, currency: 'CC' } }

describe('service-auth JWTs on the console', () => {
  /** A token for the console's own door: its audience is the exchange. */
  const pdsToken = (acct: LocalAccount, lxm: string, aud = market.did) => mint(acct, lxm, aud)
  const post = (token: string, input: unknown): RequestInit => postJson(bearer(token), input)

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
    const input = DISPATCH
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

describe('service-auth JWTs sent to the AppView, as reference clients send them', () => {
  it('createApiKey, listApiKeys, revokeApiKey and deleteApiKey with the AppView as audience act on the issuer\'s keys at the console', async () => {
    const created = await xrpc(av.url, ids.AccountCreateApiKey, {}, postJson(bearer(await mint(bob, ids.AccountCreateApiKey)), { name: 'via the AppView' }))
    expect(created.status, JSON.stringify(created.body)).toBe(200)
    expectValid(ids.AccountCreateApiKey, created.body)
    expect(created.body.key).toMatchObject({ did: bob.did, name: 'via the AppView' })
    // The console holds it: its own door (the exchange's audience) lists it too.
    const direct = await xrpc(svc.url, ids.AccountListApiKeys, {}, { headers: bearer(await mint(bob, ids.AccountListApiKeys, market.did)) })
    expect(direct.body.keys.map((k: Json) => k.id)).toEqual([created.body.key.id])
    const listed = await xrpc(av.url, ids.AccountListApiKeys, {}, { headers: bearer(await mint(bob, ids.AccountListApiKeys)) })
    expect(listed.body.keys.map((k: Json) => k.id)).toEqual([created.body.key.id])
    expect((await xrpc(av.url, ids.AccountRevokeApiKey, {}, postJson(bearer(await mint(bob, ids.AccountRevokeApiKey)), { id: created.body.key.id }))).body).toEqual({ revoked: true })
    expect((await xrpc(av.url, ids.AccountDeleteApiKey, {}, postJson(bearer(await mint(bob, ids.AccountDeleteApiKey)), { id: created.body.key.id }))).body).toEqual({ deleted: true })
  })

  it('dispatch with the AppView as audience gets past authentication (the exchange then asks for a console sign-in)', async () => {
    const res = await xrpc(av.url, ids.InferenceDispatch, {}, postJson(bearer(await mint(alice, ids.InferenceDispatch)), DISPATCH))
    expect(res.status, JSON.stringify(res.body)).toBe(403)
    expect(res.body.error).toBe('PdsSessionRequired')
  })

  it('each door takes its own audience, the method the token names, once, for at most 5 minutes', async () => {
    const refused = async (base: string, token: string, error: string, nsid = ids.AccountListApiKeys) => {
      const res = await xrpc(base, nsid, {}, { headers: bearer(token) })
      expect(res.status, JSON.stringify(res.body)).toBe(401)
      expect(res.body.error).toBe(error)
    }
    // A token for the exchange is not one for the AppView, nor the other way round.
    await refused(av.url, await mint(alice, ids.AccountListApiKeys, market.did), 'BadJwtAudience')
    await refused(svc.url, await mint(alice, ids.AccountListApiKeys), 'BadJwtAudience')
    await refused(av.url, await mint(alice, ids.AccountCreateApiKey), 'BadJwtLexiconMethod')
    const wrongMethod = await xrpc(av.url, ids.InferenceDispatch, {}, postJson(bearer(await mint(alice, ids.AccountListApiKeys)), DISPATCH))
    expect(wrongMethod.body.error).toBe('BadJwtLexiconMethod')

    const once = await mint(alice, ids.AccountListApiKeys)
    expect((await xrpc(av.url, ids.AccountListApiKeys, {}, { headers: bearer(once) })).status).toBe(200)
    await refused(av.url, once, 'JwtReplayed')

    const keypair = await net.net.pds.ctx.actorStore.keypair(alice.did)
    const now = Math.floor(Date.now() / 1000)
    const sign = (exp: number) => createServiceJwt({ iss: alice.did, aud: appviewDid, lxm: ids.AccountListApiKeys, keypair, exp })
    expect((await xrpc(av.url, ids.AccountListApiKeys, {}, { headers: bearer(await sign(now + 60)) })).status).toBe(200)
    await refused(av.url, await sign(now + 3600), 'BadJwt')
    await refused(av.url, await sign(now - 10), 'JwtExpired')
  })

  it('the AppView hands over bearer credentials only, never the console\'s cookies', async () => {
    const { token } = new ConsoleSessions(svc.db, Buffer.alloc(32)).create(alice.did, 'test', undefined)
    const cookie = { cookie: `cocore_session=${token}` }
    expect((await xrpc(svc.url, ids.AccountListApiKeys, {}, { headers: cookie })).status).toBe(200)
    const res = await xrpc(av.url, ids.AccountListApiKeys, {}, { headers: cookie })
    expect(res.status).toBe(401)
    expect(res.body.error).toBe('AuthRequired')
  })

  it('an AppView with no console linked answers them as not implemented', async () => {
    const alone = await startAppView(net, tempDbPath(), { http: true, index: false })
    try {
      const res = await xrpc(alone.url, ids.AccountListApiKeys, {}, { headers: bearer(await mint(alice, ids.AccountListApiKeys)) })
      expect(res.status).toBe(501)
      expect(res.body.error).toBe('MethodNotImplemented')
    } finally {
      await alone.stop()
    }
  })

  it("reach the console through the PDS's atproto-proxy to the AppView's #cocore_appview", async () => {
    const session = alice.agent.session!
    const viaPds = (nsid: string, init: RequestInit = {}) =>
      fetch(`${net.pdsUrl}/xrpc/${nsid}`, {
        ...init,
        headers: { ...(init.headers as Record<string, string>), authorization: `Bearer ${session.accessJwt}`, 'atproto-proxy': `${appviewDid}#cocore_appview` },
      })
    const created = await viaPds(ids.AccountCreateApiKey, postJson({}, { name: 'through my PDS' }))
    const key = (await created.json()) as Json
    expect(created.status, JSON.stringify(key)).toBe(200)
    expect(key.key).toMatchObject({ did: alice.did, name: 'through my PDS' })
    const listed = (await (await viaPds(ids.AccountListApiKeys)).json()) as Json
    expect(listed.keys.map((k: Json) => k.id)).toContain(key.key.id)
    const dispatched = await viaPds(ids.InferenceDispatch, postJson({}, DISPATCH))
    expect(dispatched.status).toBe(403)
    expect(((await dispatched.json()) as Json).error).toBe('PdsSessionRequired')
    expect((await (await viaPds(ids.AccountDeleteApiKey, postJson({}, { id: key.key.id }))).json()) as Json).toEqual({ deleted: true })
  })
})

describe('device pairing', () => {
  const CODE = /^[ABCDEFGHJKMNPQRSTUVWXYZ23456789]{8}$/
  const start = async (base = av.url, headers: Record<string, string> = {}) => {
    const res = await xrpc(base, ids.DevicePairStart, {}, { method: 'POST', headers })
    expect(res.status, JSON.stringify(res.body)).toBe(200)
    return res.body as { deviceId: string; userCode: string; verificationUri: string; pollIntervalSecs: number; expiresInSecs: number }
  }
  const poll = (deviceId: string, base = av.url, headers: Record<string, string> = {}) => xrpc(base, ids.DevicePairPoll, { deviceId }, { headers })
  /** Confirmed as the network's console does it: a service-auth token from the approver's PDS, to the AppView. */
  const confirm = async (acct: LocalAccount, userCode: string, decision: 'approve' | 'deny', base = av.url, aud = appviewDid, headers: Record<string, string> = {}) =>
    xrpc(base, ids.DevicePairConfirm, {}, postJson({ ...headers, ...bearer(await mint(acct, ids.DevicePairConfirm, aud)) }, { userCode, decision }))

  it('start, poll pending, confirm with a PDS-minted token, poll the key once; the key works', async () => {
    const started = await start()
    expect(started).toMatchObject({ verificationUri: `${svc.url}/devices/new?code=${started.userCode}`, pollIntervalSecs: 3, expiresInSecs: 600 })
    expect(started.userCode).toMatch(CODE)
    expect(started.deviceId.length).toBeGreaterThanOrEqual(43)
    expect((await poll(started.deviceId)).body).toEqual({ status: 'pending' })

    // Nothing a guesser could use is stored: neither the code nor the device id.
    const rows = JSON.stringify(svc.db.$client.prepare('SELECT * FROM device_pairs').all())
    expect(rows).not.toContain(started.userCode)
    expect(rows).not.toContain(started.deviceId)

    // Typed as people type it: lower case, with a dash.
    const typed = `${started.userCode.slice(0, 4)}-${started.userCode.slice(4)}`.toLowerCase()
    const approved = await confirm(alice, typed, 'approve')
    expect(approved.status, JSON.stringify(approved.body)).toBe(200)
    expect(approved.body).toEqual({ ok: true, status: 'approved' })
    // Single use: approved once.
    const again = await confirm(alice, started.userCode, 'approve')
    expect([again.status, again.body.error]).toEqual([409, 'Conflict'])

    const got = await poll(started.deviceId)
    expect(got.status, JSON.stringify(got.body)).toBe(200)
    expectValid(ids.DevicePairPoll, got.body)
    expect(got.body).toMatchObject({ status: 'session', session: { did: alice.did, handle: 'alice.test', apiBase: svc.url } })
    const apiKey = got.body.session.apiKey as string
    expect(apiKey).toMatch(/^cocore_/)
    // Collected once: then consumed, its code names nothing, and no secret is left at rest.
    expect(await poll(started.deviceId)).toMatchObject({ status: 410, body: { status: 'consumed' } })
    expect((await confirm(alice, started.userCode, 'deny')).status).toBe(404)
    expect(svc.db.$client.prepare('SELECT count(*) FROM device_pairs WHERE sealed_session IS NOT NULL').pluck().get()).toBe(0)

    // The key is the account's: it gets past authentication (dispatch then asks for a console sign-in).
    const used = await xrpc(svc.url, ids.InferenceDispatch, {}, postJson(bearer(apiKey), DISPATCH))
    expect([used.status, used.body.error]).toEqual([403, 'PdsSessionRequired'])
    const keys = (await xrpc(svc.url, ids.AccountListApiKeys, {}, { headers: bearer(await mint(alice, ids.AccountListApiKeys, market.did)) })).body.keys as Json[]
    const paired = keys.find((k) => (k.name as string).startsWith('paired machine ('))!
    expect(paired).toMatchObject({ scopes: ['inference', 'read'] })
    expect(paired.lastUsedAt).toBeDefined()
    const audit = svc.db.$client.prepare(`SELECT action, detail FROM audit_log WHERE did = ? AND action LIKE 'device-pair-%'`).all(alice.did) as { action: string; detail: string }[]
    expect(audit.map((a) => a.action)).toEqual(['device-pair-approve'])
    expect(JSON.parse(audit[0]!.detail)).toEqual({ key: paired.id, via: 'service-auth' })
  })

  it('guessed codes and device ids name nothing', async () => {
    await start()
    const res = await confirm(bob, 'ABCD2345', 'approve')
    expect([res.status, res.body.error]).toEqual([404, 'NotFound'])
    expect((await confirm(bob, 'not a code', 'approve')).status).toBe(404)
    expect(await poll('A'.repeat(43))).toMatchObject({ status: 404, body: { status: 'unknown' } })
  })

  it('a denied pairing tells the device so and cannot be approved; its approver may deny it until the device collects, which revokes the key', async () => {
    const denied = await start()
    expect((await confirm(bob, denied.userCode, 'deny')).body).toEqual({ ok: true, status: 'denied' })
    expect(await poll(denied.deviceId)).toMatchObject({ status: 403, body: { status: 'denied' } })
    expect((await confirm(bob, denied.userCode, 'approve')).status).toBe(409)

    const changed = await start()
    expect((await confirm(bob, changed.userCode, 'approve')).body.status).toBe('approved')
    // Another account cannot undo bob's approval.
    expect((await confirm(carol, changed.userCode, 'deny')).status).toBe(409)
    expect((await confirm(bob, changed.userCode, 'deny')).body).toEqual({ ok: true, status: 'denied' })
    expect(await poll(changed.deviceId)).toMatchObject({ status: 403, body: { status: 'denied' } })
    const keys = (await xrpc(av.url, ids.AccountListApiKeys, {}, { headers: bearer(await mint(bob, ids.AccountListApiKeys)) })).body.keys as Json[]
    expect(keys.filter((k) => (k.name as string).startsWith('paired machine (')).map((k) => !!k.revokedAt)).toEqual([true])
  })

  it('the verification page: the owner, signed in, approves the code the device shows; the device then collects its key', async () => {
    const browser = await launchBrowser()
    try {
      const page = await signInWithBrowser(browser, svc.url, carol.handle, carol.password)
      const started = await start()
      await page.goto(started.verificationUri)
      expect(await page.locator('input[name=code]').inputValue()).toBe(started.userCode)
      await page.getByRole('button', { name: 'Approve' }).click()
      expect(await page.getByRole('status').textContent()).toContain('Approved')
      expect(await poll(started.deviceId)).toMatchObject({ status: 200, body: { status: 'session', session: { did: carol.did, handle: 'carol.test' } } })
      // A code that names nothing: said so, nothing done.
      await page.goto(`${svc.url}/devices/new?code=ZZZZ3333`)
      await page.getByRole('button', { name: 'Deny' }).click()
      expect(await page.getByRole('alert').textContent()).toContain('no pairing in progress uses this code')
    } finally {
      await browser.close()
    }
  })

  describe('expiry and limits', () => {
    let short: ConsoleService
    let front: AppView
    const TTL = 1500
    beforeAll(async () => {
      // Tight limits, a short lifetime, and an AppView whose X-Forwarded-For (from loopback) names the client.
      short = await startTestConsole(net, av.url, { exchangeDid: market.did, devicePair: { ttlMs: TTL, startsPerMinute: 2, pollsPerMinute: 3 }, apiKeyIpFailuresPerMinute: 3 })
      const port = await freePort()
      front = await startAppView(net, tempDbPath(), { http: true, index: false, port, publicUrl: `http://localhost:${port}`, trustedProxies: ['127.0.0.1'] })
      front.linkConsole(short.appviewLink)
    })
    afterAll(async () => {
      await front?.stop()
      await short?.close()
    })
    const from = (ip: string) => ({ 'x-forwarded-for': ip })
    const frontDid = () => `did:web:localhost%3A${new URL(front.url).port}`

    it('an expired pairing is refused; one approved but never collected expires too, and its key is revoked', async () => {
      const waiting = await start(front.url, from('10.0.0.1'))
      const approved = await start(front.url, from('10.0.0.2'))
      expect((await confirm(carol, approved.userCode, 'approve', front.url, frontDid(), from('10.0.0.2'))).body.status).toBe('approved')
      await new Promise((r) => setTimeout(r, TTL + 100))
      expect(await poll(waiting.deviceId, front.url, from('10.0.0.1'))).toMatchObject({ status: 410, body: { status: 'expired' } })
      expect(await poll(approved.deviceId, front.url, from('10.0.0.2'))).toMatchObject({ status: 410, body: { status: 'expired' } })
      expect((await confirm(carol, waiting.userCode, 'approve', front.url, frontDid(), from('10.0.0.1'))).status).toBe(404)
      const keys = (await xrpc(short.url, ids.AccountListApiKeys, {}, { headers: bearer(await mint(carol, ids.AccountListApiKeys, market.did)) })).body.keys as Json[]
      expect(keys.map((k) => !!k.revokedAt)).toEqual([true])
      expect(short.db.$client.prepare('SELECT count(*) FROM device_pairs WHERE sealed_session IS NOT NULL').pluck().get()).toBe(0)
    })

    it('starts and polls are limited per client address (the one the AppView saw), with Retry-After', async () => {
      const a = await start(front.url, from('10.1.0.1'))
      await start(front.url, from('10.1.0.1'))
      const third = await fetch(`${front.url}/xrpc/${ids.DevicePairStart}`, { method: 'POST', headers: from('10.1.0.1') })
      expect(third.status).toBe(429)
      expect(Number(third.headers.get('retry-after'))).toBeGreaterThan(0)
      // Another address is not held back; nor is the console's own door for its own peer.
      await start(front.url, from('10.1.0.2'))
      await start(short.url)
      for (let i = 0; i < 3; i++) expect((await poll(a.deviceId, front.url, from('10.1.0.3'))).status).toBe(200)
      expect((await poll(a.deviceId, front.url, from('10.1.0.3'))).status).toBe(429)
    })

    it('wrong codes and unknown device ids count as refused credentials of the address, and wrong codes against the account', async () => {
      const guess = (acct: LocalAccount, ip: string) => confirm(acct, 'ZZZZ2222', 'approve', front.url, frontDid(), from(ip))
      for (let i = 0; i < 3; i++) expect((await guess(alice, '10.2.0.1')).status).toBe(404)
      // The address is now refused everything, a right code or an API-key call alike, before any lookup.
      const blocked = await guess(alice, '10.2.0.1')
      expect([blocked.status, blocked.body.error]).toEqual([429, 'RateLimitExceeded'])
      expect((await poll('x'.repeat(43), front.url, from('10.2.0.1'))).status).toBe(429)
      for (let i = 0; i < 3; i++) expect((await poll('y'.repeat(43), front.url, from('10.2.0.2'))).status).toBe(404)
      expect((await poll('y'.repeat(43), front.url, from('10.2.0.2'))).status).toBe(429)
      // Ten wrong codes from ten addresses: the account is held back, from any address.
      for (let i = 0; i < 10; i++) expect((await guess(bob, `10.3.0.${i}`)).status).toBe(404)
      expect((await guess(bob, '10.3.1.1')).status).toBe(429)
    })
  })
})
