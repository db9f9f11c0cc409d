/**
 * The OpenAI chat request, checked field by field, as the network's console
 * reads it (packages/console/src/lib/openai-chat-completions.server.ts):
 * text parts joined by newlines, `image_url` parts carried inline in the
 * messages-v1 document (a `data:` URL as is, an http(s) URL fetched here),
 * `tool_calls` / `tool_call_id` in the document, `tools` / `tool_choice` /
 * `response_format` as the job's public constraints, `n` ignored,
 * `min_provider_version` with or without a leading `v`, `min_trust` on the
 * verified tier. Unknown fields are ignored; a field this exchange cannot
 * honour is refused, never dropped (an unknown content part, `logprobs`).
 */
import type { GenerationParams } from '../../src/protocol/agent.ts'
import type { ContentPart, ImagePart, InputMessage, ToolCall } from '../../src/protocol/input.ts'
import {
  constraintBytes,
  MAX_CONSTRAINT_BYTES,
  MAX_DESCRIPTION_BYTES,
  MAX_NAME_BYTES,
  MAX_TOOLS,
  recordJsonProblem,
  TOOL_CHOICES,
  type JobConstraints,
  type JobTool,
  type ToolChoice,
} from '../../src/protocol/job-constraints.ts'
import type { Tier } from './exchange.ts'
import { invalid } from './openai-error.ts'

/** Most tokens a reply may be asked for (the job lexicon's maximum). */
const MAX_TOKENS_LIMIT = 2_000_000
const DEFAULT_MAX_TOKENS = 1024
/** Image URLs fetched for one request, and their bytes together (the sealed prompt must fit a provider's 16 MB frame). */
const MAX_REMOTE_IMAGES = 16
export const MAX_REMOTE_IMAGE_BYTES = 4 << 20
export const IMAGE_FETCH_TIMEOUT_MS = 15_000

/** The verified tier's floors (`min_trust`), as the network names them. */
export const TRUST_FLOORS = ['hardware-attested', 'confidential'] as const
export type TrustFloor = (typeof TRUST_FLOORS)[number]

const ROLES = ['system', 'developer', 'user', 'assistant', 'tool'] as const

export interface ChatRequest {
  model: string
  messages: InputMessage[]
  /** Image parts whose `mime` and `data` are still to be fetched from `url` (fetchImages). */
  remoteImages: { part: ImagePart; url: string; param: string }[]
  maxTokens: number
  params: GenerationParams
  stream: boolean
  includeUsage: boolean
  country?: string
  minProviderVersion?: string
  minTrust?: TrustFloor
  /** Structured output and tools: the job record's public fields. */
  constraints?: JobConstraints
}

const bytes = (s: string) => Buffer.byteLength(s, 'utf8')
const isObject = (v: unknown): v is Record<string, unknown> => !!v && typeof v === 'object' && !Array.isArray(v)
const given = (v: unknown) => v !== undefined && v !== null
/** A name the job lexicon can hold: 1 to 256 UTF-8 bytes. */
const isName = (v: unknown): v is string => typeof v === 'string' && v.length > 0 && bytes(v) <= MAX_NAME_BYTES && !/[\uD800-\uDFFF]/u.test(v)

/** `data:image/<type>;base64,<payload>` */
const DATA_URL = /^data:(image\/[\w.+-]+);base64,([A-Za-z0-9+/]*={0,2})$/

function imagePart(url: unknown, param: string, remote: ChatRequest['remoteImages']): ImagePart {
  if (typeof url !== 'string') throw invalid(`${param}.image_url.url must be a string`, param)
  const data = DATA_URL.exec(url)
  if (data && data[2]!.length > 0 && data[2]!.length % 4 === 0) return { type: 'image', mime: data[1]!, data: data[2]! }
  if (/^https?:\/\//i.test(url) && url.length <= 8192 && URL.canParse(url)) {
    if (remote.length >= MAX_REMOTE_IMAGES) throw invalid(`at most ${MAX_REMOTE_IMAGES} image URLs are fetched per request; send the others inline as data: URLs`, param)
    const part: ImagePart = { type: 'image', mime: '', data: '' }
    remote.push({ part, url, param })
    return part
  }
  throw invalid(`${param}.image_url.url must be an http(s) URL or a data:image/...;base64 URL`, param, 'invalid_image_url')
}

