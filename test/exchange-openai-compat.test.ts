/**
 * The OpenAI-compatible API as the network's console serves it, through the
 * official `openai` client on the real local network: tool calling (the
 * job's public tools, the conversation sealed, tool-call chunks relayed as
 * `tool_calls`, streamed and not), images (inline and fetched), structured
 * output (`response_format` as the job's outputSchema), the public model
 * listings (`?view=`, recommended models), the `/api/v1` mount, a
 * service-auth JWT as the bearer, and the network's error codes.
 *
 * The tools machine is the real provider agent on an OpenAI-compatible
 * upstream that a test scripts (test/fixture/fake-upstream.ts): what it was
 * sent is what the exchange and the agent passed through.
 *
 *   npx vitest run test/exchange-openai-compat.test.ts
 */
import { createServer, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { AppView } from '../appview/index.ts'
import { ApiKeys } from '../console/api-keys.ts'
import type { ConsoleService } from '../console/index.ts'
import { canonicalBytes } from '../src/crypto/canonical-json.ts'
import type { LocalAccount, LocalNetwork } from '../src/dev/network.ts'
import { friend, putRecord } from '../src/dev/records.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { sha256HexOf } from '../src/protocol/input.ts'
import type { ProviderAgent } from '../src/provider/agent.ts'
import { OpenAIUpstreamEngine } from '../src/provider/engine.ts'
import { startAgent } from './fixture/agent.ts'
import { signInWithBrowser, startTestConsole } from './fixture/console.ts'
import { startFakeUpstream, toolScript, type FakeUpstream } from './fixture/fake-upstream.ts'
import { connectScripted, publishScriptedRecord, type ScriptedProvider } from './fixture/scripted-provider.ts'
import { startStack, type Stack } from './fixture/stack.ts'
import { waitFor } from './fixture/wait.ts'

/** A 1x1 PNG. */
const PNG = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==', 'base64')
const PNG_URL = `data:image/png;base64,${PNG.toString('base64')}`

const tools = [
  { type: 'function' as const, function: { name: 'search', description: 'Search the web', parameters: { type: 'object', properties: { query: { type: 'string' } }, required: ['query'] } } },
  { type: 'function' as const, function: { name: 'clock', description: 'The time now' } },
]

let stack: Stack
let net: LocalNetwork
let av: AppView
let svc: ConsoleService
let alice: LocalAccount
let market: LocalAccount
let key: string
let up: FakeUpstream
let toolsAgent: ProviderAgent
let tina: LocalAccount
let plain: ScriptedProvider
let plainHost: LocalAccount
let images: Server
let imagesUrl: string

const client = (base = '/v1', apiKey = key) => new OpenAI({ baseURL: `${svc.url}${base}`, apiKey, maxRetries: 0 })
const fail = (p: Promise<unknown>) => p.then(() => null, (e: unknown) => e as InstanceType<typeof OpenAI.APIError>)
const jobOf = async (uri: string) => (await alice.agent.com.atproto.repo.getRecord({ repo: alice.did, collection: ids.ComputeJob, rkey: uri.split('/').pop()! })).data.value as Record<string, unknown>
type Cocore = { cocore: { provider: string; job: string; receipt: string | null }; x_cocore: { credit: string; provider: { did: string; machineLabel: string | null }; receiptUri: string } }

beforeAll(async () => {
  const started = await startStack({
    accounts: ['alice.test', 'market.test', 'tina.test', 'pat.test'],
    // A heartbeat a second: the gateway re-reads provider records (an owner's toolCalls opt-in) that often.
    console: ([, market], av) => ({ index: av.consoleIndex(), exchangeDid: market.did, firstChunkTimeoutMs: 5000, pingIntervalMs: 1000 }),
  })
  stack = started
  ;({ net, av, svc, accounts: [alice, market, tina, plainHost] } = started)
  const page = await signInWithBrowser(stack.browser, svc.url, alice.handle, alice.password)
  await page.close()
  key = new ApiKeys(svc.db).create(alice.did, 'sdk', ['inference']).secret

  up = await startFakeUpstream(['tool-1'], toolScript)
  toolsAgent = await startAgent(net.pdsUrl, tina, { url: svc.url, did: market.did }, { engine: new OpenAIUpstreamEngine(up.url), models: ['tool-1'], label: 'tina-box' })
  // Its owner opts in to tool calling on the machine's record (an owner field the agent keeps).
  const rkey = toolsAgent.published.provider.uri.split('/').pop()!
  const record = (await tina.agent.com.atproto.repo.getRecord({ repo: tina.did, collection: ids.ComputeProvider, rkey })).data.value as Record<string, unknown>
  await putRecord(tina.agent, tina.did, { ...record, toolCalls: true }, rkey)

  const published = await publishScriptedRecord(plainHost, 'plain-1', { region: 'DE', machineLabel: 'pat-box' })
  await waitFor(() => av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(published.ref.uri), 'plain record indexed')
  plain = await connectScripted(svc.localUrl.replace('http', 'ws'), plainHost, market.did, published, { models: ['plain-1'], version: '0.3.0' })
  await waitFor(() => svc.gateway!.machinesOf(tina.did)[0]?.record.body.toolCalls === true, 'the tools opt-in read by the gateway', 20_000)

  images = createServer((req, res) => {
    if (req.url === '/cat.png') return res.writeHead(200, { 'content-type': 'image/png' }).end(PNG)
    if (req.url === '/page') return res.writeHead(200, { 'content-type': 'text/html' }).end('<html></html>')
    res.writeHead(404).end()
  })
  await new Promise<void>((resolve) => images.listen(0, '127.0.0.1', resolve))
  imagesUrl = `http://127.0.0.1:${(images.address() as AddressInfo).port}`
}, 120_000)

afterAll(async () => {
  plain?.close()
  await toolsAgent?.stop()
  await up?.close()
  images?.close()
  await stack?.close()
})

describe('tool calling', () => {
  const ask = [{ role: 'user' as const, content: 'weather in Oslo' }]

  it('puts the tools on the job record and the request, and answers the call as tool_calls (not streamed)', async () => {
    const res = await client().chat.completions.create({ model: 'tool-1', messages: ask, tools, tool_choice: 'auto' })
    const choice = res.choices[0]!
    expect(choice.finish_reason).toBe('tool_calls')
    expect(choice.message.content).toBeNull()
    expect(choice.message.tool_calls).toEqual([{ id: 'call_up_1', type: 'function', function: { name: 'search', arguments: JSON.stringify({ query: 'weather in Oslo' }) } }])
    expect((choice.message as unknown as { reasoning_content: string }).reasoning_content).toBe('I should look that up.')
    // The upstream got the tools and the choice as the requester sent them.
    const sent = up.bodies.at(-1)!
    expect(sent.tools).toEqual(tools)
    expect(sent.tool_choice).toBe('auto')
    // Public on the job record, as on the network; the prompt itself only as its commitment.
    const { cocore, x_cocore } = res as unknown as Cocore
    const job = await jobOf(cocore.job)
    expect(job).toMatchObject({ model: 'tool-1', inputFormat: 'messages-v1', tools, toolChoice: 'auto' })
    expect(JSON.stringify(job)).not.toContain('Oslo')
    // Who ran it: our block and the network's.
    expect(cocore.provider).toBe(tina.did)
    expect(x_cocore).toMatchObject({ provider: { did: tina.did, machineLabel: 'tina-box' }, receiptUri: cocore.receipt, credit: expect.stringContaining('tina-box') })
    // The receipt commits to the tools it was given.
    await waitFor(async () => {
      try {
        const receipt = await tina.agent.com.atproto.repo.getRecord({ repo: tina.did, collection: ids.ComputeReceipt, rkey: cocore.receipt!.split('/').pop()! })
        return (receipt.data.value as { params: { toolSchemaHash?: string } }).params.toolSchemaHash === sha256HexOf(canonicalBytes(tools))
      } catch {
        return false
      }
    }, 'the receipt with its toolSchemaHash')
  })

  it('streams the call as tool_calls deltas, which the SDK assembles', async () => {
    const stream = client().chat.completions.stream({ model: 'tool-1', messages: ask, tools, tool_choice: { type: 'function', function: { name: 'clock' } } })
    const deltas: unknown[] = []
    let last: Partial<Cocore> = {}
    stream.on('chunk', (c) => {
      if (c.choices[0]?.delta.tool_calls) deltas.push(...c.choices[0].delta.tool_calls)
      if ((c as unknown as Cocore).cocore) last = c as unknown as Cocore
    })
    const done = await stream.finalChatCompletion()
    expect(deltas.length).toBe(3)
    expect(done.choices[0]!.finish_reason).toBe('tool_calls')
    expect(done.choices[0]!.message.tool_calls).toEqual([{ id: 'call_up_1', type: 'function', function: { name: 'clock', arguments: JSON.stringify({ query: 'weather in Oslo' }) } }])
    // A named function: `required` plus the function on the record, OpenAI's object form upstream.
    expect(up.bodies.at(-1)!.tool_choice).toEqual({ type: 'function', function: { name: 'clock' } })
    // The final chunk says who ran it.
    expect(last.x_cocore).toMatchObject({ provider: { did: tina.did, machineLabel: 'tina-box' } })
    expect(await jobOf(last.cocore!.job)).toMatchObject({ toolChoice: 'required', toolChoiceFunction: 'clock' })
  })

  it('carries the tool result back (the tool role and the call, sealed in the prompt)', async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [
      ...ask,
      { role: 'assistant', content: null, tool_calls: [{ id: 'call_9', type: 'function', function: { name: 'search', arguments: '{"query":"Oslo"}' } }] },
      { role: 'tool', tool_call_id: 'call_9', content: 'rain, 7 degrees' },
    ]
    const res = await client().chat.completions.create({ model: 'tool-1', messages, tools })
    expect(res.choices[0]!.message.content).toBe('The tool said: rain, 7 degrees.')
    expect(res.choices[0]!.finish_reason).toBe('stop')
    expect(up.bodies.at(-1)!.messages).toEqual([
      { role: 'user', content: 'weather in Oslo' },
      { role: 'assistant', content: '', tool_calls: [{ id: 'call_9', type: 'function', function: { name: 'search', arguments: '{"query":"Oslo"}' } }] },
      { role: 'tool', content: 'rain, 7 degrees', tool_call_id: 'call_9' },
    ])
  })

  it('dev.cocore.inference.dispatch takes the same tools, and its chunk events name their channel', async () => {
    const post = (extra: Record<string, unknown>) =>
      fetch(`${svc.url}/xrpc/${ids.InferenceDispatch}`, {
        method: 'POST',
        headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'tool-1', prompt: 'weather in Oslo', maxTokensOut: 50, priceCeiling: { amount: 1000, currency: 'CC' }, ...extra }),
      })
    const text = await (await post({ tools, toolChoice: 'required', toolChoiceFunction: 'clock' })).text()
    const chunks = text.split('\n\n').filter((e) => e.startsWith('event: chunk')).map((e) => JSON.parse(e.split('\ndata: ')[1]!) as { channel: string; text: string })
    expect(chunks.map((c) => c.channel)).toEqual(['reasoning', 'tool_call', 'tool_call', 'tool_call'])
    expect(JSON.parse(chunks[1]!.text)).toEqual([{ index: 0, id: 'call_up_1', type: 'function', function: { name: 'clock', arguments: '' } }])
    const jobUri = (JSON.parse(text.split('\ndata: ')[1]!.split('\n')[0]!) as { jobUri: string }).jobUri
    expect(await jobOf(jobUri)).toMatchObject({ tools, toolChoice: 'required', toolChoiceFunction: 'clock' })
    const float = await post({ outputSchema: { name: 'x', schema: { type: 'number', maximum: 1.5 } } })
    expect(float.status).toBe(400)
    expect(await float.json()).toMatchObject({ error: 'InvalidRequest', message: expect.stringMatching(/outputSchema: it holds the number 1.5/) })
  })

  it('refuses tools no machine serves, and malformed tool fields', async () => {
    expect(await fail(client().chat.completions.create({ model: 'plain-1', messages: ask, tools }))).toMatchObject({ status: 400, code: 'tool_calls_not_supported', param: 'tools', message: expect.stringContaining('tool-1') })
    const bad = (extra: Record<string, unknown>) => fail(client().chat.completions.create({ model: 'tool-1', messages: ask, ...extra } as never))
    expect(await bad({ tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'number', maximum: 0.5 } } }] })).toMatchObject({ status: 400, param: 'tools[0].function.parameters' })
    expect(await bad({ tools, tool_choice: { type: 'function', function: { name: 'nope' } } })).toMatchObject({ status: 400, param: 'tool_choice' })
    expect(await bad({ tool_choice: 'required' })).toMatchObject({ status: 400, param: 'tool_choice' })
    expect(await bad({ messages: [{ role: 'tool', content: 'x' }] })).toMatchObject({ status: 400, param: 'messages[0].tool_call_id' })
    expect(await bad({ messages: [{ role: 'user', content: 'x', tool_calls: [] }] })).toMatchObject({ status: 400, param: 'messages[0].tool_calls' })
  })
})

