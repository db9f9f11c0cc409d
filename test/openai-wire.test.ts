/**
 * The OpenAI-compatible API's request and reply shapes, without a network:
 * how a chat request becomes the sealed messages and the job's public
 * constraints (console/exchange/openai-request.ts), and how tool-call chunks
 * become OpenAI tool_calls (console/exchange/openai-reply.ts).
 *
 *   npx vitest run test/openai-wire.test.ts
 */
import { describe, expect, it } from 'vitest'
import { OpenAiError } from '../console/exchange/openai-error.ts'
import { toolCallDeltas, ToolCallAssembler, xCocore } from '../console/exchange/openai-reply.ts'
import { fetchImages, parseChatRequest } from '../console/exchange/openai-request.ts'

const parse = (extra: Record<string, unknown>, tier?: 'private' | 'verified' | 'probono') => parseChatRequest({ model: 'm', messages: [{ role: 'user', content: 'hi' }], ...extra }, tier)
const refusal = (extra: Record<string, unknown>) => {
  try {
    parse(extra)
  } catch (err) {
    if (err instanceof OpenAiError) return { status: err.status, code: err.code, param: err.param }
    throw err
  }
  throw new Error('accepted')
}

describe('chat request', () => {
  it('joins text parts with newlines, keeps parts in order with images, and gives a tools-only assistant turn empty content', () => {
    const req = parse({
      messages: [
        { role: 'user', content: [{ type: 'text', text: 'a' }, { type: 'text', text: 'b' }] },
        { role: 'user', content: [{ type: 'text', text: 'see' }, { type: 'image_url', image_url: { url: 'data:image/webp;base64,UklGRg==', detail: 'low' } }] },
        { role: 'assistant', content: null, tool_calls: [{ id: 'c', type: 'function', function: { name: 'f', arguments: '{}' } }] },
        { role: 'tool', tool_call_id: 'c', content: [{ type: 'text', text: 'done' }] },
      ],
    })
    expect(req.messages).toEqual([
      { role: 'user', content: 'a\nb' },
      { role: 'user', content: [{ type: 'text', text: 'see' }, { type: 'image', mime: 'image/webp', data: 'UklGRg==' }] },
      { role: 'assistant', content: '', tool_calls: [{ id: 'c', type: 'function', function: { name: 'f', arguments: '{}' } }] },
      { role: 'tool', content: 'done', tool_call_id: 'c' },
    ])
    expect(req.remoteImages).toEqual([])
  })

  it('reads the fields as the network does: n ignored, a leading v, country trimmed, min_trust on the verified tier only', () => {
    expect(parse({ n: 4 })).not.toHaveProperty('n')
    expect(parse({ min_provider_version: ' v1.2.3 ' }).minProviderVersion).toBe('1.2.3')
    expect(parse({ country: ' de ' }).country).toBe('DE')
    expect(parse({ min_trust: 'anything' }).minTrust).toBeUndefined()
    expect(parse({ min_trust: 'confidential' }, 'verified').minTrust).toBe('confidential')
    expect(() => parse({ min_trust: 'anything' }, 'verified')).toThrow(/min_trust/)
  })

  it('makes the job constraints: tools, a named function, json_schema and json_object; nothing for text or no tools', () => {
    const tool = { type: 'function', function: { name: 'f', description: 'does f', parameters: { type: 'object' }, strict: true } }
    expect(parse({ tools: [tool], tool_choice: { type: 'function', function: { name: 'f' } } }).constraints).toEqual({
      tools: [{ type: 'function', function: { name: 'f', description: 'does f', parameters: { type: 'object' } } }],
      toolChoice: 'required',
      toolChoiceFunction: 'f',
    })
    expect(parse({ response_format: { type: 'json_schema', json_schema: { name: 'n', strict: true, schema: { type: 'object' } } } }).constraints).toEqual({ outputSchema: { name: 'n', strict: true, schema: { type: 'object' } } })
    expect(parse({ response_format: { type: 'json_object' } }).constraints).toEqual({ outputSchema: { name: 'json_object', schema: { type: 'object' } } })
    expect(parse({ response_format: { type: 'text' }, tools: [], tool_choice: 'auto' }).constraints).toBeUndefined()
  })

  it('refuses what a record cannot hold or the exchange cannot honour, naming the field', () => {
    const deep = JSON.parse('{"a":'.repeat(60) + '1' + '}'.repeat(60)) as unknown
    expect(refusal({ response_format: { type: 'json_schema', json_schema: { name: 'n', schema: deep } } })).toMatchObject({ status: 400, param: 'response_format.json_schema.schema' })
    expect(refusal({ tools: [{ type: 'function', function: { name: 'f', parameters: { 'größe': { type: 'string' } } } }] })).toMatchObject({ param: 'tools[0].function.parameters' })
    expect(refusal({ tools: [{ type: 'function', function: { name: 'f', parameters: { $link: 'bafy' } } }] })).toMatchObject({ param: 'tools[0].function.parameters' })
    expect(refusal({ tools: [{ type: 'function', function: { name: 'f', parameters: { enum: ['x'.repeat(300 * 1024)] } } }] })).toMatchObject({ param: 'tools' })
    expect(refusal({ tools: Array.from({ length: 129 }, () => ({ type: 'function', function: { name: 'f' } })) })).toMatchObject({ param: 'tools' })
    expect(refusal({ tools: [{ type: 'function', function: { name: 'x'.repeat(257) } }] })).toMatchObject({ param: 'tools[0].function.name' })
    expect(refusal({ logprobs: true })).toMatchObject({ code: 'unsupported_parameter' })
    expect(refusal({ messages: [{ role: 'system', content: [{ type: 'image_url', image_url: { url: 'data:image/png;base64,AA==' } }] }] })).toMatchObject({ code: 'unsupported_content_part', param: 'messages[0].content[0]' })
    expect(refusal({ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'data:image/png;base64,A' } }] }] })).toMatchObject({ code: 'invalid_image_url' })
    expect(refusal({ messages: [{ role: 'user', content: null }] })).toMatchObject({ param: 'messages[0].content' })
    expect(refusal({ messages: [{ role: 'user', content: 'x', tool_call_id: 'c' }] })).toMatchObject({ param: 'messages[0].tool_call_id' })
  })

  it('fetches image URLs into their parts, within the budget, and only with a fetcher', async () => {
    const req = parse({ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'https://img.example/a.png' } }] }] })
    const signal = new AbortController().signal
    await expect(fetchImages(req, undefined, signal)).rejects.toMatchObject({ code: 'invalid_image_url' })
    const png = new Uint8Array([137, 80, 78, 71])
    await fetchImages(req, (async () => new Response(png, { headers: { 'content-type': 'image/png; charset=binary' } })) as typeof fetch, signal)
    expect(req.messages[0]!.content).toEqual([{ type: 'image', mime: 'image/png', data: Buffer.from(png).toString('base64') }])
    const huge = parse({ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'https://img.example/big.png' } }] }] })
    await expect(fetchImages(huge, (async () => new Response(new Uint8Array(5 << 20), { headers: { 'content-type': 'image/png' } })) as typeof fetch, signal)).rejects.toMatchObject({ code: 'image_too_large' })
  })
})