function content(m: Record<string, unknown>, param: string, remote: ChatRequest['remoteImages']): InputMessage['content'] {
  const c = m.content
  if (typeof c === 'string') return c
  // An assistant message that only calls tools has no content.
  if (!given(c) && m.role === 'assistant') return ''
  if (!Array.isArray(c)) throw invalid(`${param}.content must be a string or an array of content parts`, `${param}.content`)
  const parts: ContentPart[] = c.map((p, j): ContentPart => {
    const at = `${param}.content[${j}]`
    if (isObject(p) && p.type === 'text' && typeof p.text === 'string') return { type: 'text', text: p.text }
    if (isObject(p) && p.type === 'image_url' && m.role === 'user') return imagePart(isObject(p.image_url) ? p.image_url.url : undefined, at, remote)
    // Refused, not dropped: the model would answer a prompt that is not the one sent.
    throw invalid(`${at} must be a text part${m.role === 'user' ? ' or an image_url part' : ''} (${m.role} messages take no other)`, at, 'unsupported_content_part')
  })
  // Text only: one string, the parts joined by newlines (as the network does); with images, the parts in order.
  return parts.some((p) => p.type === 'image') ? parts : parts.map((p) => (p as { text: string }).text).join('\n')
}

function toolCalls(v: unknown, param: string): ToolCall[] {
  if (!Array.isArray(v) || v.length === 0 || v.length > MAX_TOOLS) throw invalid(`${param} must be an array of 1 to ${MAX_TOOLS} tool calls`, param)
  return v.map((call, j) => {
    const fn = isObject(call) && isObject(call.function) ? call.function : null
    if (!isObject(call) || typeof call.id !== 'string' || !call.id || (call.type !== undefined && call.type !== 'function') || !fn || !isName(fn.name) || typeof fn.arguments !== 'string') {
      throw invalid(`${param}[${j}] must be { id, type: "function", function: { name, arguments } }`, `${param}[${j}]`)
    }
    return { id: call.id, type: 'function' as const, function: { name: fn.name, arguments: fn.arguments } }
  })
}

function message(raw: unknown, i: number, remote: ChatRequest['remoteImages']): InputMessage {
  const param = `messages[${i}]`
  if (!isObject(raw)) throw invalid(`${param} must be an object`, param)
  const role = raw.role
  if (typeof role !== 'string' || !(ROLES as readonly string[]).includes(role)) throw invalid(`${param}.role must be one of ${ROLES.join(', ')}`, `${param}.role`)
  const out: InputMessage = { role, content: content(raw, param, remote) }
  if (given(raw.tool_calls)) {
    if (role !== 'assistant') throw invalid(`${param}.tool_calls belongs on assistant messages`, `${param}.tool_calls`)
    out.tool_calls = toolCalls(raw.tool_calls, `${param}.tool_calls`)
  }
  if (role === 'tool') {
    if (typeof raw.tool_call_id !== 'string' || !raw.tool_call_id) throw invalid(`${param}.tool_call_id must name the tool call this message answers`, `${param}.tool_call_id`)
    out.tool_call_id = raw.tool_call_id
  } else if (given(raw.tool_call_id)) throw invalid(`${param}.tool_call_id belongs on tool messages`, `${param}.tool_call_id`)
  return out
}

/** A schema that a record can hold and a receipt can hash; throws the 400 naming `param`. */
function recordJson(v: unknown, param: string): Record<string, unknown> {
  if (!isObject(v)) throw invalid(`${param} must be a JSON object`, param)
  const problem = recordJsonProblem(v)
  if (problem) throw invalid(`${param} ${problem} (it is published on the job record)`, param)
  return v
}