describe('images', () => {
  const look = (url: string, role: 'user' | 'system' = 'user') => [{ role, content: [{ type: 'text', text: 'what is this?' }, { type: 'image_url', image_url: { url } }] }] as OpenAI.ChatCompletionMessageParam[]

  it('seals a data: URL image inline, and the machine hands it to its model as it came', async () => {
    const res = await client().chat.completions.create({ model: 'tool-1', messages: look(PNG_URL) })
    expect(res.choices[0]!.message.content).toBe('I see 1 image(s).')
    expect(up.bodies.at(-1)!.messages).toEqual([{ role: 'user', content: [{ type: 'text', text: 'what is this?' }, { type: 'image_url', image_url: { url: PNG_URL } }] }])
  })

  it('fetches an http(s) image URL into the prompt (the machine fetches nothing), and refuses one that is no image', async () => {
    const res = await client().chat.completions.create({ model: 'tool-1', messages: look(`${imagesUrl}/cat.png`) })
    expect(res.choices[0]!.message.content).toBe('I see 1 image(s).')
    expect((up.bodies.at(-1)!.messages as { content: unknown[] }[])[0]!.content[1]).toEqual({ type: 'image_url', image_url: { url: PNG_URL } })
    for (const path of ['/missing.png', '/page']) {
      expect(await fail(client().chat.completions.create({ model: 'tool-1', messages: look(`${imagesUrl}${path}`) }))).toMatchObject({ status: 400, code: 'invalid_image_url', param: 'messages[0].content[1]' })
    }
  })

  it('refuses what it cannot carry rather than dropping it', async () => {
    expect(await fail(client().chat.completions.create({ model: 'tool-1', messages: look(PNG_URL, 'system') }))).toMatchObject({ status: 400, code: 'unsupported_content_part' })
    const audio = [{ role: 'user', content: [{ type: 'input_audio', input_audio: { data: 'AA==', format: 'wav' } }] }] as OpenAI.ChatCompletionMessageParam[]
    expect(await fail(client().chat.completions.create({ model: 'tool-1', messages: audio }))).toMatchObject({ status: 400, code: 'unsupported_content_part', param: 'messages[0].content[0]' })
    expect(await fail(client().chat.completions.create({ model: 'tool-1', messages: look('data:text/plain;base64,aGk=') }))).toMatchObject({ status: 400, code: 'invalid_image_url' })
  })
})