describe('tool-call chunks', () => {
  it('takes OpenAI delta.tool_calls arrays (null fields as absent), and nothing else', () => {
    expect(toolCallDeltas('[{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":""}}]')).toEqual([{ index: 0, id: 'c1', type: 'function', function: { name: 'f', arguments: '' } }])
    expect(toolCallDeltas('[{"index":0,"id":null,"type":null,"function":{"name":null,"arguments":"{}"}}]')).toEqual([{ index: 0, function: { arguments: '{}' } }])
    for (const bad of ['', 'nope', '{}', '[1]', '[{"index":-1}]', '[{"index":0,"id":5}]', '[{"index":0,"type":"code"}]', '[{"index":999}]']) expect(toolCallDeltas(bad), bad).toBeNull()
  })

  it('assembles the calls by index: id and name from their first fragment, arguments concatenated; unnamed calls left out', () => {
    const a = new ToolCallAssembler()
    for (const chunk of [
      '[{"index":1,"id":"c2","type":"function","function":{"name":"g","arguments":"{\\"x\\""}}]',
      '[{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":""}}]',
      '[{"index":0,"function":{"arguments":"{}"}},{"index":1,"function":{"arguments":":1}"}}]',
      '[{"index":2,"function":{"arguments":"orphan"}}]',
    ]) a.add(toolCallDeltas(chunk)!)
    expect(a.calls()).toEqual([
      { id: 'c1', type: 'function', function: { name: 'f', arguments: '{}' } },
      { id: 'c2', type: 'function', function: { name: 'g', arguments: '{"x":1}' } },
    ])
  })

  it('credits the machine that ran the job in the x_cocore block', () => {
    expect(xCocore(null, undefined)).toEqual({})
    expect(xCocore({ did: 'did:plc:p', handle: 'p.test', displayName: null, machineLabel: 'box' }, 'at://r')).toEqual({
      x_cocore: { credit: 'this completion was served by p.test on their box machine', provider: { did: 'did:plc:p', handle: 'p.test', displayName: null, machineLabel: 'box' }, receiptUri: 'at://r' },
    })
  })
})
