/**
 * Our provider agent on an exchange that speaks only the network's protocol
 * (test/fixture/reference-exchange.ts, which checks every frame it receives as
 * the network's exchange does and closes the socket on a frame it does not
 * know): it registers with the network's frame and token, answers the
 * challenge, stays alive on WebSocket pings, serves jobs sent as the network
 * sends them, refuses the network's way, and plays the provider's half of the
 * shared stream-resume vectors. Real PLC and PDS; the agent's real records.
 */
import { once } from 'node:events'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { p256PublicKey, sha256Hex } from '../src/crypto/p256.ts'
import { openReply, sealPrompt } from '../src/crypto/seal.ts'
import { verifyReceiptSignature } from '../src/crypto/signing.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { authorizationRecord, jobRecord, putRecord } from '../src/dev/records.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { ComputeReceipt } from '../src/lexicon/generated/types.ts'
import { encodeInput, inputCommitment, type ChatMessage } from '../src/protocol/input.ts'
import { AGENT_VERSION, ProviderAgent } from '../src/provider/agent.ts'
import { BuiltinEngine, type Completion, type Engine, type GenerateRequest, type Piece } from '../src/provider/engine.ts'
import { ReferenceExchange, type JobRequest, type RefSession } from './fixture/reference-exchange.ts'
import { providerSide, resumeVectors } from './fixture/resume-vectors.ts'
import { waitFor } from './fixture/wait.ts'

const EXCHANGE = 'did:web:exchange.reference.test'
const MODEL = 'builtin-ref'
const GATED = 'gated-ref'
const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64')

/** An engine whose generation pauses after a set number of pieces until the test lets it go on. */
class GatedEngine implements Engine {
  private next: { before: number; total: number; gate: Promise<void> } | null = null
  /** The next generation yields `before` pieces, waits for the returned function, then yields up to `total`. */
  script(before: number, total: number): () => void {
    let open!: () => void
    this.next = { before, total, gate: new Promise<void>((resolve) => (open = resolve)) }
    return open
  }
  async *generate(req: GenerateRequest): AsyncGenerator<Piece, Completion, undefined> {
    const { before, total, gate } = this.next!
    for (let i = 0; i < total; i++) {
      if (i === before) await Promise.race([gate, new Promise((resolve) => req.signal.addEventListener('abort', resolve))])
      req.signal.throwIfAborted()
      yield `w${i} `
    }
    return { tokensIn: 3, tokensOut: total, finishReason: 'stop' }
  }
}

const builtin = new BuiltinEngine()
const gated = new GatedEngine()
const engine: Engine = { generate: (req) => (req.model === GATED ? gated.generate(req) : builtin.generate(req)) }

let net: LocalNetwork
let host: LocalAccount
let alice: LocalAccount
let ex: ReferenceExchange
let agent: ProviderAgent
let job: { uri: string; cid: string }

beforeAll(async () => {
  net = await LocalNetwork.create()
  host = await net.createAccount('ref-host.test')
  alice = await net.createAccount('ref-alice.test')
  ex = await ReferenceExchange.start({ did: EXCHANGE, plcUrl: net.plcUrl, keepaliveMs: 200 })
  agent = new ProviderAgent({
    pdsUrl: net.pdsUrl,
    identifier: host.handle,
    password: host.password,
    exchangeUrl: ex.url,
    exchangeDid: EXCHANGE,
    keyFile: join(mkdtempSync(join(tmpdir(), 'cocore-ref-agent-')), 'key.json'),
    engine,
    models: [MODEL, GATED],
    heartbeatMs: 200,
    silenceMs: 1500,
    keepaliveMs: 100,
    reconnect: { initialMs: 100, maxMs: 300 },
  })
  const registered = once(agent, 'registered')
  await agent.start()
  await registered
  await waitFor(() => ex.ready, 'attested on the reference exchange')
  const auth = await putRecord(alice.agent, alice.did, authorizationRecord(EXCHANGE))
  job = await putRecord(alice.agent, alice.did, jobRecord(auth, 'a'.repeat(64), MODEL))
}, 120_000)