describe('structured output', () => {
  const schema = { type: 'object', properties: { answer: { type: 'string' } }, required: ['answer'], additionalProperties: false }

  it('response_format json_schema is the job outputSchema, and json_object a schema of any object', async () => {
    const res = await client().chat.completions.create({ model: 'tool-1', messages: [{ role: 'user', content: 'Oslo' }], response_format: { type: 'json_schema', json_schema: { name: 'answer', strict: true, schema } } })
    expect(JSON.parse(res.choices[0]!.message.content!)).toEqual({ answer: 'Oslo' })
    const outputSchema = { name: 'answer', strict: true, schema }
    expect(up.bodies.at(-1)!.response_format).toEqual({ type: 'json_schema', json_schema: outputSchema })
    expect(await jobOf((res as unknown as Cocore).cocore.job)).toMatchObject({ outputSchema })

    const obj = await client().chat.completions.create({ model: 'tool-1', messages: [{ role: 'user', content: 'Bergen' }], response_format: { type: 'json_object' } })
    expect(await jobOf((obj as unknown as Cocore).cocore.job)).toMatchObject({ outputSchema: { name: 'json_object', schema: { type: 'object' } } })
  })

  it('refuses a schema no record can hold (a float), and an unknown format', async () => {
    const bad = (response_format: unknown) => fail(client().chat.completions.create({ model: 'tool-1', messages: [{ role: 'user', content: 'x' }], response_format } as never))
    expect(await bad({ type: 'json_schema', json_schema: { name: 'a', schema: { type: 'number', multipleOf: 0.1 } } })).toMatchObject({ status: 400, param: 'response_format.json_schema.schema' })
    expect(await bad({ type: 'json_schema', json_schema: { schema } })).toMatchObject({ status: 400, param: 'response_format.json_schema.name' })
    expect(await bad({ type: 'yaml' })).toMatchObject({ status: 400, param: 'response_format.type' })
  })
})

