/**
 * The reference provider agent on the real local network: its records on the
 * PDS (valid, signed), its key file, its registration with the real gateway
 * (refused until the AppView has indexed its record, then accepted, then the
 * attestation challenge answered), and its job handler, driven with frames
 * built here as an exchange would: sealed prompts in, sealed chunks and a
 * signed receipt out, which the AppView's own verifier accepts.
 */
import { once } from 'node:events'
import { chmodSync, copyFileSync, mkdtempSync, readFileSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { AtpAgent } from '@atproto/api'
import { AppView } from '../appview/index.ts'
import { verifyReceipt } from '../appview/verify/receipt.ts'
import type { ConsoleService } from '../console/index.ts'
import { canonicalBytes } from '../src/crypto/canonical-json.ts'
import { p256PublicKey, sha256Hex, verifyDer } from '../src/crypto/p256.ts'
import { openReply, sealPrompt } from '../src/crypto/seal.ts'
import { verifyAttestationSignature, verifyReceiptSignature } from '../src/crypto/signing.ts'
import { toWs } from '../src/config.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { authorizationRecord, jobRecord, putRecord } from '../src/dev/records.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { ComputeAttestation, ComputeJob, ComputeProvider, ComputeReceipt } from '../src/lexicon/generated/types.ts'
import { validateRecord } from '../src/lexicon/validate.ts'
import { attestationChallengePayload, PROTOCOL_VERSION, type InferenceRequestFrame, type ProviderFrame } from '../src/protocol/agent.ts'
import { encodeInput, inputCommitment, type ChatMessage } from '../src/protocol/input.ts'
import type { JobCompletion } from '../console/exchange/gateway.ts'
import { AGENT_VERSION, answerChallenge, ProviderAgent, type ProviderAgentOpts } from '../src/provider/agent.ts'
import { BuiltinEngine } from '../src/provider/engine.ts'
import { JobRunner } from '../src/provider/jobs.ts'
import { KeyFileError, loadOrCreateKeys, type ProviderKeys } from '../src/provider/keys.ts'
import { priceList } from '../src/provider/records.ts'
import { RepoWriter, type StrongRef } from '../src/provider/repo.ts'
import { tempDbPath } from './fixture/appview.ts'
import { startTestConsole } from './fixture/console.ts'
import { waitFor } from './fixture/wait.ts'

const MODEL = 'builtin-test'
const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64')
const rkeyOf = (uri: string) => uri.split('/').pop()!

let net: LocalNetwork
let av: AppView
let svc: ConsoleService
let host: LocalAccount
let alice: LocalAccount
let market: LocalAccount
let agent: ProviderAgent
const keyFile = join(mkdtempSync(join(tmpdir(), 'cocore-provider-')), 'keys', 'provider-key.json')

beforeAll(async () => {
  net = await LocalNetwork.create()
  host = await net.createAccount('gpu-host.test')
  alice = await net.createAccount('alice.test')
  market = await net.createAccount('market.test')
  // Not started yet: the agent's first registration must find its record unindexed.
  av = new AppView({ dbPath: tempDbPath(), sources: [toWs(net.pdsUrl)], plcUrl: net.plcUrl, allowHttp: true, handlesViaPds: net.pdsUrl, replayFromStart: true })
  svc = await startTestConsole(net, 'http://127.0.0.1:1', { index: av.consoleIndex(), exchangeDid: market.did })
})
afterAll(async () => {
  await agent?.stop()
  await svc?.close()
  await av?.stop()
  await net?.close()
})

const agentOpts = (): ProviderAgentOpts => ({
  pdsUrl: net.pdsUrl,
  identifier: host.handle,
  password: host.password,
  exchangeUrl: svc.localUrl,
  exchangeDid: market.did,
  keyFile,
  // Slow enough for a cancel to arrive mid-job.
  engine: new BuiltinEngine({ delayMs: 10 }),
  models: [MODEL],
  label: 'test rig',
  reconnect: { initialMs: 100, maxMs: 400 },
})

async function getRecord<T>(repo: AtpAgent, did: string, collection: string, rkey: string) {
  const res = await repo.com.atproto.repo.getRecord({ repo: did, collection, rkey })
  return { uri: res.data.uri, cid: res.data.cid!, value: res.data.value as unknown as T & Record<string, unknown> }
}

const indexed = <T,>(uri: string) =>
  waitFor(() => {
    const row = av.db.$client.prepare('SELECT uri, cid, did, body FROM records WHERE uri = ?').get(uri) as { uri: string; cid: string; did: string; body: string } | undefined
    return row && { ...row, body: JSON.parse(row.body) as T }
  }, `${uri} indexed`)

describe('provider agent', () => {
  it('publishes valid, signed records, registers once they are indexed, and passes the attestation challenge', async () => {
    agent = new ProviderAgent(agentOpts())
    const refused = once(agent, 'refused')
    await agent.start()

    expect(statSync(keyFile).mode & 0o777).toBe(0o600)
    const file = JSON.parse(readFileSync(keyFile, 'utf8'))
    expect(file.records).toEqual({ provider: rkeyOf(agent.published.provider.uri), attestation: rkeyOf(agent.published.attestation.uri) })

    const prov = await getRecord<ComputeProvider>(host.agent, host.did, ids.ComputeProvider, file.records.provider)
    expect(prov.cid).toBe(agent.published.provider.cid)
    expect(validateRecord(ids.ComputeProvider, prov.value).success).toBe(true)
    expect(prov.value).toMatchObject({
      machineLabel: 'test rig',
      supportedModels: [MODEL],
      priceList: [{ modelId: MODEL, inputPricePerMTok: 100, outputPricePerMTok: 200, currency: 'CC' }],
      encryptionPubKey: b64(agent.keys.encryption.publicKey),
      attestationPubKey: b64(agent.keys.signer.rawPublicKey()),
      trustLevel: 'self-attested',
      binaryVersion: AGENT_VERSION,
    })
    expect(prov.value.ramGB).toBeGreaterThanOrEqual(1)
    expect(prov.value.cpuCores).toBeGreaterThanOrEqual(1)

    const att = await getRecord<ComputeAttestation>(host.agent, host.did, ids.ComputeAttestation, file.records.attestation)
    expect(validateRecord(ids.ComputeAttestation, att.value).success).toBe(true)
    expect(att.value).toMatchObject({ publicKey: prov.value.attestationPubKey, encryptionPubKey: prov.value.encryptionPubKey, sigScheme: 'p256', encScheme: 'x25519', sipEnabled: false, secureBootEnabled: false })
    expect(verifyAttestationSignature(att.value, p256PublicKey(Buffer.from(att.value.publicKey, 'base64')))).toBe(true)
    expect(Date.parse(att.value.expiresAt) - Date.parse(att.value.attestedAt)).toBe(24 * 3600_000)

    // Refused while the AppView has not indexed the record; it keeps trying.
    const [first] = await refused
    expect(first.code).toBe('encryption_key_mismatch')
    expect(agent.registered).toBe(false)
    await av.start()
    await waitFor(() => svc.gateway!.connected(MODEL).some((p) => p.did === host.did), 'agent registered')
    // The gateway lists it before its `registered` frame reaches the agent.
    await waitFor(() => agent.registered, 'the agent told it is registered')
    // The gateway challenges at registration and checks the answer against the record's attestation key.
    await waitFor(() => svc.gateway!.machinesOf(host.did)[0]?.attested, 'attestation challenge passed')
  })

  it('answers pings and comes back after the connection drops', async () => {
    const p = svc.gateway!.machinesOf(host.did)[0]!
    const pong = new Promise((resolve) => p.socket.on('message', (d) => JSON.parse(d.toString()).type === 'pong' && resolve(JSON.parse(d.toString()))))
    p.socket.send(JSON.stringify({ type: 'ping', v: PROTOCOL_VERSION, nonce: 'n42', t: 42 }))
    expect(await pong).toMatchObject({ type: 'pong', v: PROTOCOL_VERSION, nonce: 'n42', t: 42 })

    const back = once(agent, 'registered')
    p.socket.terminate()
    await back
    await waitFor(() => {
      const now = svc.gateway!.machinesOf(host.did)[0]
      return now && now.socket !== p.socket && now.attested
    }, 'registered and attested on a new connection')
  })

  it('keeps a job running across a dropped connection and resumes it on the new one: each chunk reaches the exchange once, in order', async () => {
    const p = svc.gateway!.machinesOf(host.did)[0]!
    expect(p).toMatchObject({ extended: true, streamResume: true })
    const messages: ChatMessage[] = [{ role: 'user', content: 'Name three rivers in Europe.' }]
    const plaintext = encodeInput(messages)
    const sealed = sealPrompt(plaintext, b64(agent.keys.encryption.publicKey))
    const seqs: number[] = []
    const done = await new Promise<JobCompletion>((resolve, reject) => {
      const request = {
        job_uri: `at://${alice.did}/${ids.ComputeJob}/3kresume`,
        job_cid: 'bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm',
        requester_did: alice.did,
        requester_pub_key: sealed.ephemeralPublicKey,
        model: MODEL,
        max_tokens_out: 64,
        ciphertext: sealed.sealed,
        input_format: 'messages-v1',
        input_commitment: inputCommitment(plaintext),
        params: {},
      }
      svc.gateway!.startJob(p, request, {
        // The connection drops after the second chunk; the engine goes on.
        chunk: (seq) => seqs.push(seq) === 2 && p.socket.terminate(),
        keepalive: () => {},
        complete: resolve,
        fail: (code, message) => reject(new Error(`${code}: ${message}`)),
      })
    })
    const expected = new BuiltinEngine().plan({ model: MODEL, messages, maxTokens: 64, params: {} })
    expect(seqs).toEqual(expected.pieces.map((_, i) => i))
    expect(done).toMatchObject({ tokens_out: expected.completion.tokensOut, final_seq: expected.pieces.length })
    expect(svc.gateway!.machinesOf(host.did)[0]!.socket).not.toBe(p.socket)
  })

  it('signs challenge answers over the canonical payload', () => {
    const f = answerChallenge({ nonce: 'abc123', timestamp: '2026-01-01T00:00:00Z' }, agent.keys.signer)
    expect(f).toMatchObject({ type: 'attestation_response', nonce: 'abc123', timestamp: '2026-01-01T00:00:00Z', sip_enabled: false })
    const payload = canonicalBytes(attestationChallengePayload({ nonce: 'abc123', timestamp: '2026-01-01T00:00:00Z', sip_enabled: false }))
    expect(verifyDer(agent.keys.signer.publicKey, payload, Buffer.from(f.signature, 'base64'))).toBe(true)
  })

  it('restarts with the same keys and records, keeping the owner’s settings', async () => {
    const before = { ...agent.published, encryption: b64(agent.keys.encryption.publicKey), signing: b64(agent.keys.signer.rawPublicKey()) }
    // The owner turns pro bono on (as the console does) while the agent runs.
    const cur = await getRecord<ComputeProvider>(host.agent, host.did, ids.ComputeProvider, rkeyOf(before.provider.uri))
    await host.agent.com.atproto.repo.putRecord({ repo: host.did, collection: ids.ComputeProvider, rkey: rkeyOf(before.provider.uri), record: { ...cur.value, proBono: { mode: 'any' } }, validate: false, swapRecord: cur.cid })

    await agent.stop()
    await waitFor(() => svc.gateway!.machinesOf(host.did).length === 0, 'gone from the gateway')
    agent = new ProviderAgent(agentOpts())
    await agent.start()
    expect(b64(agent.keys.encryption.publicKey)).toBe(before.encryption)
    expect(b64(agent.keys.signer.rawPublicKey())).toBe(before.signing)
    expect(agent.published.provider.uri).toBe(before.provider.uri)
    // The attestation still states this machine and is valid: reused as is, so receipts keep citing one version.
    expect(agent.published.attestation).toEqual(before.attestation)
    const prov = await getRecord<ComputeProvider>(host.agent, host.did, ids.ComputeProvider, rkeyOf(before.provider.uri))
    expect(prov.value.proBono).toEqual({ mode: 'any' })
    expect(prov.value.createdAt).toBe(cur.value.createdAt)
    await waitFor(() => svc.gateway!.machinesOf(host.did)[0]?.attested, 're-registered')
  })

  it('refuses a key file others can read', () => {
    const exposed = join(mkdtempSync(join(tmpdir(), 'cocore-provider-')), 'key.json')
    copyFileSync(keyFile, exposed)
    chmodSync(exposed, 0o644)
    expect(() => loadOrCreateKeys(exposed)).toThrow(KeyFileError)
    expect(() => new ProviderAgent({ ...agentOpts(), keyFile: exposed })).toThrow(/chmod 600/)
  })
})

describe('job handler', () => {
  const messages: ChatMessage[] = [
    { role: 'system', content: 'You are terse.' },
    { role: 'user', content: 'Name three rivers in Europe.' },
  ]
  const plaintext = encodeInput(messages)
  let keys: ProviderKeys
  let job: StrongRef

  beforeAll(async () => {
    keys = loadOrCreateKeys(keyFile)
    const auth = await putRecord(alice.agent, alice.did, authorizationRecord(market.did))
    job = await putRecord(alice.agent, alice.did, jobRecord(auth, inputCommitment(plaintext), MODEL))
  })

  /** A job runner as the agent builds one, its frames collected. */
  function runner(opts: { delayMs?: number; maxConcurrent?: number } = {}) {
    const frames: ProviderFrame[] = []
    const jobs = new JobRunner({
      did: host.did,
      keys,
      engine: new BuiltinEngine({ delayMs: opts.delayMs }),
      prices: priceList([MODEL]),
      attestation: () => agent.published.attestation,
      writer: new RepoWriter(host.agent, host.did),
      send: (f) => frames.push(f),
      maxConcurrent: opts.maxConcurrent,
    })
    return { jobs, frames, of: (session: string) => frames.filter((f) => 'session_id' in f && f.session_id === session) }
  }

  let n = 0
  /** An inference_request as the exchange sends it: the prompt sealed to the provider's published key. */
  function request(extra: Partial<InferenceRequestFrame> = {}, bytes = plaintext, sealTo = b64(keys.encryption.publicKey)) {
    const sealed = sealPrompt(bytes, sealTo)
    const frame: InferenceRequestFrame = {
      type: 'inference_request',
      v: PROTOCOL_VERSION,
      session_id: `sess_${++n}`,
      job_uri: job.uri,
      job_cid: job.cid,
      requester_did: alice.did,
      requester_pub_key: sealed.ephemeralPublicKey,
      model: MODEL,
      max_tokens_out: 256,
      ciphertext: sealed.sealed,
      input_format: 'messages-v1',
      input_commitment: inputCommitment(bytes),
      params: { seed: 4, temperature: 0.7, top_p: 0.95 },
      ...extra,
    }
    return { frame, secret: sealed.ephemeralSecretKey }
  }

  const openChunks = (frames: ProviderFrame[], secret: Uint8Array) =>
    frames.filter((f) => f.type === 'inference_chunk').map((f) => new TextDecoder().decode(openReply(f.ciphertext, b64(keys.encryption.publicKey), secret)!))

  const receiptCount = async () => (await host.agent.com.atproto.repo.listRecords({ repo: host.did, collection: ids.ComputeReceipt, limit: 100 })).data.records.length

  it('streams sealed chunks of the engine’s reply and writes a signed receipt the AppView verifies', async () => {
    const { jobs, of } = runner()
    const { frame, secret } = request()
    const published = once(jobs, 'receipt-published')
    await jobs.run(frame)
    const frames = of(frame.session_id)
    const expected = new BuiltinEngine().plan({ model: MODEL, messages, maxTokens: 256, params: frame.params! })
    const text = openChunks(frames, secret)
    expect(text).toEqual(expected.pieces)
    expect(frames.filter((f) => f.type === 'inference_chunk').map((f) => f.seq)).toEqual(expected.pieces.map((_, i) => i))
    const complete = frames.at(-1)!
    expect(complete).toMatchObject({ type: 'inference_complete', tokens_in: expected.completion.tokensIn, tokens_out: expected.completion.tokensOut, finish_reason: 'stop', final_seq: expected.pieces.length })
    const receiptUri = (complete as { receipt_uri: string }).receipt_uri
    expect(receiptUri).toMatch(new RegExp(`^at://${host.did}/${ids.ComputeReceipt}/[a-z2-7]{13}$`))

    const [{ uri, cid }] = await published
    expect(uri).toBe(receiptUri)
    const receipt = await getRecord<ComputeReceipt>(host.agent, host.did, ids.ComputeReceipt, rkeyOf(uri))
    expect(receipt.cid).toBe(cid)
    expect(validateRecord(ids.ComputeReceipt, receipt.value).success).toBe(true)
    expect(verifyReceiptSignature(receipt.value, p256PublicKey(keys.signer.rawPublicKey()))).toBe(true)
    const { tokensIn, tokensOut } = expected.completion
    expect(receipt.value).toMatchObject({
      job,
      requester: alice.did,
      model: MODEL,
      inputCommitment: frame.input_commitment,
      outputCommitment: sha256Hex(text.join('')),
      tokens: { in: tokensIn, out: tokensOut },
      price: { amount: Math.ceil((tokensIn * 100) / 1e6 + (tokensOut * 200) / 1e6), currency: 'CC' },
      attestation: agent.published.attestation,
      params: { maxTokens: 256, seed: 4, temperatureMilli: 700, topPMilli: 950 },
    })
    expect(receipt.value.proBono).toBeUndefined()

    const verdict = verifyReceipt(await indexed<ComputeReceipt>(uri), await indexed<ComputeJob>(job.uri), await indexed<ComputeAttestation>(agent.published.attestation.uri))
    expect(verdict.findings).toEqual([])
    expect(verdict.ok).toBe(true)
  })

  it('writes a pro bono receipt with no charge and no tokens counted, and honours max tokens', async () => {
    const { jobs, of } = runner()
    const { frame, secret } = request({ pro_bono: true, max_tokens_out: 5 })
    const published = once(jobs, 'receipt-published')
    await jobs.run(frame)
    expect(openChunks(of(frame.session_id), secret)).toHaveLength(5)
    expect(of(frame.session_id).at(-1)).toMatchObject({ type: 'inference_complete', tokens_out: 5, finish_reason: 'length', final_seq: 5 })
    const [{ uri }] = await published
    const receipt = await getRecord<ComputeReceipt>(host.agent, host.did, ids.ComputeReceipt, rkeyOf(uri))
    expect(receipt.value).toMatchObject({ proBono: true, price: { amount: 0, currency: 'CC' }, tokens: { in: 0, out: 0 }, params: { maxTokens: 5 } })
    expect(verifyReceipt(await indexed<ComputeReceipt>(uri), await indexed<ComputeJob>(job.uri), await indexed<ComputeAttestation>(agent.published.attestation.uri)).ok).toBe(true)
  })

  it('serves requests and cancels that arrive on its exchange connection', async () => {
    // Raw frames on the gateway's socket to the agent (the gateway drops frames of sessions it did not start).
    const p = svc.gateway!.machinesOf(host.did)[0]!
    const got: ProviderFrame[] = []
    p.socket.on('message', (d) => got.push(JSON.parse(d.toString())))
    const of = (session: string) => got.filter((f) => 'session_id' in f && f.session_id === session)
    const { frame, secret } = request()
    p.socket.send(JSON.stringify(frame))
    await waitFor(() => of(frame.session_id).some((f) => f.type === 'inference_complete'), 'job complete')
    expect(openChunks(of(frame.session_id), secret).join('')).toBe(new BuiltinEngine().plan({ model: MODEL, messages, maxTokens: 256, params: frame.params! }).pieces.join(''))

    const cancelled = request()
    p.socket.send(JSON.stringify(cancelled.frame))
    await waitFor(() => of(cancelled.frame.session_id).length >= 2, 'two chunks')
    p.socket.send(JSON.stringify({ type: 'inference_cancel', v: PROTOCOL_VERSION, session_id: cancelled.frame.session_id, reason: 'requester went away' }))
    await waitFor(() => agent.jobs.stats.cancelled === 1, 'job cancelled')
    const sent = of(cancelled.frame.session_id).length
    await new Promise((r) => setTimeout(r, 100))
    expect(of(cancelled.frame.session_id)).toHaveLength(sent)
    expect(of(cancelled.frame.session_id).some((f) => f.type === 'inference_complete')).toBe(false)
    expect(agent.jobs.stats).toMatchObject({ completed: 1, cancelled: 1 })
  })

  it('stops a cancelled job at once: nothing more sent, no receipt', async () => {
    const { jobs, of } = runner({ delayMs: 30 })
    const receipts = await receiptCount()
    const { frame } = request()
    const run = jobs.run(frame)
    await waitFor(() => of(frame.session_id).length >= 2, 'two chunks')
    expect(jobs.cancel(frame.session_id, 'requester went away')).toBe(true)
    const sent = of(frame.session_id).length
    await run
    await new Promise((r) => setTimeout(r, 100))
    expect(of(frame.session_id)).toHaveLength(sent)
    expect(of(frame.session_id).every((f) => f.type === 'inference_chunk')).toBe(true)
    expect(jobs.stats).toMatchObject({ completed: 0, cancelled: 1, receiptsPublished: 0 })
    await jobs.idle()
    expect(await receiptCount()).toBe(receipts)
    expect(jobs.cancel(frame.session_id, 'again')).toBe(false)
  })

  it('refuses what it cannot run, before producing anything', async () => {
    const { jobs, frames, of } = runner({ delayMs: 30, maxConcurrent: 1 })
    const receipts = await receiptCount()
    const errorOf = async (r: { frame: InferenceRequestFrame }) => {
      await jobs.run(r.frame)
      const got = of(r.frame.session_id)
      expect(got).toHaveLength(1)
      return got[0]
    }
    const tampered = request()
    tampered.frame.input_commitment = tampered.frame.input_commitment!.replace(/^./, (c) => (c === '0' ? '1' : '0'))
    expect(await errorOf(tampered)).toMatchObject({ type: 'inference_error', code: 'bad_input' })
    // Sealed to another key than this machine's.
    expect(await errorOf(request({}, plaintext, b64(crypto.getRandomValues(new Uint8Array(32)))))).toMatchObject({ code: 'decrypt_failed' })
    expect(await errorOf(request({ model: 'gpt-9' }))).toMatchObject({ code: 'model_unavailable' })
    expect(await errorOf(request({}, new TextEncoder().encode('not the messages format')))).toMatchObject({ code: 'bad_input' })
    expect(await errorOf(request({ input_format: 'pdf' }))).toMatchObject({ code: 'bad_input' })

    // One job at a time: a second one is refused as busy while the first runs.
    const first = request()
    const running = jobs.run(first.frame)
    expect(await errorOf(request())).toMatchObject({ code: 'busy' })
    jobs.cancel(first.frame.session_id, 'done testing')
    await running
    expect(jobs.stats).toMatchObject({ failed: 6, completed: 0, cancelled: 1 })
    expect(frames.filter((f) => f.type === 'inference_complete')).toHaveLength(0)
    await jobs.idle()
    expect(await receiptCount()).toBe(receipts)
  })
})
