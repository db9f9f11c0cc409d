/**
 * The p256-ecies-se scheme end to end, on the real local network: the
 * reference provider agent running with a P-256 encryption key (the codec of
 * the network's Secure Enclave providers) publishes it on its records and
 * serves prompts sealed to it by the TypeScript client (dispatch with
 * `sealed`), by the console's chat page in a browser (the @noble backend)
 * and by the exchange on receipt (the OpenAI-compatible API); each reply is
 * opened by whoever sealed the prompt, and the receipts verify.
 */
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ApiKeys } from '../console/api-keys.ts'
import { CocoreClient, PROVIDERS_PATH, type ChatEvent, type ConnectedProviderView } from '../src/client/index.ts'
import { sealPromptTo } from '../src/crypto/enc-scheme.ts'
import { p256PublicKey } from '../src/crypto/p256.ts'
import { verifyAttestationSignature } from '../src/crypto/signing.ts'
import type { LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { InferenceDispatchInput } from '../src/lexicon/generated/types.ts'
import type { InferenceRequestFrame, ProviderFrame } from '../src/protocol/agent.ts'
import { encodeInput, inputCommitment, type ChatMessage } from '../src/protocol/input.ts'
import { ProviderAgent } from '../src/provider/agent.ts'
import { BuiltinEngine } from '../src/provider/engine.ts'
import { JobRunner } from '../src/provider/jobs.ts'
import { KeyFileError, loadOrCreateKeys } from '../src/provider/keys.ts'
import { priceList } from '../src/provider/records.ts'
import { RepoWriter } from '../src/provider/repo.ts'
import { signInWithBrowser } from './fixture/console.ts'
import { startStack, type Stack } from './fixture/stack.ts'
import { waitFor } from './fixture/wait.ts'

const MODEL = 'builtin'
const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64')
const rkeyOf = (uri: string) => uri.split('/').pop()!
const expectedReply = (messages: ChatMessage[], maxTokens: number) => new BuiltinEngine().plan({ model: MODEL, messages, maxTokens, params: {} }).pieces.join('')

let stack: Stack<readonly ['alice.test', 'rig.test', 'market.test']>
let alice: LocalAccount
let rig: LocalAccount
let agent: ProviderAgent
let apiKey: string
let consoleUrl: string
const keyDir = mkdtempSync(join(tmpdir(), 'cocore-ecies-'))

beforeAll(async () => {
  stack = await startStack({ accounts: ['alice.test', 'rig.test', 'market.test'] as const, console: ([, , market], av) => ({ index: av.consoleIndex(), exchangeDid: market.did }) })
  ;[alice, rig] = stack.accounts
  consoleUrl = stack.svc.url
  // Alice's job records are published through her OAuth session with the console.
  await (await signInWithBrowser(stack.browser, consoleUrl, alice.handle, alice.password)).close()
  apiKey = new ApiKeys(stack.svc.db).create(alice.did, 'sdk', ['inference']).secret
  agent = new ProviderAgent({
    pdsUrl: stack.net.pdsUrl,
    identifier: rig.handle,
    password: rig.password,
    exchangeUrl: stack.svc.localUrl,
    exchangeDid: stack.accounts[2].did,
    keyFile: join(keyDir, 'key.json'),
    encScheme: 'p256-ecies-se',
    engine: new BuiltinEngine(),
    models: [MODEL],
    reconnect: { initialMs: 100, maxMs: 500 },
  })
  await agent.start()
  const key = b64(agent.keys.encryption.publicKey)
  // Routable once the exchange lists it (its attestation answer verified).
  await waitFor(async () => {
    const res = await fetch(`${consoleUrl}${PROVIDERS_PATH}?model=${MODEL}`)
    const { providers } = (await res.json()) as { providers: ConnectedProviderView[] }
    return providers.some((p) => p.did === rig.did && p.encryptionPubKey === key)
  }, 'the agent listed by the exchange')
}, 120_000)

afterAll(async () => {
  await agent?.stop()
  await stack?.close()
})

/** verifyReceipt's answer once the receipt reached the AppView. */
const verified = (uri: string) =>
  waitFor(async () => {
    const res = await fetch(`${stack.av.url}/xrpc/${ids.ComputeVerifyReceipt}?uri=${encodeURIComponent(uri)}`)
    const body = (await res.json()) as { ok: boolean; findings: unknown[] }
    return res.ok && body.ok ? body : null
  }, `${uri} verified`)

describe('a provider with a p256-ecies-se key', () => {
  it('keeps the key in its key file and announces it, with its scheme, on its records', async () => {
    const file = JSON.parse(readFileSync(join(keyDir, 'key.json'), 'utf8'))
    expect(file.encScheme).toBe('p256-ecies-se')
    expect(agent.keys.encryption.scheme).toBe('p256-ecies-se')
    expect(agent.keys.encryption.publicKey).toHaveLength(64)
    const key = b64(agent.keys.encryption.publicKey)

    const prov = await rig.agent.com.atproto.repo.getRecord({ repo: rig.did, collection: ids.ComputeProvider, rkey: rkeyOf(agent.published.provider.uri) })
    expect((prov.data.value as { encryptionPubKey: string }).encryptionPubKey).toBe(key)
    const att = await rig.agent.com.atproto.repo.getRecord({ repo: rig.did, collection: ids.ComputeAttestation, rkey: rkeyOf(agent.published.attestation.uri) })
    const a = att.data.value as Record<string, unknown> & { publicKey: string }
    // A software key: the scheme is the codec's, and the attestation does not claim an enclave.
    expect(a).toMatchObject({ encryptionPubKey: key, encScheme: 'p256-ecies-se', secureEnclaveAvailable: false })
    expect(verifyAttestationSignature(a, p256PublicKey(Buffer.from(a.publicKey, 'base64')))).toBe(true)
  })

  it('reloads the key, and refuses a key file of the other scheme', () => {
    expect(b64(loadOrCreateKeys(join(keyDir, 'key.json'), { encScheme: 'p256-ecies-se' }).encryption.publicKey)).toBe(b64(agent.keys.encryption.publicKey))
    expect(() => loadOrCreateKeys(join(keyDir, 'key.json'), { encScheme: 'x25519' })).toThrow(KeyFileError)
    const x = join(keyDir, 'x.json')
    expect(loadOrCreateKeys(x).encryption.scheme).toBe('x25519')
    expect(() => loadOrCreateKeys(x, { encScheme: 'p256-ecies-se' })).toThrow(/holds a x25519 encryption key/)
    const broken = join(keyDir, 'broken.json')
    writeFileSync(broken, JSON.stringify({ ...JSON.parse(readFileSync(x, 'utf8')), encScheme: 'rot13' }), { mode: 0o600 })
    expect(() => loadOrCreateKeys(broken)).toThrow(/unknown encScheme/)
  })

  it('opens only prompts sealed in its scheme, and seals its reply back in it', async () => {
    const frames: ProviderFrame[] = []
    const jobs = new JobRunner({
      did: rig.did,
      keys: agent.keys,
      engine: new BuiltinEngine(),
      prices: priceList([MODEL]),
      attestation: () => agent.published.attestation,
      writer: new RepoWriter(rig.agent, rig.did),
      send: (f) => frames.push(f),
    })
    const messages: ChatMessage[] = [{ role: 'user', content: 'Name three rivers in Europe.' }]
    const plaintext = encodeInput(messages)
    const request = (sealed: { sealed: string; ephemeralPublicKey: string }, session: string): InferenceRequestFrame => ({
      type: 'inference_request',
      v: 1,
      session_id: session,
      job_uri: `at://${alice.did}/${ids.ComputeJob}/3kabcdefghijk`,
      job_cid: 'bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm',
      requester_did: alice.did,
      requester_pub_key: sealed.ephemeralPublicKey,
      model: MODEL,
      max_tokens_out: 8,
      ciphertext: sealed.sealed,
      input_format: 'messages-v1',
      input_commitment: inputCommitment(plaintext),
      params: {},
    })
    const ok = sealPromptTo(plaintext, { encryptionPubKey: b64(agent.keys.encryption.publicKey), encScheme: 'p256-ecies-se' })
    await jobs.run(request(ok, 's1'))
    const chunks = frames.filter((f) => f.type === 'inference_chunk' && f.session_id === 's1').map((f) => new TextDecoder().decode(ok.reply.open((f as { ciphertext: string }).ciphertext)!))
    expect(chunks.join('')).toBe(expectedReply(messages, 8))

    // An X25519 ephemeral key and box to this machine: not its scheme, refused before anything is produced.
    const wrong = sealPromptTo(plaintext, { encryptionPubKey: b64(crypto.getRandomValues(new Uint8Array(32))) })
    await jobs.run(request(wrong, 's2'))
    expect(frames.filter((f) => 'session_id' in f && f.session_id === 's2')).toMatchObject([{ type: 'inference_error', code: 'decrypt_failed' }])
    await jobs.idle()
  })
})

describe('sealed to it through the exchange', () => {
  it('by the TypeScript client: the envelope names its scheme, and the reply opens with the ephemeral key', async () => {
    const sent: InferenceDispatchInput[] = []
    const client = new CocoreClient({
      consoleUrl,
      appviewUrl: stack.av.url,
      apiKey,
      fetch: (input, init) => {
        if (String(input).includes(ids.InferenceDispatch)) sent.push(JSON.parse(String(init?.body)))
        return fetch(input, init)
      },
    })
    const messages: ChatMessage[] = [{ role: 'user', content: 'What sits in an enclave?' }]
    const events: ChatEvent[] = []
    for await (const e of client.chat({ model: MODEL, messages, maxTokens: 32, targetProviderDid: rig.did })) events.push(e)
    const text = events.flatMap((e) => (e.type === 'text' ? [e.text] : [])).join('')
    expect(text).toBe(expectedReply(messages, 32))

    const envelope = sent[0]!.sealed!.envelopes[0]! as { scheme?: string; ephemeralPubKey: string; encryptionPubKey: string }
    expect(sent[0]!.sealed!.scheme).toBe('x25519')
    expect(envelope.scheme).toBe('p256-ecies-se')
    expect(envelope.encryptionPubKey).toBe(b64(agent.keys.encryption.publicKey))
    expect(Buffer.from(envelope.ephemeralPubKey, 'base64')).toHaveLength(64)

    const complete = events.at(-1) as Extract<ChatEvent, { type: 'complete' }>
    expect(complete.receiptUri).toMatch(new RegExp(`^at://${rig.did}/${ids.ComputeReceipt}/`))
    // Countersigned by this stack's exchange, a brokerage the test AppView does not trust: an info finding, no error.
    const verdict = await verified(complete.receiptUri!)
    expect(verdict).toMatchObject({ ok: true })
    expect((verdict.findings as { severity: string }[]).filter((f) => f.severity !== 'info')).toEqual([])
  })

  it('by the exchange on receipt (the OpenAI-compatible API), streamed and not', async () => {
    const openai = new OpenAI({ baseURL: `${consoleUrl}/v1`, apiKey, maxRetries: 0 })
    const messages = [{ role: 'user' as const, content: 'Seal this on receipt.' }]
    const res = await openai.chat.completions.create({ model: MODEL, messages, max_tokens: 16 })
    expect(res.choices[0]!.message.content).toBe(expectedReply(messages, 16))
    const receipt = (res as unknown as { cocore: { receipt: string } }).cocore.receipt
    expect(receipt).toMatch(new RegExp(`^at://${rig.did}/${ids.ComputeReceipt}/`))
    expect(await verified(receipt)).toMatchObject({ ok: true })

    // Twice more: the second seal to this key was prepared after the first request ended.
    for (let i = 0; i < 2; i++) {
      let text = ''
      for await (const c of await openai.chat.completions.create({ model: MODEL, messages, max_tokens: 16, stream: true })) text += c.choices[0]?.delta?.content ?? ''
      expect(text).toBe(expectedReply(messages, 16))
    }
  })

  it("in the browser, on the console's chat page", async () => {
    const page = await signInWithBrowser(stack.browser, consoleUrl, alice.handle, alice.password)
    await page.goto(`${consoleUrl}/chat`)
    await page.locator(`select[name=model] option[value=${MODEL}]`).waitFor({ state: 'attached' })
    const prompt = 'sealed with noble in the page'
    await page.locator('textarea[name=prompt]').fill(prompt)
    await page.getByRole('button', { name: 'Send' }).click()
    await page.locator('#chat[data-state=done]').waitFor({ timeout: 30_000 })
    expect(await page.locator('p.msg.assistant').first().textContent()).toBe(expectedReply([{ role: 'user', content: prompt }], 256))
    const receipt = await page.locator('#chat').getAttribute('data-receipt')
    expect(receipt).toMatch(new RegExp(`^at://${rig.did}/${ids.ComputeReceipt}/`))
    await page.close()
  })
})