describe('request fields as the network reads them', () => {
  it('joins text parts with newlines, ignores n, and takes a version with a leading v', async () => {
    const res = await client().chat.completions.create({ model: 'plain-1', n: 3, min_provider_version: 'v0.3', messages: [{ role: 'user', content: [{ type: 'text', text: 'first' }, { type: 'text', text: 'second' }] }] } as never)
    expect(res.choices).toHaveLength(1)
    expect(plain.opened.get(plain.requests.at(-1)!.session_id)).toEqual([{ role: 'user', content: 'first\nsecond' }])
    expect(await fail(client().chat.completions.create({ model: 'plain-1', n: 'two', messages: [{ role: 'user', content: 'x' }] } as never))).toMatchObject({ status: 400, param: 'n' })
  })

  it('reads min_trust on the verified tier', async () => {
    const verified = (min_trust: string) => fail(client('/v1/verified').chat.completions.create({ model: 'plain-1', messages: [{ role: 'user', content: 'x' }], min_trust } as never))
    expect(await verified('root')).toMatchObject({ status: 400, code: 'invalid_min_trust', param: 'min_trust' })
    expect(await verified('confidential')).toMatchObject({ status: 503, code: 'verified_tier_unavailable' })
  })
})

describe('model listings', () => {
  it('GET /v1/models is public: the OpenAI list, the directory and the summary', async () => {
    const list = (await (await fetch(`${svc.url}/v1/models`)).json()) as { object: string; data: { id: string; object: string; owned_by: string }[] }
    expect(list.object).toBe('list')
    expect(list.data.map((m) => m.id).sort()).toEqual(['plain-1', 'tool-1'])
    expect(list.data[0]).toMatchObject({ object: 'model', owned_by: 'cocore' })
    // The SDK reads the same list, keyless.
    expect((await client('/v1', 'none').models.list()).data.map((m) => m.id).sort()).toEqual(['plain-1', 'tool-1'])

    type Directory = { models: Record<string, unknown>[]; generatedAt: string; appviewUnreachable: boolean }
    const directory = async () => (await (await fetch(`${svc.url}/v1/models?view=directory`)).json()) as Directory
    // The jobs above are counted once their receipts are indexed.
    const month = (d: Directory) => (d.models.find((m) => m.modelId === 'tool-1')?.activity as { month: { requests: number } } | undefined)?.month.requests ?? 0
    await waitFor(async () => month(await directory()) > 0, 'tool-1 activity indexed')
    const dir = await directory()
    expect(dir.appviewUnreachable).toBe(false)
    const tool1 = dir.models.find((m) => m.modelId === 'tool-1')!
    expect(tool1).toMatchObject({ machineCount: 1, tools: true, recommended: false, vision: false, currency: 'CC', activity: { hour: { requests: expect.any(Number) } } })
    expect((tool1.machines as unknown[])[0]).toMatchObject({ did: tina.did, machineLabel: 'tina-box', verifiedTier: 'best-effort', confidential: false })
    expect(dir.models.find((m) => m.modelId === 'plain-1')).toMatchObject({ tools: false, machines: [{ did: plainHost.did, region: 'DE', machineLabel: 'pat-box' }] })

    const summary = (await (await fetch(`${svc.url}/v1/models?view=summary`)).json()) as { models: Record<string, unknown>[] }
    expect(Object.keys(summary.models[0]!).sort()).toEqual(['currency', 'inputPricePerMTok', 'machineCount', 'modelId', 'outputPricePerMTok', 'recommended'])
  })

  it('GET /v1/recommended-models lists models for new hosts', async () => {
    const res = await fetch(`${svc.url}/v1/recommended-models`)
    expect(res.status).toBe(200)
    const models = (await res.json()) as { id: string; minRamGb: number; blurb: string }[]
    expect(models.length).toBeGreaterThan(3)
    for (const m of models) expect(m).toEqual({ id: expect.any(String), minRamGb: expect.any(Number), blurb: expect.any(String) })
  })
})

