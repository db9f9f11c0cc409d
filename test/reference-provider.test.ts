/**
 * A provider that speaks only the network's protocol
 * (test/fixture/reference-provider.ts, which checks every frame it receives
 * against what the network's agent parses) on our gateway and exchange, on the
 * real local network with a console holding an exchange account: it registers
 * and answers the challenge the network's way, serves jobs with bytes as
 * arrays and reasoning on its own channel (relayed with it), gets text input
 * without input_format when it is older than messages-v1, resumes a stream
 * across a dropped connection, and its jobs settle on the receipt it
 * publishes. The exchange half of the shared stream-resume vectors runs on the
 * gateway here too.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { ConsoleService } from '../console/index.ts'
import { ExchangeError, type ExchangeEvent } from '../console/exchange/exchange.ts'
import type { ConnectedProvider, JobCompletion } from '../console/exchange/gateway.ts'
import { sealPromptTo } from '../src/crypto/enc-scheme.ts'
import type { LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { encodeInput, type ChatMessage, type InputFormat } from '../src/protocol/input.ts'
import { signInWithBrowser } from './fixture/console.ts'
import { runJob } from './fixture/jobs.ts'
import { ReferenceProvider, referenceReply, type ReferenceProviderOpts } from './fixture/reference-provider.ts'
import { resumeVectors } from './fixture/resume-vectors.ts'
import { publishScriptedRecord } from './fixture/scripted-provider.ts'
import { settlingExchange, startStack, type Stack } from './fixture/stack.ts'
import { waitFor } from './fixture/wait.ts'

/** The network's uniform rate: one token of balance per model token, each way. */
const POLICY = { grant: 5_000, floor: 100, tokenRate: { inputPerMTok: 1_000_000, outputPerMTok: 1_000_000 } }

let stack: Stack
let svc: ConsoleService
let alice: LocalAccount
let market: LocalAccount
const wsUrl = () => svc.localUrl.replace('http', 'ws')

beforeAll(async () => {
  stack = await startStack({
    accounts: ['alice.test', 'market.test'],
    console: ([, market], av, net) => settlingExchange(market, av, net, { policy: POLICY, firstChunkTimeoutMs: 5000 }),
  })
  svc = stack.svc
  ;[alice, market] = stack.accounts as LocalAccount[] as [LocalAccount, LocalAccount]
  // Signing in gives the OAuth session that publishes job records, and the welcome grant.
  await (await signInWithBrowser(stack.browser, svc.url, alice.handle, alice.password)).close()
}, 180_000)

afterAll(async () => {
  await stack?.close()
})

/** A reference-style provider of `model` on a new account, its records indexed, routable. */
async function referenceProvider(handle: string, model: string, opts: Partial<ReferenceProviderOpts> = {}): Promise<ReferenceProvider> {
  const acct = await stack.net.createAccount(handle)
  const published = await publishScriptedRecord(acct, model, {}, { attestation: true })
  await waitFor(() => stack.av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(published.attestation!.uri), `${handle} records indexed`)
  const p = await ReferenceProvider.connect({ url: wsUrl(), acct, exchangeDid: market.did, published, models: [model], binaryVersion: '0.9.52', ...opts })
  await waitFor(() => svc.gateway!.connected(model).some((c) => c.did === acct.did), `${handle} routable`)
  return p
}

/** Runs a job through the exchange, sealing as a requester does. */
const run = (model: string, messages: ChatMessage[], format: InputFormat = 'messages-v1', onEvent?: (e: ExchangeEvent) => void) => runJob(svc.exchange!, alice.did, model, messages, { format, onEvent })

const decided = (uri: string) => waitFor(() => svc.db.$client.prepare('SELECT * FROM settlements WHERE receipt_uri = ?').get(uri) as Record<string, unknown> | undefined, `${uri} decided`)

