/**
 * The OpenAI-compatible API through the exchange, with the official `openai`
 * client: a requester signed in through the real PDS (its job records are
 * published there through that session), providers on the real gateway
 * speaking the real protocol with real keys (scripted, to produce the faults
 * a healthy agent never does), routing by model, tier, country and version,
 * failover before the first chunk, errors after it, cancellation, and the
 * OpenAI error objects.
 */
import OpenAI from 'openai'
import type { Browser } from 'playwright-core'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { AppView } from '../appview/index.ts'
import { ApiKeys, UsageCounters } from '../console/api-keys.ts'
import type { ConsoleService } from '../console/index.ts'
import type { LocalAccount, LocalNetwork } from '../src/dev/network.ts'
import { friend, putRecord } from '../src/dev/records.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { openPrompt } from '../src/crypto/seal.ts'
import { inputCommitment } from '../src/protocol/input.ts'
import type { InferenceRequestFrame } from '../src/protocol/agent.ts'
import { signInWithBrowser, startTestConsole } from './fixture/console.ts'
import { startStack, type Stack } from './fixture/stack.ts'
import { connectScripted, publishScriptedRecord, scriptedReply, type Behaviour, type ScriptedProvider } from './fixture/scripted-provider.ts'
import { waitFor } from './fixture/wait.ts'
import { CocoreClient, CocoreError, type ChatEvent } from '../src/client/index.ts'

let net: LocalNetwork
let av: AppView
let svc: ConsoleService
let browser: Browser
let alice: LocalAccount
let bob: LocalAccount
let market: LocalAccount
let key: string
const providers: Record<string, ScriptedProvider> = {}
/** Each provider's X25519 secret key: the tests open what it was sent. */
const secretKeys: Record<string, Uint8Array> = {}

/** The commitment of the bytes a provider was sent (salted: not recomputable from the messages). */
const commitmentOfSealed = (handle: string, req: InferenceRequestFrame) => inputCommitment(openPrompt(req.ciphertext, req.requester_pub_key, secretKeys[handle]!)!)

async function provider(handle: string, model: string, behaviour: Behaviour, extra: Record<string, unknown> = {}, version?: string) {
  const acct = await net.createAccount(handle)
  const published = await publishScriptedRecord(acct, model, extra)
  secretKeys[handle] = published.keys.secretKey
  await waitFor(() => av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(published.ref.uri), `${handle} provider record indexed`)
  return { acct, published, connect: () => connectScripted(svc.localUrl.replace('http', 'ws'), acct, market.did, published, { behaviour, models: [model], version }) }
}

const client = (tier = '', apiKey = key) => new OpenAI({ baseURL: `${svc.url}/v1${tier}`, apiKey, maxRetries: 0 })
const ask = (content: string) => [{ role: 'user' as const, content }]

let stack: Stack

beforeAll(async () => {
  const started = await startStack({
    accounts: ['alice.test', 'bob.test', 'market.test'],
    console: ([, , market], av) => ({ index: av.consoleIndex(), exchangeDid: market.did, firstChunkTimeoutMs: 1500 }),
  })
  stack = started
  ;({ net, av, svc, browser, accounts: [alice, bob, market] } = started)
  // Alice signs in through the PDS: the console holds her OAuth session, which publishes her job records.
  const page = await signInWithBrowser(browser, svc.url, alice.handle, alice.password)
  await page.close()
  key = new ApiKeys(svc.db).create(alice.did, 'sdk', ['inference']).secret

  const setups = await Promise.all([
    provider('carol.test', 'echo-1', 'reply', { region: 'DE' }, '0.1.0'),
    provider('dave.test', 'fo-1', 'refuse'),
    provider('erin.test', 'fo-1', 'reply'),
    provider('fay.test', 'fo-2', 'drop-before-first'),
    provider('gus.test', 'fo-2', 'reply'),
    provider('amy.test', 'dr-1', 'drop-after-first'),
    provider('ben.test', 'slow-1', 'slow'),
    provider('cal.test', 'tier-1', 'reply'),
    provider('dee.test', 'tier-1', 'reply', { trustLevel: 'hardware-attested' }),
    provider('stranger.test', 'tier-1', 'reply', { proBono: { mode: 'any' } }),
    provider('asker.test', 'sil-1', 'silent'),
  ])
  // Cal lists Alice as a friend (the private tier); indexed before anyone routes.
  const f = await putRecord(setups[7]!.acct.agent, setups[7]!.acct.did, friend(alice.did))
  await waitFor(() => av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(f.uri), 'friend record indexed')
  // In order: the first connected of equals is tried first.
  for (const s of setups) providers[s.acct.handle] = await s.connect()
  await waitFor(() => [...svc.gateway!.providers.values()].filter((p) => p.attested).length === setups.length, 'every provider attested')
}, 120_000)