describe('the /api/v1 mount', () => {
  it('serves the same completions and models; other paths are OpenAI 404s', async () => {
    const res = await client('/api/v1').chat.completions.create({ model: 'plain-1', messages: [{ role: 'user', content: 'via api' }] })
    expect(res.choices[0]!.message.content).toBe('Echo: via api.')
    const stream = await client('/api/v1').chat.completions.create({ model: 'plain-1', messages: [{ role: 'user', content: 'streamed' }], stream: true })
    let text = ''
    for await (const c of stream) text += c.choices[0]?.delta.content ?? ''
    expect(text).toBe('Echo: streamed.')
    expect((await (await fetch(`${svc.url}/api/v1/models`)).json()) as unknown).toEqual((await (await fetch(`${svc.url}/v1/models`)).json()) as unknown)
    expect(await fail(client('/api/v1/probono').chat.completions.create({ model: 'plain-1', messages: [{ role: 'user', content: 'x' }] }))).toMatchObject({ status: 503, code: 'no_pro_bono_providers' })
    const none = await fetch(`${svc.url}/api/v1/embeddings`, { method: 'POST', headers: { authorization: `Bearer ${key}` } })
    expect(none.status).toBe(404)
    expect(await none.json()).toMatchObject({ error: { code: 'unknown_endpoint', type: 'not_found_error' } })
  })
})