function tools(v: unknown): JobTool[] | undefined {
  if (!given(v)) return undefined
  if (!Array.isArray(v) || v.length > MAX_TOOLS) throw invalid(`tools must be an array of at most ${MAX_TOOLS} tools`, 'tools')
  return v.map((t, i): JobTool => {
    const param = `tools[${i}]`
    const fn = isObject(t) ? t.function : undefined
    if (!isObject(t) || t.type !== 'function' || !isObject(fn)) throw invalid(`${param} must be { type: "function", function: { name, ... } }`, param)
    if (!isName(fn.name)) throw invalid(`${param}.function.name must be a string of 1 to ${MAX_NAME_BYTES} bytes`, `${param}.function.name`)
    if (given(fn.description) && (typeof fn.description !== 'string' || bytes(fn.description) > MAX_DESCRIPTION_BYTES || /[\uD800-\uDFFF]/u.test(fn.description))) {
      throw invalid(`${param}.function.description must be a string of at most ${MAX_DESCRIPTION_BYTES} bytes`, `${param}.function.description`)
    }
    return {
      type: 'function',
      function: {
        name: fn.name,
        ...(typeof fn.description === 'string' ? { description: fn.description } : {}),
        ...(given(fn.parameters) ? { parameters: recordJson(fn.parameters, `${param}.function.parameters`) } : {}),
      },
    }
  })
}

/** `tool_choice`: a strategy, or `{type:"function", function:{name}}`, which the job names as `required` plus the function. */
function toolChoice(v: unknown, list: JobTool[] | undefined): Pick<JobConstraints, 'toolChoice' | 'toolChoiceFunction'> {
  if (!given(v)) return {}
  let choice: Pick<JobConstraints, 'toolChoice' | 'toolChoiceFunction'>
  if (typeof v === 'string' && (TOOL_CHOICES as readonly string[]).includes(v)) choice = { toolChoice: v as ToolChoice }
  else if (isObject(v) && v.type === 'function' && isObject(v.function) && isName(v.function.name)) choice = { toolChoice: 'required', toolChoiceFunction: v.function.name }
  else throw invalid(`tool_choice must be ${TOOL_CHOICES.map((c) => `"${c}"`).join(', ')} or { type: "function", function: { name } }`, 'tool_choice')
  if (!list) {
    // Nothing to choose from: "auto" and "none" mean what no tools mean; a demand for a call cannot be met.
    if (choice.toolChoice === 'required') throw invalid('tool_choice requires a call, but the request has no tools', 'tool_choice')
    return {}
  }
  if (choice.toolChoiceFunction && !list.some((t) => t.function.name === choice.toolChoiceFunction)) throw invalid(`tool_choice names "${choice.toolChoiceFunction}", which is not among the tools`, 'tool_choice')
  return choice
}

/** `response_format`: `json_schema` becomes the job's outputSchema, `json_object` a schema of any object, `text` none. */
function outputSchema(v: unknown): JobConstraints['outputSchema'] {
  if (!given(v)) return undefined
  if (!isObject(v)) throw invalid('response_format must be an object', 'response_format')
  if (v.type === 'text') return undefined
  if (v.type === 'json_object') return { name: 'json_object', schema: { type: 'object' } }
  if (v.type !== 'json_schema') throw invalid('response_format.type must be "text", "json_object" or "json_schema"', 'response_format.type')
  const js = v.json_schema
  if (!isObject(js)) throw invalid('response_format.json_schema must be an object', 'response_format.json_schema')
  if (!isName(js.name)) throw invalid(`response_format.json_schema.name must be a string of 1 to ${MAX_NAME_BYTES} bytes`, 'response_format.json_schema.name')
  if (given(js.strict) && typeof js.strict !== 'boolean') throw invalid('response_format.json_schema.strict must be a boolean', 'response_format.json_schema.strict')
  return { name: js.name, ...(typeof js.strict === 'boolean' ? { strict: js.strict } : {}), schema: recordJson(js.schema, 'response_format.json_schema.schema') }
}