afterAll(async () => {
  for (const p of Object.values(providers)) p.close()
  await stack?.close()
})

describe('OpenAI-compatible API', () => {
  it('answers a chat completion (not streamed), with usage, after publishing the job on the requester PDS', async () => {
    const messages = [
      { role: 'system' as const, content: 'be brief' },
      { role: 'user' as const, content: 'hello carol' },
    ]
    const res = await client().chat.completions.create({ model: 'echo-1', messages, max_tokens: 50, temperature: 0.5, top_p: 0.9, stop: ['END'], seed: 7 })
    expect(res.object).toBe('chat.completion')
    expect(res.choices[0]!.message).toEqual({ role: 'assistant', content: 'Echo: hello carol.' })
    expect(res.choices[0]!.finish_reason).toBe('stop')
    expect(res.usage).toEqual({ prompt_tokens: 7, completion_tokens: 4, total_tokens: 11 })

    // What the provider received: sealed bytes only, and the parameters.
    const carol = providers['carol.test']!
    const req = carol.requests.at(-1)!
    expect(req).toMatchObject({ model: 'echo-1', max_tokens_out: 50, params: { temperature: 0.5, top_p: 0.9, stop: ['END'], seed: 7 }, requester_did: alice.did, input_format: 'messages-v1' })
    expect(carol.raw.join('\n')).not.toContain('hello carol')
    expect(carol.opened.get(req.session_id)).toEqual(messages)

    // The job and its payment authorization, on Alice's PDS, in the reference format, under the CID the provider was given.
    const commitment = commitmentOfSealed('carol.test', req)
    expect(req.input_commitment).toBe(commitment)
    const rkey = req.job_uri.split('/').pop()!
    const job = await alice.agent.com.atproto.repo.getRecord({ repo: alice.did, collection: ids.ComputeJob, rkey })
    expect(job.data.cid).toBe(req.job_cid)
    expect(job.data.value).toMatchObject({ model: 'echo-1', inputCommitment: commitment, inputFormat: 'messages-v1', maxTokensOut: 50, acceptedExchanges: [market.did], acceptedTrustLevel: 'self-attested' })
    const authRef = (job.data.value as { paymentAuthorization: { uri: string; cid: string } }).paymentAuthorization
    const auth = await alice.agent.com.atproto.repo.getRecord({ repo: alice.did, collection: ids.ComputePaymentAuthorization, rkey: authRef.uri.split('/').pop()! })
    expect(auth.data.cid).toBe(authRef.cid)
    expect(auth.data.value).toMatchObject({ exchange: market.did, scope: 'singleJob' })
    expect((job.data.value as { nonce: string }).nonce).toMatch(/^[0-9a-f]{32}$/)

    // Usage counted per key and day.
    const today = new UsageCounters(svc.db).today(alice.did)
    expect(today.tokensIn).toBeGreaterThanOrEqual(7)
    expect(today.tokensOut).toBeGreaterThanOrEqual(4)
  })

  it('streams, with the usage chunk when stream_options.include_usage is set', async () => {
    const stream = await client().chat.completions.create({ model: 'echo-1', messages: ask('stream me'), stream: true, stream_options: { include_usage: true } })
    let text = ''
    let finish: string | null = null
    let usage: OpenAI.CompletionUsage | undefined
    for await (const chunk of stream) {
      expect(chunk.object).toBe('chat.completion.chunk')
      if (chunk.choices[0]) {
        text += chunk.choices[0].delta.content ?? ''
        finish = chunk.choices[0].finish_reason ?? finish
      }
      if (chunk.usage) usage = chunk.usage
    }
    expect(text).toBe(scriptedReply(ask('stream me')).join(''))
    expect(finish).toBe('stop')
    expect(usage).toEqual({ prompt_tokens: 7, completion_tokens: 4, total_tokens: 11 })
  })

  it('fails over to another provider when one refuses or drops before its first chunk', async () => {
    const refused = providers['dave.test']!.requests.length
    const res = await client().chat.completions.create({ model: 'fo-1', messages: ask('fail over') })
    expect(res.choices[0]!.message.content).toBe('Echo: fail over.')
    expect(providers['dave.test']!.requests.length).toBe(refused + 1)
    expect(res).toMatchObject({ cocore: { provider: providers['erin.test']!.did } })

    const res2 = await client().chat.completions.create({ model: 'fo-2', messages: ask('after a drop') })
    expect(res2.choices[0]!.message.content).toBe('Echo: after a drop.')
    expect(providers['fay.test']!.requests.length).toBe(1)
    expect(res2).toMatchObject({ cocore: { provider: providers['gus.test']!.did } })
    // Both failed-over jobs kept one job record: the receipt of the provider that answered names it.
    expect(providers['gus.test']!.requests[0]!.job_uri).toBe(providers['fay.test']!.requests[0]!.job_uri)
  })

  it('gives a clean error when the provider drops after the first chunk, and when providers stay silent', async () => {
    const stream = await client().chat.completions.create({ model: 'dr-1', messages: ask('half') , stream: true })
    let text = ''
    const err = await (async () => {
      try {
        for await (const c of stream) text += c.choices[0]?.delta.content ?? ''
      } catch (e) {
        return e as InstanceType<typeof OpenAI.APIError>
      }
    })()
    expect(text).toBe('Echo')
    expect(err).toBeInstanceOf(OpenAI.APIError)
    expect(err!.message).toMatch(/provider failed after the reply began/)

    const silent = await client().chat.completions.create({ model: 'sil-1', messages: ask('anyone?') }).catch((e) => e as InstanceType<typeof OpenAI.APIError>)
    expect(silent).toBeInstanceOf(OpenAI.APIError)
    expect(silent).toMatchObject({ status: 503, code: 'model_unavailable', type: 'service_unavailable_error' })
    // The silent provider was told to stop.
    await waitFor(() => providers['asker.test']!.cancels.length === 1, 'silent job cancelled')
  })

  it('cancels the job at the provider when the client disconnects', async () => {
    const ac = new AbortController()
    const stream = await client().chat.completions.create({ model: 'slow-1', messages: ask('long one'), stream: true }, { signal: ac.signal })
    let n = 0
    // The client ends the iteration quietly or with an abort error, depending on timing: either way it is gone.
    await (async () => {
      for await (const _ of stream) if (++n === 3) ac.abort()
    })().catch((e: Error) => expect(e.name).toMatch(/Abort/))
    expect(n).toBe(3)
    const ben = providers['ben.test']!
    await waitFor(() => ben.cancels.includes(ben.requests[0]!.session_id), 'job cancelled at the provider')
    expect(svc.gateway!.machinesOf(ben.did)[0]!.jobs.size).toBe(0)
  })

  it('routes by tier: private (friends), pro bono; verified is unavailable (a record saying hardware-attested is no evidence)', async () => {
    const cal = providers['cal.test']!
    const dee = providers['dee.test']!
    const stranger = providers['stranger.test']!
    const who = async (tier: string) => ((await client(tier).chat.completions.create({ model: 'tier-1', messages: ask(`via ${tier}`) })) as unknown as { cocore: { provider: string } }).cocore.provider
    for (let i = 0; i < 3; i++) expect(await who('/private')).toBe(cal.did)
    // Dee's record claims hardware attestation and its machine answered the challenge: still its own word.
    expect(dee.requests).toHaveLength(0)
    expect(await who('/verified').catch((e) => e)).toMatchObject({ status: 503, code: 'verified_tier_unavailable' })
    expect((await client('/verified').models.list()).data).toEqual([])
    expect(dee.requests).toHaveLength(0)
    for (let i = 0; i < 3; i++) expect(await who('/probono')).toBe(stranger.did)
    const pb = stranger.requests.at(-1)!
    expect(pb.pro_bono).toBe(true)
    const job = await alice.agent.com.atproto.repo.getRecord({ repo: alice.did, collection: ids.ComputeJob, rkey: pb.job_uri.split('/').pop()! })
    expect((job.data.value as { priceCeiling: { amount: number } }).priceCeiling.amount).toBe(0)
    // Models per tier.
    const priv = await client('/private').models.list()
    expect(priv.data.map((m) => m.id)).toEqual(['tier-1'])
    const all = await client().models.list()
    expect(all.data.map((m) => m.id)).toEqual(expect.arrayContaining(['echo-1', 'fo-1', 'fo-2', 'tier-1']))
  })

  it('routes by country and minimum provider version, with clear error codes', async () => {
    const create = (extra: Record<string, unknown>, model = 'echo-1') => client().chat.completions.create({ model, messages: ask('where') , ...extra } as never).catch((e) => e as InstanceType<typeof OpenAI.APIError>)
    expect(await create({ country: 'de' })).toMatchObject({ choices: [{ message: { content: 'Echo: where.' } }] })
    // What is only missing now is a 503 to retry (the network's codes); an unknown model a 404.
    expect(await create({ country: 'FR' })).toMatchObject({ status: 503, code: 'no_providers_for_country', type: 'service_unavailable_error' })
    expect(await create({ min_provider_version: '0.1' })).toMatchObject({ choices: [{ finish_reason: 'stop' }] })
    expect(await create({ min_provider_version: 'v0.1.0' })).toMatchObject({ choices: [{ finish_reason: 'stop' }] })
    expect(await create({ min_provider_version: '0.2.0' })).toMatchObject({ status: 503, code: 'no_providers_for_version' })
    expect(await create({ min_provider_version: 'v0.2' })).toMatchObject({ status: 503, code: 'no_providers_for_version' })
    expect(await create({}, 'no-such-model')).toMatchObject({ status: 404, code: 'model_not_found', param: 'model' })
    // A friend (Cal) serves tier-1, not echo-1.
    const onlyCarol = await client('/private').chat.completions.create({ model: 'echo-1', messages: ask('x') }).catch((e) => e as InstanceType<typeof OpenAI.APIError>)
    expect(onlyCarol).toMatchObject({ status: 404, code: 'no_friends_for_model' })
  })

  it('refuses bad requests and bad keys with OpenAI error objects', async () => {
    const bad = async (body: Record<string, unknown>) => client().chat.completions.create({ model: 'echo-1', messages: ask('x'), ...body } as never).catch((e) => e as InstanceType<typeof OpenAI.APIError>)
    expect(await bad({ max_tokens: 0 })).toMatchObject({ status: 400, code: 'invalid_value', param: 'max_tokens', type: 'invalid_request_error' })
    expect(await bad({ temperature: 5 })).toMatchObject({ status: 400, param: 'temperature' })
    expect(await bad({ messages: [] })).toMatchObject({ status: 400, param: 'messages' })
    // None of these providers' owners serve tool calling.
    expect(await bad({ tools: [{ type: 'function', function: { name: 'f' } }] })).toMatchObject({ status: 400, code: 'tool_calls_not_supported', param: 'tools' })
    expect(await bad({ functions: [{ name: 'f' }] })).toMatchObject({ status: 400, code: 'unsupported_parameter', param: 'functions' })
    expect(await bad({ stop: ['a', 'b', 'c', 'd', 'e'] })).toMatchObject({ status: 400, param: 'stop' })
    const raw = await fetch(`${svc.url}/v1/chat/completions`, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: '{nope' })
    expect(raw.status).toBe(400)
    expect(await raw.json()).toMatchObject({ error: { code: 'invalid_json', type: 'invalid_request_error' } })

    const wrongKey = await client('', 'cocore_nope').chat.completions.create({ model: 'echo-1', messages: ask('x') }).catch((e) => e as InstanceType<typeof OpenAI.APIError>)
    expect(wrongKey).toMatchObject({ status: 401, code: 'invalid_api_key' })
    const readOnly = new ApiKeys(svc.db).create(alice.did, 'reader', ['read']).secret
    expect(await client('', readOnly).chat.completions.create({ model: 'echo-1', messages: ask('x') }).catch((e) => e)).toMatchObject({ status: 403, code: 'missing_scope' })
    // Bob never signed in to the console: there is no session to publish his job with.
    const bobKey = new ApiKeys(svc.db).create(bob.did, 'bob', ['inference']).secret
    expect(await client('', bobKey).chat.completions.create({ model: 'echo-1', messages: ask('x') }).catch((e) => e)).toMatchObject({ status: 403, code: 'pds_session_required' })
    const unknown = await fetch(`${svc.url}/v1/embeddings`, { method: 'POST', headers: { authorization: `Bearer ${key}` } })
    expect(unknown.status).toBe(404)
    expect(await unknown.json()).toMatchObject({ error: { code: 'unknown_endpoint' } })
  })

  it('enforces the daily token quota and the per-key rate limit', async () => {
    const limited = await startTestConsole(net, av.url, { index: av.consoleIndex(), exchangeDid: market.did, dailyTokenLimit: 100, apiKeyRatePerMinute: 3 })
    try {
      const keys = new ApiKeys(limited.db)
      const k = keys.create(alice.did, 'quota', ['inference']).secret
      new UsageCounters(limited.db).add(alice.did, null, { tokensIn: 60, tokensOut: 40 })
      const c = new OpenAI({ baseURL: `${limited.url}/v1`, apiKey: k, maxRetries: 0 })
      expect(await c.chat.completions.create({ model: 'echo-1', messages: ask('x') }).catch((e) => e)).toMatchObject({ status: 429, code: 'insufficient_quota', type: 'insufficient_quota' })
      // The tier listings take a key (the open network's /v1/models is public).
      const tier = new OpenAI({ baseURL: `${limited.url}/v1/private`, apiKey: k, maxRetries: 0 })
      await tier.models.list()
      await tier.models.list()
      const res = await fetch(`${limited.url}/v1/private/models`, { headers: { authorization: `Bearer ${k}` } })
      expect(res.status).toBe(429)
      expect(Number(res.headers.get('retry-after'))).toBeGreaterThan(0)
      expect(await res.json()).toMatchObject({ error: { code: 'rate_limit_exceeded', type: 'rate_limit_error' } })
    } finally {
      await limited.close()
    }
  })
})