describe('a service-auth JWT as the bearer', () => {
  const mint = async (lxm: string = ids.InferenceDispatch) => (await alice.agent.com.atproto.server.getServiceAuth({ aud: market.did, lxm })).data.token

  it('runs a completion for the account whose PDS minted it, for dev.cocore.inference.dispatch only, once', async () => {
    const token = await mint()
    const res = await client('/v1', token).chat.completions.create({ model: 'plain-1', messages: [{ role: 'user', content: 'as alice' }] })
    expect(res.choices[0]!.message.content).toBe('Echo: as alice.')
    expect(plain.requests.at(-1)!.requester_did).toBe(alice.did)
    // Each token is taken once: a captured one cannot be replayed.
    expect(await fail(client('/v1', token).chat.completions.create({ model: 'plain-1', messages: [{ role: 'user', content: 'again' }] }))).toMatchObject({ status: 401, code: 'JwtReplayed' })
    expect(await fail(client('/v1', await mint(ids.AccountListApiKeys)).chat.completions.create({ model: 'plain-1', messages: [{ role: 'user', content: 'x' }] }))).toMatchObject({ status: 401, type: 'authentication_error', code: 'BadJwtLexiconMethod' })
    const other = (await alice.agent.com.atproto.server.getServiceAuth({ aud: alice.did, lxm: ids.InferenceDispatch })).data.token
    expect(await fail(client('/v1', other).chat.completions.create({ model: 'plain-1', messages: [{ role: 'user', content: 'x' }] }))).toMatchObject({ status: 401, code: 'BadJwtAudience' })
  })
})

describe("the network's error codes", () => {
  const ask = (base: string, model: string, extra: Record<string, unknown> = {}) => fail(client(base).chat.completions.create({ model, messages: [{ role: 'user', content: 'x' }], ...extra } as never))

  it('model_not_found, 503s for country and version, no_friends_available then no_friends_for_model', async () => {
    expect(await ask('/v1', 'gpt-9')).toMatchObject({ status: 404, code: 'model_not_found', type: 'invalid_request_error' })
    expect(await ask('/v1', 'plain-1', { country: 'fr' })).toMatchObject({ status: 503, code: 'no_providers_for_country', type: 'service_unavailable_error' })
    expect(await ask('/v1', 'plain-1', { min_provider_version: '9.0' })).toMatchObject({ status: 503, code: 'no_providers_for_version' })
    // Nobody lists Alice as a friend yet.
    expect(await ask('/v1/private', 'plain-1')).toMatchObject({ status: 503, code: 'no_friends_available' })
    const f = await putRecord(plainHost.agent, plainHost.did, friend(alice.did))
    await waitFor(() => av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(f.uri), 'friend record indexed')
    expect((await client('/v1/private').chat.completions.create({ model: 'plain-1', messages: [{ role: 'user', content: 'friend' }] })).choices[0]!.message.content).toBe('Echo: friend.')
    // A friend serves plain-1, not tool-1.
    expect(await ask('/v1/private', 'tool-1')).toMatchObject({ status: 404, code: 'no_friends_for_model' })
  })

  it('no_providers_connected on an exchange nobody serves', async () => {
    const empty = await startTestConsole(net, av.url, { index: av.consoleIndex(), exchangeDid: market.did })
    try {
      const k = new ApiKeys(empty.db).create(alice.did, 'empty', ['inference']).secret
      // No console session on this console: admission refuses first; with one, the model is what is missing.
      const page = await signInWithBrowser(stack.browser, empty.url, alice.handle, alice.password)
      await page.close()
      const c = new OpenAI({ baseURL: `${empty.url}/v1`, apiKey: k, maxRetries: 0 })
      expect(await fail(c.chat.completions.create({ model: 'plain-1', messages: [{ role: 'user', content: 'x' }] }))).toMatchObject({ status: 503, code: 'no_providers_connected' })
    } finally {
      await empty.close()
    }
  })
})