describe('a provider that speaks only the network protocol, on our exchange', () => {
  it('registers and answers the challenge the network way, serves a job with reasoning on its channel, and the job settles on its receipt', async () => {
    const p = await referenceProvider('refrig.test', 'ref-1')
    const machine = svc.gateway!.connected('ref-1')[0]!
    expect(machine).toMatchObject({ extended: false, streamResume: true, version: '0.9.52', attested: true, inputFormats: ['messages-v1', 'text'] })

    const messages = [{ role: 'user', content: 'hello, reference' }]
    const { events, chunks } = await run('ref-1', messages)
    const pieces = referenceReply(messages)
    expect(chunks).toEqual(pieces.map((piece, seq) => ({ seq, channel: piece.channel, text: piece.text })))
    const done = events.at(-1) as Extract<ExchangeEvent, { kind: 'complete' }>
    const meta = events[0] as Extract<ExchangeEvent, { kind: 'meta' }>

    // Every frame it got is one the network's agent parses: bytes as arrays, no field of ours.
    const request = p.received.find((f) => f.type === 'inference_request')!
    expect(request).toMatchObject({ input_format: 'messages-v1', job_uri: meta.jobUri, job_cid: meta.jobCid, resume_token: expect.any(String) })
    expect(Array.isArray(request.ciphertext)).toBe(true)
    expect(p.violations).toEqual([])
    // Each chunk relayed was acknowledged; the completion too.
    const acks = p.received.filter((f) => f.type === 'inference_ack' && f.session_id === meta.sessionId)
    expect(acks.map((a) => [a.next_seq, a.completed])).toEqual([...pieces.map((_, i) => [i + 1, false]), [pieces.length, true]])

    // The book counted every chunk relayed, whatever its channel; the receipt published before the completion settles.
    expect(svc.exchange!.book.get(meta.jobUri)).toMatchObject({ providerDid: p.opts.acct.did, state: 'completed', relayedChunks: pieces.length })
    expect(done.receiptUri).toMatch(new RegExp(`^at://${p.opts.acct.did}/${ids.ComputeReceipt}/`))
    const receipt = (await p.opts.acct.agent.com.atproto.repo.getRecord({ repo: p.opts.acct.did, collection: ids.ComputeReceipt, rkey: done.receiptUri!.split('/').pop()! })).data.value as Record<string, any>
    expect(await decided(done.receiptUri!)).toMatchObject({ outcome: 'settled', finding_code: null, amount: receipt.price.amount, provider_did: p.opts.acct.did, job_uri: meta.jobUri })
    p.close()
  })

  it('sends a provider older than messages-v1 text input without input_format, and no messages-v1 job', async () => {
    const p = await referenceProvider('oldrig.test', 'old-1', { binaryVersion: '0.9.20', streamResume: false })
    expect(svc.gateway!.connected('old-1')[0]).toMatchObject({ streamResume: false, inputFormats: ['text'] })
    const messages = [
      { role: 'system', content: 'be brief' },
      { role: 'user', content: 'rivers?' },
    ]
    const err = await run('old-1', messages, 'messages-v1').catch((e: unknown) => e)
    expect(err).toBeInstanceOf(ExchangeError)
    expect(err).toMatchObject({ code: 'no_providers_for_version' })
    const { chunks } = await run('old-1', messages, 'text')
    const request = p.received.find((f) => f.type === 'inference_request')!
    expect('input_format' in request).toBe(false)
    expect('resume_token' in request).toBe(false)
    // It read the flattened text as one user message, as the network's agent does.
    expect(chunks.filter((c) => !c.channel).map((c) => c.text).join('')).toBe('Echo: system: be brief\nuser: rivers?.')
    expect(p.violations).toEqual([])
    p.close()
  })

  it('resumes a stream across a dropped connection (the exchange relays each chunk once, in order), and the job settles', async () => {
    const p = await referenceProvider('resumerig.test', 'resume-1', { serve: 'manual' })
    const messages = [{ role: 'user', content: 'keep going' }]
    const pieces = referenceReply(messages)
    const relayed: number[] = []
    const job = run('resume-1', messages, 'messages-v1', (e) => e.kind === 'chunk' && relayed.push(e.seq))
    const req = await p.next((f) => f.type === 'inference_request')
    const sessionId = req.session_id as string
    // The exchange has chunk 0; chunks 1 and 2 are produced but lost with the connection.
    const acked = p.next((f) => f.type === 'inference_ack' && f.session_id === sessionId)
    p.chunk(sessionId, 0, pieces[0])
    expect(await acked).toMatchObject({ next_seq: 1, completed: false })
    p.produce(sessionId, 1, pieces[1]!)
    p.produce(sessionId, 2, pieces[2]!)
    p.ws.terminate()
    await p.reconnect()
    const result = p.next((f) => f.type === 'inference_resume_result')
    p.resume(sessionId)
    expect(await result).toMatchObject({ session_id: sessionId, status: 'resume', next_seq: 1, resume_token: req.resume_token })
    // A replayed duplicate is acknowledged, not relayed again.
    const dupAck = p.next((f) => f.type === 'inference_ack' && f.session_id === sessionId)
    p.chunk(sessionId, 0)
    expect(await dupAck).toMatchObject({ next_seq: 1 })
    await p.serve(sessionId, pieces)
    const { events } = await job
    expect(relayed).toEqual(pieces.map((_, i) => i))
    const done = events.at(-1) as Extract<ExchangeEvent, { kind: 'complete' }>
    expect(await decided(done.receiptUri!)).toMatchObject({ outcome: 'settled' })
    expect(p.violations).toEqual([])
    p.close()
  })
})