function constraints(b: Record<string, unknown>): JobConstraints | undefined {
  const list = tools(b.tools)
  // An empty list offers nothing: the job names none (an engine may refuse `tools: []`).
  const offered = list?.length ? list : undefined
  const schema = outputSchema(b.response_format)
  const c: JobConstraints = { ...(schema ? { outputSchema: schema } : {}), ...(offered ? { tools: offered } : {}), ...toolChoice(b.tool_choice, offered) }
  if (!schema && !offered) return undefined
  if (constraintBytes(c) > MAX_CONSTRAINT_BYTES) throw invalid(`tools and response_format together are over ${MAX_CONSTRAINT_BYTES >> 10} KB (they are published on the job record)`, offered ? 'tools' : 'response_format')
  return c
}

/** The request body; unknown fields are ignored, unsupported ones refused. @throws OpenAiError (400) */
export function parseChatRequest(body: unknown, tier?: Tier): ChatRequest {
  if (!isObject(body)) throw invalid('the request body must be a JSON object', null)
  const b = body
  if (typeof b.model !== 'string' || !b.model) throw invalid('model is required (a string)', 'model')
  if (b.model.length > 256) throw invalid('model is at most 256 characters', 'model')
  if (!Array.isArray(b.messages) || b.messages.length === 0) throw invalid('messages must be a non-empty array', 'messages')
  const remoteImages: ChatRequest['remoteImages'] = []
  const messages = b.messages.map((m, i) => message(m, i, remoteImages))
  for (const f of ['functions', 'function_call', 'logprobs'] as const) {
    if (given(b[f]) && b[f] !== false) throw invalid(`${f} is not supported by this exchange`, f, 'unsupported_parameter')
  }
  // Accepted and ignored, as on the network: one choice is answered.
  if (given(b.n) && !(Number.isSafeInteger(b.n) && (b.n as number) >= 1)) throw invalid('n must be a positive integer', 'n')
  if (given(b.parallel_tool_calls) && typeof b.parallel_tool_calls !== 'boolean') throw invalid('parallel_tool_calls must be a boolean', 'parallel_tool_calls')
  const maxRaw = b.max_completion_tokens ?? b.max_tokens
  let maxTokens = DEFAULT_MAX_TOKENS
  if (given(maxRaw)) {
    if (!Number.isSafeInteger(maxRaw) || (maxRaw as number) < 1 || (maxRaw as number) > MAX_TOKENS_LIMIT) throw invalid(`max_tokens must be an integer from 1 to ${MAX_TOKENS_LIMIT}`, b.max_completion_tokens !== undefined ? 'max_completion_tokens' : 'max_tokens')
    maxTokens = maxRaw as number
  }
  const params: GenerationParams = {}
  const num = (name: string, min: number, max: number): number | undefined => {
    const v = b[name]
    if (!given(v)) return undefined
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) throw invalid(`${name} must be a number from ${min} to ${max}`, name)
    return v
  }
  const temperature = num('temperature', 0, 2)
  const topP = num('top_p', 0, 1)
  if (temperature !== undefined) params.temperature = temperature
  if (topP !== undefined) params.top_p = topP
  if (given(b.seed)) {
    if (!Number.isSafeInteger(b.seed)) throw invalid('seed must be an integer', 'seed')
    params.seed = b.seed as number
  }
  if (given(b.stop)) {
    const stop = typeof b.stop === 'string' ? [b.stop] : b.stop
    if (!Array.isArray(stop) || stop.length > 4 || !stop.every((s) => typeof s === 'string' && s.length > 0 && s.length <= 256)) throw invalid('stop must be a string or up to 4 non-empty strings', 'stop')
    params.stop = stop as string[]
  }
  if (given(b.stream) && typeof b.stream !== 'boolean') throw invalid('stream must be a boolean', 'stream')
  const so = b.stream_options
  if (given(so) && (!isObject(so) || (so.include_usage !== undefined && typeof so.include_usage !== 'boolean'))) throw invalid('stream_options.include_usage must be a boolean', 'stream_options')
  const country = typeof b.country === 'string' ? b.country.trim() : b.country
  if (given(country) && (typeof country !== 'string' || !/^[A-Za-z]{2}$/.test(country))) throw invalid('country must be a two-letter ISO 3166-1 code', 'country')
  const version = typeof b.min_provider_version === 'string' ? b.min_provider_version.trim() : b.min_provider_version
  if (given(version) && (typeof version !== 'string' || !/^v?\d+(\.\d+){0,3}$/i.test(version))) {
    throw invalid('min_provider_version must be a dotted version such as 0.4.2 (a leading v is allowed)', 'min_provider_version')
  }
  let minTrust: TrustFloor | undefined
  // Read on the verified tier only, as on the network; its default is any hardware-attested machine.
  if (tier === 'verified' && given(b.min_trust)) {
    if (!(TRUST_FLOORS as readonly unknown[]).includes(b.min_trust)) throw invalid(`min_trust must be ${TRUST_FLOORS.map((f) => `"${f}"`).join(' or ')}`, 'min_trust', 'invalid_min_trust')
    minTrust = b.min_trust as TrustFloor
  }
  const c = constraints(b)
  return {
    model: b.model,
    messages,
    remoteImages,
    maxTokens,
    params,
    stream: b.stream === true,
    includeUsage: isObject(so) && so.include_usage === true,
    ...(typeof country === 'string' ? { country: country.toUpperCase() } : {}),
    ...(typeof version === 'string' ? { minProviderVersion: version.replace(/^v/i, '') } : {}),
    ...(minTrust ? { minTrust } : {}),
    ...(c ? { constraints: c } : {}),
  }
}

