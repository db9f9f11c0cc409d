/**
 * The provider gateway (/v1/agent): registration is bound to the provider's
 * DID by a service-auth token its own PDS minted for this exchange, and the
 * announced encryption key must be the one its signed, indexed provider record
 * publishes. Real PDS, real tokens, real AppView index. The hardening tests
 * run a gateway of their own on a plain HTTP server, to set its limits.
 */
import { randomBytes } from 'node:crypto'
import { createServer, type IncomingMessage } from 'node:http'
import type { AddressInfo } from 'node:net'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { WebSocket } from 'ws'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { P256Signer, p256PublicKey } from '../src/crypto/p256.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { providerRecord, putRecord } from '../src/dev/records.ts'
import { canonicalBytes } from '../src/crypto/canonical-json.ts'
import { sealPrompt } from '../src/crypto/seal.ts'
import { verifyAttestationSignature, verifyReceiptSignature } from '../src/crypto/signing.ts'
import { createIdResolver } from '../src/identity/index.ts'
import { encodeInput, sha256HexOf } from '../src/protocol/input.ts'
import { attestationChallengePayload, PROTOCOL_VERSION, REGISTER_LXM, type InferenceRequestFrame } from '../src/protocol/agent.ts'
import { connectScripted, publishScriptedRecord, writeReceipt } from './fixture/scripted-provider.ts'
import { ProviderGateway, type GatewayOpts, type JobCompletion } from '../console/exchange/gateway.ts'
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

type Got = { type: string; code?: string; message?: string; nonce?: string; timestamp?: string; t?: number }

/** Opens /v1/agent and collects every frame that comes back. */
async function agentSocket(url = svc.localUrl.replace('http', 'ws')): Promise<{ frames: Got[]; closed: boolean; ws: WebSocket }> {
  const ws = new WebSocket(`${url}/v1/agent`)
  await new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve())
    ws.once('error', reject)
  })
  const s = { frames: [] as Got[], closed: false, ws }
  ws.on('message', (d) => s.frames.push(JSON.parse(d.toString())))
  ws.on('close', () => (s.closed = true))
  return s
}

/** Sends the frames, and waits until the socket closes or a frame matches `until` (5 s at most). */
async function session(frames: unknown[], until?: (f: Got) => boolean, url?: string) {
  const s = await agentSocket(url)
  const done = new Promise<void>((resolve) => {
    s.ws.on('message', () => until?.(s.frames.at(-1)!) && resolve())
    s.ws.on('close', () => resolve())
  })
  for (const f of frames) s.ws.send(typeof f === 'string' ? f : JSON.stringify(f))
  await Promise.race([done, new Promise((r) => setTimeout(r, 5_000))])
  return s
}

/** Our register (the network's, with `v`). */
const register = (extra: Record<string, unknown>) => ({
  type: 'register',
  v: PROTOCOL_VERSION,
  provider_did: rig.did,
  encryption_pub_key: encKey,
  attestation_pub_key: Buffer.from(attestationKey.rawPublicKey()).toString('base64'),
  attestation_uri: '',
  machine_label: 'rig',
  chip: 'test',
  ram_gb: 8,
  supported_models: ['llama-3-8b'],
  binary_version: '0.1.0',
  ...extra,
})

const answer = (signer: P256Signer) => (f: Got) => {
  const payload = attestationChallengePayload({ nonce: f.nonce!, timestamp: f.timestamp!, sip_enabled: false })
  return { type: 'attestation_response', v: PROTOCOL_VERSION, nonce: f.nonce, timestamp: f.timestamp, sip_enabled: false, signature: Buffer.from(signer.signDer(canonicalBytes(payload))).toString('base64') }
}

/**
 * Registers rig's machine and answers the challenge; resolves once the gateway has handled the answer
 * (it handles a socket's frames in order, so the pong to the ping sent after it comes after).
 */
async function attested(url?: string) {
  const s = await session([register({ auth_jwt: await token(rig) })], (f) => f.type === 'attestation_challenge', url)
  s.ws.send(JSON.stringify(answer(attestationKey)(s.frames.find((f) => f.type === 'attestation_challenge')!)))
  s.ws.send(JSON.stringify({ type: 'ping', v: PROTOCOL_VERSION, t: 7 }))
  await waitFor(() => s.frames.some((f) => f.type === 'pong' && f.t === 7) || s.closed, 'the answer handled')
  return s
}

