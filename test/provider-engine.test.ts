/**
 * The provider's engines: the deterministic builtin engine, the engine served
 * as an OpenAI-compatible API (checked with fetch and with the official
 * `openai` client), and the upstream engine reading that API back.
 */
import OpenAI from 'openai'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { BuiltinEngine, chatCompletionsUrl, drain, EngineError, OpenAIUpstreamEngine, unsupported, type Completion, type Engine, type GenerateRequest, type PieceChannel } from '../src/provider/engine.ts'
import { startEngineServer, type EngineServer } from '../src/provider/engine-server.ts'
import type { InputMessage } from '../src/protocol/input.ts'
import { startFakeUpstream, toolScript, type FakeUpstream } from './fixture/fake-upstream.ts'

const MODEL = 'builtin-test'
const messages = [
  { role: 'system', content: 'Be brief.' },
  { role: 'user', content: 'What is the tallest mountain in the Alps?' },
]
const req = (extra: Partial<GenerateRequest> = {}): GenerateRequest => ({ model: MODEL, messages, maxTokens: 1000, params: {}, signal: new AbortController().signal, ...extra })

async function collect(engine: Engine, r: GenerateRequest): Promise<{ pieces: string[]; text: string; done: Completion }> {
  const pieces: string[] = []
  const done = await drain(engine.generate(r), (p) => pieces.push(p))
  return { pieces, text: pieces.join(''), done }
}

describe('BuiltinEngine', () => {
  const engine = new BuiltinEngine()

  it('is deterministic: the same input gives the same text; another seed or message another', async () => {
    const a = await collect(engine, req({ params: { seed: 7, temperature: 0.7 } }))
    const b = await collect(engine, req({ params: { seed: 7, temperature: 0.7 } }))
    expect(b).toEqual(a)
    expect(a.text.startsWith('You said: What is the tallest mountain in the Alps? ')).toBe(true)
    expect(a.done.finishReason).toBe('stop')
    // One piece per word, words carry their trailing space.
    expect(a.done.tokensOut).toBe(a.pieces.length)
    expect(a.pieces.length).toBeGreaterThanOrEqual(20 + 10)
    expect(a.pieces.length).toBeLessThanOrEqual(40 + 10)
    expect(a.done.tokensIn).toBe(2 + 8)
    expect((await collect(engine, req({ params: { seed: 8, temperature: 0.7 } }))).text).not.toBe(a.text)
    expect((await collect(engine, req({ messages: [{ role: 'user', content: 'Something else' }] }))).text).not.toBe(a.text)
  })

  it('cuts at max tokens with finish reason length', async () => {
    const full = await collect(engine, req())
    const cut = await collect(engine, req({ maxTokens: 5 }))
    expect(cut.done).toMatchObject({ tokensOut: 5, finishReason: 'length' })
    expect(full.text.startsWith(cut.text)).toBe(true)
    // Exactly the natural length is a natural stop.
    expect((await collect(engine, req({ maxTokens: full.pieces.length }))).done.finishReason).toBe('stop')
  })

  it('cuts at the first stop sequence, which is left out', async () => {
    const full = await collect(engine, req())
    // Two generated words: a sequence that does not turn up earlier by chance.
    const word = full.pieces[14]! + full.pieces[15]!.trim()
    const at = full.text.indexOf(word)
    expect(at).toBeGreaterThan(20)
    const cut = await collect(engine, req({ params: { stop: ['no such sequence', word] } }))
    expect(cut.text).toBe(full.text.slice(0, at))
    expect(cut.done.finishReason).toBe('stop')
    // A stop sequence inside a piece splits it.
    const mid = await collect(engine, req({ params: { stop: ['tallest'] } }))
    expect(mid.text).toBe('You said: What is the ')
    // Max tokens before the stop sequence still wins.
    expect((await collect(engine, req({ maxTokens: 3, params: { stop: [word] } }))).done.finishReason).toBe('length')
  })

  it('stops promptly when aborted', async () => {
    const slow = new BuiltinEngine({ delayMs: 50 })
    const ac = new AbortController()
    const pieces: string[] = []
    const run = drain(slow.generate(req({ signal: ac.signal })), (p) => pieces.push(p))
    setTimeout(() => ac.abort(), 180)
    const t0 = Date.now()
    await expect(run).rejects.toThrow()
    expect(Date.now() - t0).toBeLessThan(400)
    expect(pieces.length).toBeGreaterThan(0)
    expect(pieces.length).toBeLessThan(10)
  })
})