/**
 * Fetches the request's image URLs into its image parts, so the prompt is
 * sealed whole (the provider fetches nothing). `fetchImage` is SSRF-safe in
 * production (https only, public addresses only: src/net/safe-fetch.ts);
 * without one, image URLs are refused. A failure says which image, never what
 * the server at that URL answered.
 * @throws OpenAiError (400)
 */
export async function fetchImages(req: ChatRequest, fetchImage: typeof fetch | undefined, signal: AbortSignal): Promise<void> {
  let total = 0
  for (const { part, url, param } of req.remoteImages) {
    if (!fetchImage) throw invalid(`${param}: this exchange does not fetch image URLs; send the image inline as a data:image/...;base64 URL`, param, 'invalid_image_url')
    const failed = () => invalid(`${param}: the image URL could not be fetched as an image`, param, 'invalid_image_url')
    let res: Response
    try {
      res = await fetchImage(url, { redirect: 'follow', headers: { accept: 'image/*' }, signal: AbortSignal.any([signal, AbortSignal.timeout(IMAGE_FETCH_TIMEOUT_MS)]) })
    } catch (err) {
      if (signal.aborted) throw err
      throw failed()
    }
    const mime = (res.headers.get('content-type') ?? '').split(';')[0]!.trim().toLowerCase()
    if (!res.ok || !/^image\/[\w.+-]+$/.test(mime)) {
      await res.body?.cancel().catch(() => undefined)
      throw failed()
    }
    let body: Uint8Array
    try {
      body = new Uint8Array(await res.arrayBuffer())
    } catch (err) {
      if (signal.aborted) throw err
      throw failed()
    }
    total += body.length
    if (body.length === 0) throw failed()
    if (total > MAX_REMOTE_IMAGE_BYTES) throw invalid(`the images fetched for this request are over ${MAX_REMOTE_IMAGE_BYTES >> 20} MB together; send them smaller or inline`, param, 'image_too_large')
    part.mime = mime
    part.data = Buffer.from(body).toString('base64')
  }
}