describe('provider gateway', () => {
  it('registers a provider that proves its DID and announces its published key, and routes to it once attested', async () => {
    const s = await session([register({ auth_jwt: await token(rig) })], (f) => f.type === 'attestation_challenge')
    expect(s.frames[0]).toMatchObject({ type: 'registered', did: rig.did, exchange: exchange.did })
    // Registered, not yet routable: the challenge is unanswered.
    expect(svc.gateway!.machinesOf(rig.did)).toMatchObject([{ attested: false, attestationKey: null }])
    expect(svc.gateway!.connected('llama-3-8b')).toEqual([])
    s.ws.send(JSON.stringify(answer(attestationKey)(s.frames[1]!)))
    await waitFor(() => svc.gateway!.connected('llama-3-8b').length, 'routable once attested')
    expect(svc.gateway!.connected('llama-3-8b')).toMatchObject([{ did: rig.did, attested: true, attestationKey: Buffer.from(attestationKey.rawPublicKey()).toString('base64') }])
    // Liveness: a ping is answered, and the provider stays registered.
    s.ws.send(JSON.stringify({ type: 'ping', v: PROTOCOL_VERSION, t: 1 }))
    await waitFor(() => s.frames.some((f) => f.type === 'pong' && f.t === 1), 'pong')
    s.ws.close()
    await waitFor(() => svc.gateway!.machinesOf(rig.did).length === 0, 'removed on close')
  })

  it('challenges the attestation key of the provider record, and refuses an answer signed by another key', async () => {
    for (const [signer, ok] of [
      [attestationKey, true],
      [P256Signer.generate(), false],
    ] as const) {
      const s = await session([register({ auth_jwt: await token(rig) })], (f) => f.type === 'attestation_challenge')
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
    const s = await session([register({ auth_jwt: await token(rig), encryption_pub_key: randomBytes(32).toString('base64') })])
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
      const s = await session([register({ auth_jwt: serviceAuth })])
      expect(s.frames[0], name).toMatchObject({ type: 'error', code: 'auth_failed' })
    }
    expect(svc.gateway!.machinesOf(rig.did).length > 0).toBe(false)
  })

  it('refuses frames out of protocol', async () => {
    expect((await session(['{oops'])).frames[0]).toMatchObject({ type: 'error', code: 'bad_frame' })
    expect((await session([{ type: 'heartbeat' }])).frames[0]).toMatchObject({ type: 'error', code: 'not_registered' })
    expect((await session([register({ auth_jwt: await token(rig), v: PROTOCOL_VERSION + 1 })])).frames[0]).toMatchObject({ type: 'error', code: 'unsupported_version' })
    expect((await session([{ type: 'register', v: PROTOCOL_VERSION }])).frames[0]).toMatchObject({ type: 'error', code: 'bad_frame' })
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
    const s = await session([register({ provider_did: bob.did, auth_jwt: await token(bob) })])
    expect(s.frames[0]).toMatchObject({ type: 'error', code: 'encryption_key_mismatch' })
    expect(JSON.stringify(s.frames[0])).toContain(ids.ComputeProvider)
  })
})

/** A gateway of its own on a plain HTTP server, with the limits a test sets. */
async function standalone(opts: Partial<GatewayOpts> = {}) {
  const gateway = new ProviderGateway({
    exchangeDid: exchange.did,
    idResolver: createIdResolver({ plcUrl: net.plcUrl, cacheSize: 100, cacheTtlSec: 60, allowHttp: true }),
    providerRecords: (did) => av.consoleIndex().providerRecords(did),
    ...opts,
  })
  const server = createServer((_req, res) => res.end())
  gateway.attach(server)
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const close = async () => {
    await gateway.close()
    server.closeAllConnections()
    await new Promise((resolve) => server.close(resolve))
  }
  return { gateway, url: `ws://127.0.0.1:${(server.address() as AddressInfo).port}`, close }
}

type Socket = Awaited<ReturnType<typeof agentSocket>>

/**
 * Sends rig's register to a gateway whose record lookup is held, runs `meanwhile` while the registration
 * waits there, then lets it finish; resolves to the gateway's machines of rig once it has.
 */
async function whileVerifying(meanwhile: (s: Socket, gateway: ProviderGateway, register: string) => Promise<void>) {
  let entered!: () => void
  let release!: () => void
  const inside = new Promise<void>((resolve) => (entered = resolve))
  const gate = new Promise<void>((resolve) => (release = resolve))
  const g = await standalone({
    providerRecords: async (did) => {
      entered()
      await gate
      return av.consoleIndex().providerRecords(did)
    },
  })
  try {
    const s = await agentSocket(g.url)
    const frame = JSON.stringify(register({ auth_jwt: await token(rig) }))
    s.ws.send(frame)
    await inside
    await meanwhile(s, g.gateway, frame)
    release()
    // The rest of the registration runs as microtasks: all done by the next macrotask.
    await new Promise((resolve) => setImmediate(resolve))
    return g.gateway.machinesOf(rig.did)
  } finally {
    release()
    await g.close()
  }
}