describe('dev.cocore.inference.dispatch', () => {
  const sdk = (extra: Partial<ConstructorParameters<typeof CocoreClient>[0]> = {}) => new CocoreClient({ consoleUrl: svc.url, appviewUrl: av.url, apiKey: key, ...extra })
  const collect = async (it: AsyncIterable<ChatEvent>) => {
    const events: ChatEvent[] = []
    for await (const e of it) events.push(e)
    return events
  }

  it('relays a prompt the TypeScript client sealed itself, to keys it read from the AppView, and the reply it opens', async () => {
    const carol = providers['carol.test']!
    const before = carol.requests.length
    const events = await collect(sdk().chat({ model: 'echo-1', messages: ask('sealed by the client'), maxTokens: 40 }))
    expect(events[0]).toMatchObject({ type: 'meta', providerDid: carol.did })
    expect(events.filter((e) => e.type === 'text').map((e) => (e as { text: string }).text).join('')).toBe('Echo: sealed by the client.')
    expect(events.at(-1)).toMatchObject({ type: 'complete', tokensIn: 7, tokensOut: 4, finishReason: 'stop' })
    expect(carol.requests.length).toBe(before + 1)
    expect(carol.raw.join('\n')).not.toContain('sealed by the client')
    // The job record names the commitment of what the client sealed.
    const req = carol.requests.at(-1)!
    expect(req.input_commitment).toBe(commitmentOfSealed('carol.test', req))
    expect(req.max_tokens_out).toBe(40)
  })

  it('refuses to seal to a key the AppView does not confirm', async () => {
    // An exchange that lies about a provider's key: the client notices before anything is sealed.
    const lying: typeof fetch = async (input, init) => {
      const res = await fetch(input, init)
      if (!String(input).includes('/exchange/providers')) return res
      const body = (await res.json()) as { providers: { encryptionPubKey: string }[] }
      for (const p of body.providers) p.encryptionPubKey = Buffer.alloc(32, 7).toString('base64')
      return Response.json(body)
    }
    const before = providers['carol.test']!.requests.length
    await expect(collect(sdk({ fetch: lying }).chat({ model: 'echo-1', messages: ask('x') }))).rejects.toMatchObject({ code: 'unverified_provider_keys' })
    expect(providers['carol.test']!.requests.length).toBe(before)
  })

  it('fails over among the providers the client sealed to', async () => {
    const events = await collect(sdk().chat({ model: 'fo-1', messages: ask('sealed failover') }))
    expect(events.filter((e) => e.type === 'text').map((e) => (e as { text: string }).text).join('')).toBe('Echo: sealed failover.')
    expect(events[0]).toMatchObject({ providerDid: providers['erin.test']!.did })
  })

  it('seals on receipt for reference clients sending plaintext, and checks its input', async () => {
    const post = (body: unknown) =>
      fetch(`${svc.url}/xrpc/${ids.InferenceDispatch}`, { method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: JSON.stringify(body) })
    const res = await post({ model: 'echo-1', prompt: 'plain words', maxTokensOut: 20, priceCeiling: { amount: 100, currency: 'CC' } })
    expect(res.headers.get('content-type')).toContain('text/event-stream')
    const text = await res.text()
    expect(text).toMatch(/event: meta\ndata: \{"jobUri":"at:\/\//)
    expect(text).toContain('"text":"plain words"')
    expect(text).toContain('event: complete')
    expect(providers['carol.test']!.raw.join('\n')).not.toContain('plain words')

    const sealedWithPlain = await post({ model: 'echo-1', prompt: 'oops plaintext', maxTokensOut: 20, priceCeiling: { amount: 1, currency: 'CC' }, sealed: { scheme: 'x25519', inputCommitment: 'a'.repeat(64), envelopes: [{ providerDid: alice.did, encryptionPubKey: 'x', ephemeralPubKey: 'y', ciphertext: 'z' }] } })
    expect(sealedWithPlain.status).toBe(400)
    expect(((await sealedWithPlain.json()) as { message: string }).message).toMatch(/prompt must be "sealed"/)
    const none = await post({ model: 'nope', prompt: 'x', maxTokensOut: 1, priceCeiling: { amount: 1, currency: 'CC' } })
    expect(none.status).toBe(404)
    expect(await none.json()).toMatchObject({ error: 'NoProvidersForModel' })
    const confidential = await post({ model: 'echo-1', prompt: 'x', maxTokensOut: 1, priceCeiling: { amount: 1, currency: 'CC' }, requireConfidential: true })
    expect(await confidential.json()).toMatchObject({ error: 'ConfidentialUnavailable' })
  })
})