afterAll(async () => {
  await agent?.stop()
  await ex?.close()
  await net?.close()
})

const providerKey = () => b64(agent.keys.encryption.publicKey)

/** A job as the network's exchange sends it: the prompt sealed to the provider's key, its bytes as an array. */
function request(plaintext: Uint8Array, extra: Partial<JobRequest> = {}) {
  const sealed = sealPrompt(plaintext, providerKey())
  const req: JobRequest = { job_uri: job.uri, job_cid: job.cid, requester_did: alice.did, requester_pub_key: sealed.ephemeralPublicKey, model: MODEL, max_tokens_out: 64, ciphertext: Buffer.from(sealed.sealed, 'base64'), ...extra }
  return { req, secret: sealed.ephemeralSecretKey }
}

const opened = (s: RefSession, secret: Uint8Array) => s.chunks.map((c) => new TextDecoder().decode(openReply(c.ciphertext, providerKey(), secret)!))

describe('our provider agent on an exchange that speaks only the network protocol', () => {
  it('registers with the network register frame and token, and answers the challenge with a signature it verifies', () => {
    expect(ex.registers).toHaveLength(1)
    const r = ex.registers[0]!
    expect(r).toMatchObject({
      provider_did: host.did,
      machine_id: agent.published.provider.uri.split('/').pop(),
      supported_models: [MODEL, GATED],
      encryption_pub_key: providerKey(),
      attestation_pub_key: b64(agent.keys.signer.rawPublicKey()),
      attestation_uri: agent.published.attestation.uri,
      binary_version: AGENT_VERSION,
      enc_scheme: 'x25519',
      stream_resume_version: 1,
    })
    expect(ex.attestations).toBe(1)
    // Its only word beyond the network's is the announcement of our extensions on its register.
    expect([...ex.extras]).toEqual(['register.v'])
    expect([...ex.byteForms]).toEqual(['array'])
    expect(ex.refused).toEqual([])
  })

  it('stays connected on WebSocket pings alone, answers a ping by its nonce, and sends the network heartbeat', async () => {
    // Nothing but WebSocket pings comes from the exchange for longer than the agent's silence limit.
    await new Promise((r) => setTimeout(r, 2500))
    expect(ex.registers).toHaveLength(1)
    expect(await ex.ping()).toBe(true)
    const beat = ex.received.filter((f) => f.type === 'heartbeat').at(-1)
    expect(beat).toMatchObject({ load: 0, queue_depth: 0, active: true })
    expect(Date.now() - Date.parse(beat!.at as string)).toBeLessThan(5_000)
  })

  it('serves a text job sent without input_format as one user message, with a receipt it computes the commitment of', async () => {
    const plaintext = new TextEncoder().encode('system: be brief\nuser: Name three rivers in Europe.')
    const { req, secret } = request(plaintext)
    const published = once(agent.jobs, 'receipt-published')
    const s = ex.dispatch(req)
    const done = await s.done
    // The network's provider reads the whole text as the user's message.
    const expected = builtin.plan({ model: MODEL, messages: [{ role: 'user', content: new TextDecoder().decode(plaintext) }], maxTokens: 64, params: {} })
    expect(opened(s, secret)).toEqual(expected.pieces)
    expect(s.chunks.map((c) => c.seq)).toEqual(expected.pieces.map((_, i) => i))
    expect(s.chunks.every((c) => c.channel === undefined)).toBe(true)
    expect(done).toMatchObject({ tokens_in: expected.completion.tokensIn, tokens_out: expected.completion.tokensOut, final_seq: expected.pieces.length })
    const [{ uri }] = await published
    expect(done.receipt_uri).toBe(uri)
    const [, , repo, collection, rkey] = uri.split('/')
    const receipt = (await host.agent.com.atproto.repo.getRecord({ repo: repo!, collection: collection!, rkey: rkey! })).data.value as unknown as ComputeReceipt & Record<string, unknown>
    expect(receipt).toMatchObject({ job, requester: alice.did, model: MODEL, inputCommitment: inputCommitment(plaintext), outputCommitment: sha256Hex(expected.pieces.join('')) })
    expect(verifyReceiptSignature(receipt, p256PublicKey(agent.keys.signer.rawPublicKey()))).toBe(true)
    expect(ex.refused).toEqual([])
  })

  it('serves messages-v1 input from an exchange that names it', async () => {
    const messages: ChatMessage[] = [{ role: 'user', content: 'Tell me about the Danube.' }]
    const { req, secret } = request(encodeInput(messages), { input_format: 'messages-v1' })
    const s = ex.dispatch(req)
    await s.done
    expect(opened(s, secret)).toEqual(builtin.plan({ model: MODEL, messages, maxTokens: 64, params: {} }).pieces)
  })

  it('refuses a job it cannot run as the network providers do: a sealed notice and a completion counting nothing', async () => {
    const { req, secret } = request(new TextEncoder().encode('hello'), { model: 'gpt-9' })
    const s = ex.dispatch(req)
    const done = await s.done
    expect(opened(s, secret)).toEqual([expect.stringMatching(/could not run: this machine does not serve gpt-9/)])
    expect(done).toMatchObject({ tokens_in: 0, tokens_out: 0, receipt_uri: '', final_seq: 1 })
    // Without a job_cid it serves, but writes no receipt (a receipt cites both halves of the job).
    const { req: bare, secret: bareSecret } = request(new TextEncoder().encode('hello again'), { job_cid: undefined })
    const served = ex.dispatch(bare)
    expect(await served.done).toMatchObject({ receipt_uri: '' })
    expect(opened(served, bareSecret).join('')).toContain('hello again')
    expect(ex.refused).toEqual([])
  })
})

