/**
 * The provider gateway (/v1/agent): registration is bound to the provider's
 * DID by a service-auth token its own PDS minted for this exchange, and the
 * announced encryption key must be the one its signed, indexed provider record
 * publishes. Real PDS, real tokens, real AppView index.
 */
import { randomBytes } from 'node:crypto'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { WebSocket } from 'ws'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { providerRecord, putRecord } from '../src/dev/records.ts'
import { canonicalBytes } from '../src/crypto/canonical-json.ts'
import { attestationChallengePayload, REGISTER_LXM } from '../src/protocol/agent.ts'
import { connectScripted, publishScriptedRecord } from './fixture/scripted-provider.ts'
import type { ConsoleService } from '../console/index.ts'
import type { AppView } from '../appview/index.ts'
import { startAppView, tempDbPath } from './fixture/appview.ts'
import { startTestConsole } from './fixture/console.ts'
import { waitFor } from './fixture/wait.ts'

let net: LocalNetwork
let av: AppView
let svc: ConsoleService
let rig: LocalAccount
let bob: LocalAccount
let exchange: LocalAccount
const encKey = randomBytes(32).toString('base64')
const attestationKey = P256Signer.generate()

beforeAll(async () => {
  net = await LocalNetwork.create()
  rig = await net.createAccount('rig.test')
  bob = await net.createAccount('bob.test')
  exchange = await net.createAccount('market.test')
  av = await startAppView(net, tempDbPath())
  svc = await startTestConsole(net, 'http://127.0.0.1:1', { index: av.consoleIndex(), exchangeDid: exchange.did })
  const rec = await putRecord(rig.agent, rig.did, providerRecord(attestationKey, encKey))
  await waitFor(() => av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(rec.uri), 'provider record indexed')
})
afterAll(async () => {
  await svc?.close()
  await av?.stop()
  await net?.close()
})

/** A service-auth token from the account's PDS; `lxm: null` asks for one without. */
const token = async (acct: LocalAccount, aud = exchange.did, lxm: string | null = REGISTER_LXM) => (await acct.agent.com.atproto.server.getServiceAuth({ aud, lxm: lxm ?? undefined })).data.token

/** Opens /v1/agent, sends the frames, and collects what comes back until the socket closes or `until` matches. */
async function session(frames: unknown[], until?: (f: { type: string }) => boolean): Promise<{ frames: { type: string; code?: string }[]; closed: boolean; ws: WebSocket }> {
  const ws = new WebSocket(`${svc.localUrl.replace('http', 'ws')}/v1/agent`)
  const got: { type: string; code?: string }[] = []
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve())
    ws.once('error', reject)
  })
  let closed = false
  const done = new Promise<void>((resolve) => {
    ws.on('message', (d) => {
      const f = JSON.parse(d.toString())
      got.push(f)
      if (until?.(f)) resolve()
    })
    ws.on('close', () => {
      closed = true
      resolve()
    })
  })
  for (const f of frames) ws.send(typeof f === 'string' ? f : JSON.stringify(f))
  await Promise.race([done, new Promise((r) => setTimeout(r, 5_000))])
  return { frames: got, closed, ws }
}

const register = (extra: Record<string, unknown>) => ({ type: 'register', v: 1, did: rig.did, encryptionPubKey: encKey, models: ['llama-3-8b'], version: '0.1.0', ...extra })