describe('provider gateway hardening', () => {
  it('closes a socket that has not registered and answered its challenge in time', async () => {
    const g = await standalone({ registerTimeoutMs: 1500 })
    try {
      const silent = await session([], undefined, g.url)
      expect(silent.frames).toMatchObject([{ type: 'error', code: 'register_timeout' }])
      expect(silent.closed).toBe(true)
      // Registered, but the challenge left unanswered: no slot held for it either.
      const unanswered = await session([register({ auth_jwt: await token(rig) })], undefined, g.url)
      expect(unanswered.frames.map((f) => f.code ?? f.type)).toEqual(['registered', 'attestation_challenge', 'register_timeout'])
      expect(unanswered.closed).toBe(true)
      await waitFor(() => g.gateway.machinesOf(rig.did).length === 0 && g.gateway.connections === 0, 'released')
    } finally {
      await g.close()
    }
  })

  it('refuses upgrades beyond the connection caps, in all and per client address, and counts a closed socket out', async () => {
    const g = await standalone({ maxConnections: 3, maxConnectionsPerAddress: 2, clientAddress: (req: IncomingMessage) => req.headers['x-test-client'] as string | undefined })
    const open: WebSocket[] = []
    const connect = (client: string) =>
      new Promise<{ ws: WebSocket } | { status: number; retryAfter?: string; body: unknown }>((resolve, reject) => {
        const ws = new WebSocket(`${g.url}/v1/agent`, { headers: { 'x-test-client': client } })
        ws.once('open', () => {
          open.push(ws)
          resolve({ ws })
        })
        ws.once('unexpected-response', (_req, res) => {
          let body = ''
          res.on('data', (d: Buffer) => (body += d))
          res.on('end', () => resolve({ status: res.statusCode!, retryAfter: res.headers['retry-after'], body: JSON.parse(body) }))
        })
        ws.once('error', reject)
      })
    try {
      expect(await connect('a')).toHaveProperty('ws')
      const second = await connect('a')
      expect(await connect('a')).toMatchObject({ status: 429, retryAfter: '30', body: { error: 'RateLimitExceeded' } })
      expect(await connect('b')).toHaveProperty('ws')
      expect(await connect('c')).toMatchObject({ status: 503, retryAfter: '30', body: { error: 'NotEnoughResources' } })
      expect(g.gateway.connections).toBe(3)
      ;(second as { ws: WebSocket }).ws.close()
      await waitFor(() => g.gateway.connections === 2, 'the closed socket counted out')
      expect(await connect('a')).toHaveProperty('ws')
    } finally {
      open.forEach((ws) => ws.terminate())
      await g.close()
    }
  })

  it('refuses a second register while the first is being verified, and does not add the first once its socket is gone', async () => {
    const after = await whileVerifying(async (s, _gateway, frame) => {
      s.ws.send(frame)
      await waitFor(() => s.closed, 'closed')
      expect(s.frames).toMatchObject([{ type: 'error', code: 'already_registered' }])
    })
    expect(after).toEqual([])
  })

  it('does not add a machine whose socket closed while its registration was verified', async () => {
    const after = await whileVerifying(async (s, gateway) => {
      s.ws.terminate()
      await waitFor(() => gateway.connections === 0, 'the socket closed on the gateway')
    })
    expect(after).toEqual([])
  })

  it('refuses a register on a socket already registered, and lets its machine go', async () => {
    const s = await attested()
    expect(svc.gateway!.machinesOf(rig.did)).toHaveLength(1)
    s.ws.send(JSON.stringify(register({ auth_jwt: await token(rig) })))
    await waitFor(() => s.closed, 'closed')
    expect(s.frames.at(-1)).toMatchObject({ type: 'error', code: 'already_registered' })
    await waitFor(() => svc.gateway!.machinesOf(rig.did).length === 0, 'its machine gone with the socket')
  })

  it('never routes to a socket that is no longer open, though its machine is listed until it closes', async () => {
    await attested()
    const ids = (ps: { machine: string }[]) => ps.map((p) => p.machine)
    const p = svc.gateway!.machinesOf(rig.did)[0]!
    expect(ids(svc.gateway!.connected('llama-3-8b'))).toEqual([p.machine])
    p.socket.close(1001, 'closing')
    expect(ids(svc.gateway!.machinesOf(rig.did))).toEqual([p.machine])
    expect(ids(svc.gateway!.connected('llama-3-8b'))).toEqual([])
    await waitFor(() => svc.gateway!.machinesOf(rig.did).length === 0, 'removed on close')
  })

  it('refuses models its provider record does not publish', async () => {
    const s = await session([register({ auth_jwt: await token(rig), supported_models: ['llama-3-8b', 'gpt-9'] })])
    expect(s.frames).toMatchObject([{ type: 'error', code: 'model_not_published' }])
    expect(s.frames[0]!.message).toContain('gpt-9')
    expect(s.closed).toBe(true)
  })

  it('follows its record: a model no longer published is no longer routed, a changed attestation key needs a new connection', async () => {
    const g = await standalone({ pingIntervalMs: 200 })
    const owner = await net.createAccount('hal.test')
    try {
      const pub = await publishScriptedRecord(owner, 'm-a', { supportedModels: ['m-a', 'm-b'] })
      const rkey = pub.ref.uri.split('/').pop()
      await waitFor(() => av.consoleIndex().providerRecords(owner.did).length, 'record indexed')
      const sp = await connectScripted(g.url, owner, exchange.did, pub, { models: ['m-a', 'm-b'] })
      expect(g.gateway.connected('m-b').map((p) => p.did)).toEqual([owner.did])
      await putRecord(owner.agent, owner.did, { ...pub.record, supportedModels: ['m-a'] }, rkey)
      await waitFor(() => g.gateway.connected('m-b').length === 0, 'm-b no longer routed')
      expect(g.gateway.connected('m-a').map((p) => p.did)).toEqual([owner.did])
      await putRecord(owner.agent, owner.did, { ...pub.record, supportedModels: ['m-a'], attestationPubKey: Buffer.from(P256Signer.generate().rawPublicKey()).toString('base64') }, rkey)
      await waitFor(() => g.gateway.machinesOf(owner.did).length === 0, 'let go')
      expect(sp.raw.some((f) => f.includes('attestation_failed'))).toBe(true)
    } finally {
      await g.close()
    }
  })

  it('relays a flooding provider in order with the counts it reports; its fixture writes the attestation and receipt it signs', async () => {
    const g = await standalone()
    const owner = await net.createAccount('fay.test')
    try {
      const pub = await publishScriptedRecord(owner, 'm-f', {}, { attestation: true })
      await waitFor(() => av.consoleIndex().providerRecords(owner.did).length, 'record indexed')
      const sp = await connectScripted(g.url, owner, exchange.did, pub, { behaviour: 'flood', floodChunks: 300, reported: { tokens_in: 1, tokens_out: 1_000_000 }, models: ['m-f'] })
      const plaintext = encodeInput([{ role: 'user', content: 'hi' }])
      const sealed = sealPrompt(plaintext, pub.record.encryptionPubKey)
      const seqs: number[] = []
      const done = await new Promise<JobCompletion>((resolve, reject) => {
        const job: Omit<InferenceRequestFrame, 'type' | 'v' | 'session_id'> = {
          job_uri: `at://${bob.did}/${ids.ComputeJob}/3kjob`,
          job_cid: pub.ref.cid,
          requester_did: bob.did,
          requester_pub_key: sealed.ephemeralPublicKey,
          model: 'm-f',
          max_tokens_out: 16,
          ciphertext: sealed.sealed,
          input_format: 'messages-v1',
          input_commitment: sha256HexOf(plaintext),
          params: {},
        }
        g.gateway.startJob(g.gateway.connected('m-f')[0]!, job, { chunk: (seq) => seqs.push(seq), keepalive: () => {}, complete: resolve, fail: (code, message) => reject(new Error(`${code}: ${message}`)) })
      })
      expect(seqs).toEqual([...Array(300).keys()])
      expect(done).toMatchObject({ tokens_in: 1, tokens_out: 1_000_000, final_seq: 300 })

      const key = p256PublicKey(pub.signer.rawPublicKey())
      const get = async (uri: string) => {
        const [, , repo, collection, rkey] = uri.split('/')
        return (await owner.agent.com.atproto.repo.getRecord({ repo: repo!, collection: collection!, rkey: rkey! })).data.value as Record<string, unknown>
      }
      const att = await get(pub.attestation!.uri)
      expect(att).toMatchObject({ publicKey: pub.record.attestationPubKey, encryptionPubKey: pub.record.encryptionPubKey })
      expect(verifyAttestationSignature(att, key)).toBe(true)
      const req = sp.requests[0]!
      const receipt = await get((await writeReceipt(owner, pub, req, { tokens: { in: 1, out: 1_000_000 }, price: 999, proBono: false })).uri)
      expect(receipt).toMatchObject({ job: { uri: req.job_uri, cid: req.job_cid }, requester: bob.did, model: 'm-f', inputCommitment: req.input_commitment, tokens: { in: 1, out: 1_000_000 }, price: { amount: 999 }, proBono: false, attestation: pub.attestation })
      expect(verifyReceiptSignature(receipt, key)).toBe(true)
    } finally {
      await g.close()
    }
  })
})