describe.skipIf(!resumeVectors)('the exchange half of the shared stream-resume vectors, on the gateway', () => {
  let p: ReferenceProvider
  let machine: () => ConnectedProvider
  beforeAll(async () => {
    p = await referenceProvider('vecrig.test', 'vec-1', { serve: 'manual' })
    machine = () => svc.gateway!.connected('vec-1')[0]!
  })
  afterAll(() => p?.close())

  /** A job sent straight through the gateway, its first `n` chunks relayed; what reaches the exchange is recorded. */
  async function jobAt(n: number) {
    const got = { chunks: [] as number[], done: null as JobCompletion | null, failed: null as string | null }
    const plaintext = encodeInput([{ role: 'user', content: 'vector' }])
    const sealed = sealPromptTo(plaintext, { encryptionPubKey: machine().encryptionPubKey })
    const requested = p.next((f) => f.type === 'inference_request')
    svc.gateway!.startJob(
      machine(),
      { job_uri: `at://${alice.did}/${ids.ComputeJob}/3kvector`, job_cid: 'bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm', requester_did: alice.did, requester_pub_key: sealed.ephemeralPublicKey, model: 'vec-1', max_tokens_out: 8, ciphertext: sealed.sealed, input_format: 'messages-v1' },
      { chunk: (seq) => got.chunks.push(seq), keepalive: () => {}, complete: (d) => (got.done = d), fail: (code) => (got.failed = code) },
    )
    const sessionId = (await requested).session_id as string
    const ack = () => p.next((f) => f.type === 'inference_ack' && f.session_id === sessionId)
    for (let seq = 0; seq < n; seq++) {
      const acked = ack()
      p.chunk(sessionId, seq, { text: `c${seq}` })
      await acked
    }
    return { sessionId, got, ack }
  }

  for (const v of resumeVectors?.chunk ?? []) {
    it(`chunk: ${v.name}`, async () => {
      const { sessionId, got, ack } = await jobAt(v.preAccept ? v.preAccept.length : (v.nextSeq ?? 0))
      const before = got.chunks.length
      const acked = ack()
      p.chunk(sessionId, v.seq, { text: `c${v.seq}` })
      expect(await acked).toMatchObject({ next_seq: v.nextSeqAfter, completed: false })
      expect(got.chunks.length > before).toBe(v.accept)
    })
  }

  for (const v of resumeVectors?.resume.filter((r) => r.status !== undefined) ?? []) {
    it(`resume: ${v.name}`, async () => {
      const { sessionId, got } = await jobAt(v.advisorNextSeq ?? 0)
      const old = machine()
      p.ws.terminate()
      await waitFor(() => old.socket.readyState === old.socket.CLOSED, 'the gateway saw the connection drop')
      await p.reconnect()
      const result = p.next((f) => f.type === 'inference_resume_result' && f.session_id === sessionId)
      p.resume(sessionId, v.producedSeq)
      expect(await result).toMatchObject({ status: v.status, next_seq: v.nextSeq })
      // A provider that lost relayed chunks has lost the job.
      if (v.status === 'rejected') await waitFor(() => got.failed === 'lost', 'the job failed')
      else expect(got.failed).toBeNull()
      await waitFor(() => machine()?.attested, 'routable again')
    })
  }

  for (const v of resumeVectors?.completion ?? []) {
    it(`completion: ${v.name}`, async () => {
      const { sessionId, got, ack } = await jobAt(v.nextSeq)
      const acked = ack()
      p.complete(sessionId, { tokens_in: 1, tokens_out: 1, receipt_uri: '', final_seq: v.finalSeq })
      expect(await acked).toMatchObject({ next_seq: v.nextSeq, completed: v.accepted })
      expect(got.done !== null).toBe(v.accepted)
    })
  }
})