describe('provider gateway', () => {
  it('registers a provider that proves its DID and announces its published key', async () => {
    const s = await session([register({ serviceAuth: await token(rig) })], (f) => f.type === 'registered')
    expect(s.frames[0]).toMatchObject({ type: 'registered', did: rig.did, exchange: exchange.did })
    expect(svc.gateway!.connected('llama-3-8b').map((p) => p.did)).toEqual([rig.did])
    // Liveness: a ping is answered, and the provider stays registered.
    s.ws.send(JSON.stringify({ type: 'ping', v: 1, t: 1 }))
    await waitFor(() => svc.gateway!.machinesOf(rig.did)[0]?.lastSeen, 'ping seen')
    s.ws.close()
    await waitFor(() => svc.gateway!.machinesOf(rig.did).length === 0, 'removed on close')
  })

  it('challenges the attestation key of the provider record, and refuses an answer signed by another key', async () => {
    const answer = (signer: P256Signer) => (f: { type: string; nonce?: string; timestamp?: string }) => {
      const payload = attestationChallengePayload({ nonce: f.nonce!, timestamp: f.timestamp!, sip_enabled: false })
      return { type: 'attestation_response', v: 1, nonce: f.nonce, timestamp: f.timestamp, sip_enabled: false, signature: Buffer.from(signer.signDer(canonicalBytes(payload))).toString('base64') }
    }
    for (const [signer, ok] of [
      [attestationKey, true],
      [P256Signer.generate(), false],
    ] as const) {
      const s = await session([register({ serviceAuth: await token(rig) })], (f) => f.type === 'attestation_challenge')
      const challenge = s.frames.find((f) => f.type === 'attestation_challenge') as { type: string; nonce: string; timestamp: string }
      expect(challenge.nonce).toMatch(/^[0-9a-f]{32}$/)
      const closed = new Promise<{ code?: string }>((resolve) => {
        s.ws.on('message', (d) => resolve(JSON.parse(d.toString())))
        s.ws.on('close', () => resolve({}))
      })
      s.ws.send(JSON.stringify(answer(signer)(challenge)))
      if (ok) {
        await waitFor(() => svc.gateway!.machinesOf(rig.did)[0]?.attested, 'attested')
        s.ws.close()
        await waitFor(() => svc.gateway!.machinesOf(rig.did).length === 0, 'removed on close')
      } else {
        expect(await closed).toMatchObject({ type: 'error', code: 'attestation_failed' })
        await waitFor(() => svc.gateway!.machinesOf(rig.did).length === 0, 'dropped after a bad attestation')
      }
    }
  })

  it('refuses an encryption key other than the published one', async () => {
    const s = await session([register({ serviceAuth: await token(rig), encryptionPubKey: randomBytes(32).toString('base64') })])
    expect(s.frames[0]).toMatchObject({ type: 'error', code: 'encryption_key_mismatch' })
    expect(s.closed).toBe(true)
  })

  it('refuses a token for another audience or method, from another DID, or forged', async () => {
    for (const [name, serviceAuth] of [
      ['another audience', await token(rig, bob.did)],
      ['no lxm', await token(rig, exchange.did, null)],
      ['another lxm', await token(rig, exchange.did, 'dev.cocore.compute.control')],
      ["bob's token claiming rig's DID", await token(bob)],
      ['garbage', 'not.a.jwt'],
    ] as const) {
      const s = await session([register({ serviceAuth })])
      expect(s.frames[0], name).toMatchObject({ type: 'error', code: 'auth_failed' })
    }
    expect(svc.gateway!.machinesOf(rig.did).length > 0).toBe(false)
  })

  it('refuses frames out of protocol', async () => {
    expect((await session(['{oops'])).frames[0]).toMatchObject({ type: 'error', code: 'bad_frame' })
    expect((await session([{ type: 'heartbeat' }])).frames[0]).toMatchObject({ type: 'error', code: 'not_registered' })
    expect((await session([register({ serviceAuth: await token(rig), v: 2 })])).frames[0]).toMatchObject({ type: 'error', code: 'unsupported_version' })
    expect((await session([{ type: 'register', v: 1 }])).frames[0]).toMatchObject({ type: 'error', code: 'bad_frame' })
  })

  it('keeps two machines of one DID connected side by side, re-reads their records, and lets go of one whose record is deleted', async () => {
    const fast = await startTestConsole(net, 'http://127.0.0.1:1', { index: av.consoleIndex(), exchangeDid: exchange.did, pingIntervalMs: 200 })
    const owner = await net.createAccount('gus.test')
    try {
      const a = await publishScriptedRecord(owner, 'm-a')
      const b = await publishScriptedRecord(owner, 'm-b')
      await waitFor(() => av.consoleIndex().providerRecords(owner.did).length === 2, 'both records indexed')
      const url = fast.localUrl.replace('http', 'ws')
      const pa = await connectScripted(url, owner, exchange.did, a, { models: ['m-a'] })
      const pb = await connectScripted(url, owner, exchange.did, b, { models: ['m-b'] })
      // Several heartbeats later both are still there: neither replaced the other.
      await new Promise((r) => setTimeout(r, 700))
      expect(fast.gateway!.machinesOf(owner.did).map((p) => p.models[0]).sort()).toEqual(['m-a', 'm-b'])
      // The owner switches machine A off: routing sees it at the next heartbeat.
      await putRecord(owner.agent, owner.did, { ...a.record, active: false }, a.ref.uri.split('/').pop())
      await waitFor(() => fast.gateway!.machinesOf(owner.did).find((p) => p.models[0] === 'm-a')?.record.body.active === false, 'record re-read')
      expect(() => fast.exchange!.route({ model: 'm-a', requesterDid: bob.did })).toThrow(/no provider connected now serves/)
      // Machine B's record is deleted: the key can no longer be checked, so it is let go.
      await owner.agent.com.atproto.repo.deleteRecord({ repo: owner.did, collection: ids.ComputeProvider, rkey: b.ref.uri.split('/').pop()! })
      await waitFor(() => fast.gateway!.machinesOf(owner.did).length === 1, 'machine B disconnected')
      expect(pb.raw.some((f) => f.includes('no longer published'))).toBe(true)
      pa.close()
    } finally {
      await fast.close()
    }
  })

  it('refuses a provider whose record is not indexed', async () => {
    const s = await session([register({ did: bob.did, serviceAuth: await token(bob) })])
    expect(s.frames[0]).toMatchObject({ type: 'error', code: 'encryption_key_mismatch' })
    expect(JSON.stringify(s.frames[0])).toContain(ids.ComputeProvider)
  })
})