describe('engine server (OpenAI-compatible)', () => {
  let srv: EngineServer
  let slowSrv: EngineServer
  const direct = new BuiltinEngine()
  /** An engine that reports whether its generation was aborted (the server must abort it when the client leaves). */
  let lastSignal: AbortSignal | null = null
  const watched: Engine = {
    generate: (r) => {
      lastSignal = r.signal
      return new BuiltinEngine({ delayMs: 40 }).generate(r)
    },
  }

  beforeAll(async () => {
    srv = await startEngineServer({ engine: direct, models: [MODEL, 'other'] })
    slowSrv = await startEngineServer({ engine: watched, models: [MODEL] })
  })
  afterAll(async () => {
    await srv?.close()
    await slowSrv?.close()
  })

  const post = (body: unknown, url = srv.url) => fetch(`${url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })

  it('streams server-sent events: role, content deltas, finish reason, usage, [DONE]', async () => {
    const expected = await collect(direct, req({ maxTokens: 12, params: { seed: 3 } }))
    const res = await post({ model: MODEL, messages, stream: true, stream_options: { include_usage: true }, max_tokens: 12, seed: 3 })
    expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/)
    const events = (await res.text()).split('\n\n').filter(Boolean)
    expect(events.at(-1)).toBe('data: [DONE]')
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e.replace(/^data: /, '')))
    expect(chunks[0].choices[0].delta.role).toBe('assistant')
    expect(chunks.every((c) => c.object === 'chat.completion.chunk' && c.id === chunks[0].id && c.model === MODEL)).toBe(true)
    expect(chunks.map((c) => c.choices[0]?.delta.content ?? '').join('')).toBe(expected.text)
    expect(chunks.at(-2).choices[0].finish_reason).toBe('length')
    expect(chunks.at(-1)).toMatchObject({ choices: [], usage: { prompt_tokens: expected.done.tokensIn, completion_tokens: 12, total_tokens: expected.done.tokensIn + 12 } })
  })

  it('answers without streaming, lists its models, and refuses bad requests the OpenAI way', async () => {
    const expected = await collect(direct, req())
    const body = (await (await post({ model: MODEL, messages })).json()) as { usage: unknown }
    expect(body).toMatchObject({ object: 'chat.completion', model: MODEL, choices: [{ index: 0, message: { role: 'assistant', content: expected.text }, finish_reason: 'stop' }] })
    expect(body.usage).toEqual({ prompt_tokens: expected.done.tokensIn, completion_tokens: expected.done.tokensOut, total_tokens: expected.done.tokensIn + expected.done.tokensOut })
    const models = (await (await fetch(`${srv.url}/v1/models`)).json()) as { data: { id: string }[] }
    expect(models.data.map((m) => m.id)).toEqual([MODEL, 'other'])

    const unknown = await post({ model: 'gpt-9', messages })
    expect(unknown.status).toBe(404)
    expect(((await unknown.json()) as { error: unknown }).error).toMatchObject({ code: 'model_not_found', type: 'invalid_request_error' })
    expect((await post({ model: MODEL, messages: [] })).status).toBe(400)
    expect((await post({ model: MODEL, messages, max_tokens: -1 })).status).toBe(400)
    const notJson = await fetch(`${srv.url}/v1/chat/completions`, { method: 'POST', body: '{oops' })
    expect(notJson.status).toBe(400)
    expect((await fetch(`${srv.url}/v1/nothing`)).status).toBe(404)
  })

  it('works with the official openai client, streamed and not', async () => {
    const client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'x' })
    const expected = await collect(direct, req({ params: { seed: 11, temperature: 0.5 } }))
    const done = await client.chat.completions.create({ model: MODEL, messages: messages as OpenAI.ChatCompletionMessageParam[], seed: 11, temperature: 0.5 })
    expect(done.choices[0]!.message.content).toBe(expected.text)
    expect(done.usage?.completion_tokens).toBe(expected.done.tokensOut)

    const stream = await client.chat.completions.create({ model: MODEL, messages: messages as OpenAI.ChatCompletionMessageParam[], seed: 11, temperature: 0.5, stream: true, stream_options: { include_usage: true } })
    let text = ''
    let finish: string | null = null
    let usage: OpenAI.CompletionUsage | undefined | null
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta.content ?? ''
      finish = chunk.choices[0]?.finish_reason ?? finish
      usage = chunk.usage ?? usage
    }
    expect(text).toBe(expected.text)
    expect(finish).toBe('stop')
    expect(usage?.prompt_tokens).toBe(expected.done.tokensIn)
    expect((await client.models.list()).data.map((m) => m.id)).toContain(MODEL)
    await expect(client.chat.completions.create({ model: 'gpt-9', messages: [{ role: 'user', content: 'hi' }] })).rejects.toMatchObject({ status: 404 })
  })

  it('aborts the generation when the client goes away', async () => {
    const res = await post({ model: MODEL, messages, stream: true }, slowSrv.url)
    const reader = res.body!.getReader()
    await reader.read()
    await reader.cancel()
    await expect.poll(() => lastSignal?.aborted, { timeout: 2000 }).toBe(true)
  })
})

describe('OpenAIUpstreamEngine', () => {
  let srv: EngineServer
  const direct = new BuiltinEngine()

  beforeAll(async () => {
    srv = await startEngineServer({ engine: new BuiltinEngine({ delayMs: 0 }), models: [MODEL] })
  })
  afterAll(async () => {
    await srv?.close()
  })

  it('takes its endpoint with or without /v1', () => {
    expect(chatCompletionsUrl('http://h:11434')).toBe('http://h:11434/v1/chat/completions')
    expect(chatCompletionsUrl('http://h:8000/v1/')).toBe('http://h:8000/v1/chat/completions')
    expect(chatCompletionsUrl('http://h/v1/chat/completions')).toBe('http://h/v1/chat/completions')
  })

  it('yields what the builtin engine yields directly, with its counts and finish reason', async () => {
    const upstream = new OpenAIUpstreamEngine(srv.url, 'secret-key')
    for (const r of [req(), req({ maxTokens: 7, params: { seed: 5, temperature: 0.25, top_p: 0.9 } }), req({ params: { stop: ['tallest'] } })]) {
      const a = await collect(direct, r)
      const b = await collect(upstream, r)
      expect(b.pieces).toEqual(a.pieces)
      expect(b.done).toEqual(a.done)
    }
  })

  it('reports upstream refusals as engine errors and stops when aborted', async () => {
    await expect(collect(new OpenAIUpstreamEngine(srv.url), req({ model: 'gpt-9' }))).rejects.toThrow(EngineError)
    await expect(collect(new OpenAIUpstreamEngine('http://127.0.0.1:1'), req())).rejects.toThrow()

    const slow = await startEngineServer({ engine: new BuiltinEngine({ delayMs: 50 }), models: [MODEL] })
    try {
      const ac = new AbortController()
      const pieces: string[] = []
      const run = drain(new OpenAIUpstreamEngine(slow.url).generate(req({ signal: ac.signal })), (p) => pieces.push(p))
      setTimeout(() => ac.abort(), 200)
      const t0 = Date.now()
      await expect(run).rejects.toThrow()
      expect(Date.now() - t0).toBeLessThan(400)
      expect(pieces.length).toBeLessThan(10)
    } finally {
      await slow.close()
    }
  })
})

describe('OpenAIUpstreamEngine: tools, images and structured output passed through', () => {
  let up: FakeUpstream
  const engine = () => new OpenAIUpstreamEngine(up.url)
  const tools = [{ type: 'function', function: { name: 'search', description: 'Search the web', parameters: { type: 'object', properties: { query: { type: 'string' } } } } }, { type: 'function', function: { name: 'clock' } }]
  const channels = async (r: GenerateRequest) => {
    const out: [PieceChannel, string][] = []
    const done = await drain(engine().generate(r), (text, channel) => out.push([channel, text]))
    return { out, done }
  }

  beforeAll(async () => {
    up = await startFakeUpstream([MODEL], toolScript)
  })
  afterAll(async () => {
    await up?.close()
  })

  it("sends the job's tools and tool choice, and yields reasoning and tool-call fragments on their channels", async () => {
    const { out, done } = await channels(req({ constraints: { tools, toolChoice: 'required', toolChoiceFunction: 'clock' } }))
    const body = up.bodies.at(-1)!
    expect(body.tools).toEqual(tools)
    // A named function goes upstream in OpenAI's object form.
    expect(body.tool_choice).toEqual({ type: 'function', function: { name: 'clock' } })
    expect(body.response_format).toBeUndefined()
    expect(out[0]).toEqual(['reasoning', 'I should look that up.'])
    const calls = out.filter(([c]) => c === 'tool_call').map(([, t]) => JSON.parse(t))
    expect(calls[0]).toEqual([{ index: 0, id: 'call_up_1', type: 'function', function: { name: 'clock', arguments: '' } }])
    expect(calls.slice(1).map((d) => d[0].function.arguments).join('')).toBe(JSON.stringify({ query: messages[1]!.content }))
    expect(out.some(([c]) => c === 'content')).toBe(false)
    // finish_reason tool_calls is a stop as far as the job goes: the tool-call channel tells the rest.
    expect(done).toEqual({ tokensIn: 12, tokensOut: 9, finishReason: 'stop' })
  })

  it('sends images as image_url data URLs, and tool calls and results in the messages as they were', async () => {
    const conversation: InputMessage[] = [
      { role: 'user', content: [{ type: 'text', text: 'what is this?' }, { type: 'image', mime: 'image/png', data: 'iVBORw0KGgo=' }] },
      { role: 'assistant', content: '', tool_calls: [{ id: 'c1', type: 'function', function: { name: 'search', arguments: '{"query":"png"}' } }] },
      { role: 'tool', content: 'a PNG header', tool_call_id: 'c1' },
    ]
    const { out } = await channels(req({ messages: conversation, constraints: { tools } }))
    expect(up.bodies.at(-1)!.messages).toEqual([
      { role: 'user', content: [{ type: 'text', text: 'what is this?' }, { type: 'image_url', image_url: { url: 'data:image/png;base64,iVBORw0KGgo=' } }] },
      { role: 'assistant', content: '', tool_calls: [{ id: 'c1', type: 'function', function: { name: 'search', arguments: '{"query":"png"}' } }] },
      { role: 'tool', content: 'a PNG header', tool_call_id: 'c1' },
    ])
    expect(out.map(([, t]) => t).join('')).toBe('The tool said: a PNG header.')
  })

  it("sends the output schema as response_format json_schema", async () => {
    const outputSchema = { name: 'answer', strict: true, schema: { type: 'object', properties: { answer: { type: 'string' } }, required: ['answer'] } }
    const { out } = await channels(req({ constraints: { outputSchema } }))
    expect(up.bodies.at(-1)!.response_format).toEqual({ type: 'json_schema', json_schema: outputSchema })
    expect(JSON.parse(out.map(([, t]) => t).join(''))).toEqual({ answer: messages[1]!.content })
  })

  it('says what an engine cannot honour, so the job is refused rather than served without it', () => {
    const image: InputMessage = { role: 'user', content: [{ type: 'image', mime: 'image/png', data: 'AA==' }] }
    const builtin = new BuiltinEngine()
    expect(unsupported(builtin, { messages })).toBeNull()
    expect(unsupported(builtin, { messages, constraints: { tools } })).toMatch(/tool calls/)
    expect(unsupported(builtin, { messages, constraints: { outputSchema: { name: 'x', schema: {} } } })).toMatch(/structured output/)
    expect(unsupported(builtin, { messages: [image] })).toMatch(/images/)
    expect(unsupported(builtin, { messages: [{ role: 'tool', content: 'x', tool_call_id: 'c' }] })).toMatch(/tool calls/)
    expect(unsupported(engine(), { messages: [image], constraints: { tools, outputSchema: { name: 'x', schema: {} } } })).toBeNull()
    expect(unsupported(new OpenAIUpstreamEngine(up.url, undefined, { images: false }), { messages: [image] })).toMatch(/images/)
  })
})