describe.skipIf(!resumeVectors)('the provider half of the shared stream-resume vectors, on the agent', () => {
  for (const v of resumeVectors?.resume ?? []) {
    it(v.name, async () => {
      const { produced, status, nextSeq, keeps } = providerSide(v)
      const total = produced + 3
      const release = gated.script(produced, total)
      // The exchange relays what it holds to the vector's high-water (at most what was produced), then the connection is cut.
      const held = Math.min(v.advisorNextSeq ?? 1, produced)
      ex.opts.onResume = () => ({ status, next_seq: nextSeq, ...(status === 'rejected' ? { reason: 'provider-state-behind' } : {}) })
      const { req, secret } = request(new TextEncoder().encode('resume me'), { model: GATED })
      await waitFor(() => agent.jobs.active === 0, 'no job running')
      const before = { ...agent.jobs.stats }
      const s = ex.dispatch(req, { dropAfter: held })
      const resumed = () => ex.received.findIndex((f) => f.type === 'inference_resume' && f.session_id === s.id)
      await waitFor(() => resumed() >= 0 && ex.ready, 'the agent back, asking for the job')
      expect(ex.received[resumed()]).toMatchObject({ resume_token: s.token, produced_seq: produced })
      const after = (type: string) => ex.received.slice(resumed()).filter((f) => f.type === type && f.session_id === s.id)
      if (keeps) {
        await waitFor(() => after('inference_chunk').length >= produced - nextSeq, 'the replay')
        expect(after('inference_chunk').map((f) => f.seq)).toEqual(v.providerReplaysSeqs ?? [])
        // Paused, it says it is still working.
        await waitFor(() => after('inference_keepalive').length > 0, 'a keepalive')
        release()
        const done = await s.done
        expect(s.chunks.map((c) => c.seq)).toEqual([...Array(total).keys()])
        expect(opened(s, secret).join('')).toBe([...Array(total).keys()].map((i) => `w${i} `).join(''))
        expect(done).toMatchObject({ final_seq: total })
      } else {
        release()
        await waitFor(() => agent.jobs.stats.cancelled > before.cancelled, 'the job cancelled')
        expect(agent.jobs.stats).toMatchObject({ failed: before.failed, completed: before.completed })
        await new Promise((r) => setTimeout(r, 200))
        expect(after('inference_chunk')).toEqual([])
        expect(after('inference_complete')).toEqual([])
      }
      expect(ex.refused).toEqual([])
      ex.opts.onResume = undefined
    })
  }
})
