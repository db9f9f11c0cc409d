/**
 * Fuzzing every HTTP surface: the AppView's XRPC methods, the console's XRPC
 * methods, its pages and the OpenAI-compatible API, with seeded garbage
 * (wrong types, huge values, unicode and broken UTF-8, injection strings,
 * tampered cursors, oversized bodies, wrong content types, with and without
 * credentials). Whatever comes in, the answer is a 4xx (or a 2xx whose body
 * is a valid result) with an XRPC or OpenAI error object where those are
 * spoken, never a 5xx and never a stack trace.
 *
 * The methods come from the code: every query and procedure of the lexicons
 * (both servers are asked about all of them), and every route the console
 * registers. One real stack: PLC + PDS, AppView, console as the exchange with
 * its ledger, the reference agent serving the model `builtin`, a session
 * signed in through the PDS in a real browser.
 *
 *   COCORE_FUZZ_CASES=400 COCORE_FUZZ_SEED=7 npx vitest run test/fuzz-http.test.ts
 */
import { Agent, request as httpRequest } from 'node:http'
import { connect as netConnect } from 'node:net'
import type { Browser } from 'playwright-core'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { encodeCursor } from '../appview/api/util.ts'
import type { AppView } from '../appview/index.ts'
import { ApiKeys, SCOPES } from '../console/api-keys.ts'
import { createConsoleApp, type ConsoleDeps } from '../console/app.ts'
import type { ConsoleService } from '../console/index.ts'
import type { LocalAccount, LocalNetwork } from '../src/dev/network.ts'
import { friend, profile, putRecord } from '../src/dev/records.ts'
import { schemas } from '../src/lexicon/generated/schemas.ts'
import { lexicons } from '../src/lexicon/validate.ts'
import type { ProviderAgent } from '../src/provider/agent.ts'
import { startBuiltinAgent } from './fixture/agent.ts'
import { waitCaughtUp } from './fixture/appview.ts'
import { sessionCookie, signInWithBrowser } from './fixture/console.ts'
import { startStack, type Stack } from './fixture/stack.ts'
import { fuzzConfig, rng, type Rng } from './fixture/fuzz.ts'
import { waitFor } from './fixture/wait.ts'

const { seed, cases } = fuzzConfig(12)
/** Each fuzzing test's time limit grows with the cases it sends (the long mode sends thousands). */
const FUZZ_TIMEOUT_MS = Math.max(120_000, cases * 2_000)

// ---------------------------------------------------------------------------
// Sending: node:http, so methods, headers, raw paths and bodies are ours to break.

type Reply = { status: number; headers: Record<string, string | string[] | undefined>; body: string }
type Req = { method: string; path: string; headers?: Record<string, string>; body?: Buffer | string; chunked?: boolean }

const agent = new Agent({ keepAlive: true, maxSockets: 8 })

function send(base: string, req: Req): Promise<Reply> {
  const url = new URL(base)
  const big = req.body !== undefined && Buffer.byteLength(req.body) > 64 * 1024
  return new Promise((resolve, reject) => {
    let answered = false
    const r = httpRequest(
      // A big body gets a connection of its own: a server that answers before reading it all closes it.
      { host: url.hostname, port: url.port, method: req.method, path: req.path, headers: req.headers, agent: big ? false : agent },
      (res) => {
        answered = true
        const parts: Buffer[] = []
        res.on('data', (d: Buffer) => parts.push(d))
        res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(parts).toString('utf8') }))
        res.on('error', reject)
      },
    )
    // A server may answer (413) and close before a big body is written: the answer is what counts.
    r.on('error', (err) => {
      if (!answered) reject(err)
    })
    if (req.body !== undefined) {
      if (req.chunked) {
        const b = Buffer.from(req.body)
        for (let i = 0; i < b.length; i += 1 << 16) r.write(b.subarray(i, i + (1 << 16)))
      } else r.setHeader('content-length', Buffer.byteLength(req.body))
    }
    r.end(req.chunked ? undefined : req.body)
  })
}

// ---------------------------------------------------------------------------
// Judging an answer.

/** What a leaked stack or internal error looks like. */
const LEAKS = [/\n\s+at \S/, /\bat [^\s()]+ \((?:\/|file:)/, /\/work\//, /node_modules/, /file:\/\/\//, /\b(?:TypeError|RangeError|ReferenceError|SyntaxError|SqliteError|EvalError|URIError|ERR_[A-Z_]+)\b/]
/** Markup among the inputs: it must come back escaped in HTML, never as markup. */
const SCRIPT = '<script>alert(1)</script>'
const IMG = '"><img src=x onerror=alert(1)>'
const MARKUP = [SCRIPT, '<img src=x onerror=alert(1)>']

let counted = 0
const tally: Record<string, number> = {}
const statuses: Record<string, Record<number, number>> = {}
/** Server-sent events seen, by protocol and event name: shows the streams ran, not just their refusals. */
const events: Record<string, number> = {}

type Kind = 'xrpc' | 'openai' | 'page'

interface Case {
  surface: string
  /** The method or route, for the report. */
  target: string
  index: number
  req: Req
  kind: Kind
  /** XRPC: the NSID asked for, and whether this server implements it. */
  nsid?: string
  implemented?: boolean
  /** Page routes that serve source modules (their 2xx bodies legitimately name node_modules). */
  source?: boolean
}

const describeCase = (c: Case) =>
  `seed=${seed} ${c.surface} ${c.target} case ${c.index}: ${c.req.method} ${c.req.path.slice(0, 300)} headers=${JSON.stringify(c.req.headers ?? {}).slice(0, 300)} body=${
    c.req.body === undefined ? '-' : `${Buffer.byteLength(c.req.body)} bytes ${JSON.stringify(String(c.req.body).slice(0, 300))}`
  }`

function judge(c: Case, res: Reply): void {
  counted++
  tally[c.surface] = (tally[c.surface] ?? 0) + 1
  const st = (statuses[c.surface] ??= {})
  st[res.status] = (st[res.status] ?? 0) + 1
  const where = () => `${describeCase(c)}\n=> ${res.status} ${JSON.stringify(res.headers['content-type'])} ${res.body.slice(0, 600)}`
  const input = `${c.req.path}\n${JSON.stringify(c.req.headers ?? {})}\n${c.req.body ?? ''}`
  const unimplemented = c.kind === 'xrpc' && c.implemented === false && res.status === 501
  // The OpenAI API's deliberate 503s (as the network answers them): nothing to be had now, retry later; not a failure.
  const unavailable = c.kind === 'openai' && res.status === 503 && /"type":"service_unavailable_error"/.test(res.body)
  if (res.status >= 500 && !unimplemented && !unavailable) throw new Error(`5xx answer (${res.status})\n${where()}`)
  if (res.status < 200) throw new Error(`odd status\n${where()}`)
  // No stack trace or internal path, in the body or any header (unless the input itself carried the text).
  const headerText = Object.entries(res.headers).map(([k, v]) => `${k}: ${v}`).join('\n')
  for (const leak of LEAKS) {
    if (c.source && res.status < 300) break
    if (leak.test(input)) continue
    if (leak.test(res.body) || leak.test(headerText)) throw new Error(`leaks ${leak}\n${where()}`)
  }
  if (c.req.method === 'HEAD' || res.status === 204) return
  const type = String(res.headers['content-type'] ?? '')
  const sent = `${input}\n${percentDecoded(input)}`
  for (const m of MARKUP) if (type.startsWith('text/html') && sent.includes(m) && res.body.includes(m)) throw new Error(`reflects markup unescaped\n${where()}`)
  if (c.kind === 'page') return
  if (type.startsWith('text/event-stream')) {
    if (res.status !== 200) throw new Error(`event stream with status ${res.status}\n${where()}`)
    checkEvents(c, res.body, where)
    return
  }
  let body: unknown
  try {
    body = JSON.parse(res.body)
  } catch {
    throw new Error(`not JSON\n${where()}`)
  }
  if (!type.startsWith('application/json')) throw new Error(`JSON without its content type\n${where()}`)
  if (c.kind === 'xrpc') {
    if (res.status >= 400) {
      const e = body as { error?: unknown; message?: unknown }
      if (typeof e.error !== 'string' || !/^[A-Za-z]+$/.test(e.error) || typeof e.message !== 'string') throw new Error(`not an XRPC error\n${where()}`)
      if (unimplemented && e.error !== 'MethodNotImplemented') throw new Error(`501 other than MethodNotImplemented\n${where()}`)
      if (res.status === 501 && !unimplemented) throw new Error(`implemented method answered 501\n${where()}`)
    } else if (c.nsid && lexicons.getDef(c.nsid) && (lexicons.getDef(c.nsid) as { output?: { encoding?: string } }).output?.encoding === 'application/json') {
      try {
        lexicons.assertValidXrpcOutput(c.nsid, body)
      } catch (err) {
        throw new Error(`2xx output does not match the lexicon: ${(err as Error).message}\n${where()}`)
      }
    }
    return
  }
  // OpenAI-style.
  if (res.status >= 400) {
    if (!isOpenAiError(body)) throw new Error(`not an OpenAI error object\n${where()}`)
    return
  }
  const ok = body as { object?: unknown; choices?: { message?: { content?: unknown; tool_calls?: unknown } }[]; data?: unknown; models?: unknown }
  const message = ok.choices?.[0]?.message
  const valid =
    (ok.object === 'chat.completion' && (typeof message?.content === 'string' || (message?.content === null && Array.isArray(message.tool_calls)))) ||
    (ok.object === 'list' && Array.isArray(ok.data)) ||
    // The network's model views: ?view=directory|summary, and the recommended models.
    Array.isArray(ok.models) ||
    (Array.isArray(body) && body.every((m: { id?: unknown; minRamGb?: unknown }) => typeof m.id === 'string' && typeof m.minRamGb === 'number'))
  if (!valid) throw new Error(`2xx that is neither a completion nor a model list\n${where()}`)
}

/** Percent-escapes decoded where they decode (form bodies and query strings carry the markup encoded). */
const percentDecoded = (s: string) =>
  s.replace(/\+/g, ' ').replace(/(?:%[0-9A-Fa-f]{2})+/g, (m) => {
    try {
      return decodeURIComponent(m)
    } catch {
      return m
    }
  })

function isOpenAiError(body: unknown): boolean {
  const e = (body as { error?: { message?: unknown; type?: unknown; code?: unknown } } | null)?.error
  return !!e && typeof e === 'object' && typeof e.message === 'string' && typeof e.type === 'string' && (typeof e.code === 'string' || e.code === null)
}

/** Each event of a stream parses; an error event is an error object of its protocol. */
function checkEvents(c: Case, text: string, where: () => string): void {
  let event = 'message'
  let sawEnd = false
  for (const line of text.split('\n')) {
    if (line.startsWith('event:')) event = line.slice(6).trim()
    if (!line.startsWith('data:')) continue
    events[`${c.kind}:${event}`] = (events[`${c.kind}:${event}`] ?? 0) + 1
    const data = line.slice(5).trim()
    if (data === '[DONE]') {
      sawEnd = true
      continue
    }
    let v: unknown
    try {
      v = JSON.parse(data)
    } catch {
      throw new Error(`event data is not JSON: ${data.slice(0, 200)}\n${where()}`)
    }
    if (c.kind === 'openai' && (v as { error?: unknown }).error !== undefined) {
      if (!isOpenAiError(v)) throw new Error(`stream error is not an OpenAI error\n${where()}`)
      // Mid-stream, an error object is the last event.
      sawEnd = true
    }
    if (c.kind === 'xrpc' && event === 'error' && (typeof (v as { code?: unknown }).code !== 'string' || typeof (v as { reason?: unknown }).reason !== 'string')) throw new Error(`error event without code and reason\n${where()}`)
    if (c.kind === 'xrpc' && (event === 'complete' || event === 'error')) sawEnd = true
  }
  if (!sawEnd) throw new Error(`stream ended without its final event\n${where()}`)
}

// ---------------------------------------------------------------------------
// Generating inputs.

const INJECTIONS = [
  `' OR 1=1--`,
  `" OR ""="`,
  `'; DROP TABLE records;--`,
  `1) UNION SELECT sqlite_version()--`,
  '%00',
  '\u0000',
  '../../../../etc/passwd',
  '..%2f..%2f..%2fetc%2fpasswd',
  SCRIPT,
  IMG,
  '${7*7}',
  '{{7*7}}',
  '__proto__',
  'constructor',
  'hasOwnProperty',
  '\r\nSet-Cookie: pwned=1',
  `did:plc:' OR '1'='1`,
  'at://did:plc:aaaa/../../x',
  'javascript:alert(1)',
  'http://169.254.169.254/latest/meta-data/',
  '%s%s%s%n',
  '\\',
  '*',
  '%',
  '_',
  '\u202e\u2066evil',
  '\ufeff',
]
const NUMBERS = ['-1', '0', '-0', '1.5', '1e309', '-1e309', 'NaN', 'Infinity', '-Infinity', '9007199254740993', '99999999999999999999999999', '0x10', '1_000', ' 1', '1 ', '+1', '00001', '2147483648', '-2147483649', '1e3']
const WORDS = ['true', 'false', 'null', 'undefined', '[]', '{}', '[1,2]', '{"a":1}', '', ' ']
const NASTY_JSON: unknown[] = [null, true, false, 0, -1, 1.5, 1e308, -1e308, 2 ** 53 + 2, '', ' ', [], {}, [null], { '': '' }, { __proto__: { polluted: true } }, 'x'.repeat(70_000)]

/** Percent-encodes a string; lone surrogates become their (invalid) WTF-8 bytes, which a server must survive. */
function enc(s: string): string {
  let out = ''
  for (let i = 0; i < s.length; i++) {
    const u = s.charCodeAt(i)
    if (/[A-Za-z0-9\-._~]/.test(s[i]!)) out += s[i]
    else if (u >= 0xd800 && u <= 0xdbff && i + 1 < s.length && s.charCodeAt(i + 1) >= 0xdc00 && s.charCodeAt(i + 1) <= 0xdfff) {
      out += encodeURIComponent(s.slice(i, i + 2))
      i++
    } else if (u >= 0xd800 && u <= 0xdfff) out += `%${(0xe0 | (u >> 12)).toString(16)}%${(0x80 | ((u >> 6) & 0x3f)).toString(16)}%${(0x80 | (u & 0x3f)).toString(16)}`.toUpperCase()
    else out += encodeURIComponent(s[i]!)
  }
  return out
}

/** Raw query fragments a URL parser must survive. */
const RAW_QUERY = ['%', '%z', '%zz', '%E0%A4', '%ED%A0%80', '%FF%FE', '%C0%AE%C0%AE', '&&&', '==', '=&=', 'a=%', '%00=%00', ';', '#frag', '?', '+++']

interface Known {
  dids: string[]
  handles: string[]
  uris: string[]
  cursors: string[]
  models: string[]
  /** The connected provider's DID and published key, so sealed dispatches reach it. */
  provider: { did: string; encryptionPubKey: string }
}
let known: Known

/** A value that should pass, shaped by the lexicon definition of the parameter. */
function validScalar(r: Rng, def: Record<string, any>, name: string): unknown {
  switch (def.type) {
    case 'integer': {
      const min = def.minimum ?? 0
      const max = def.maximum ?? min + 1000
      return r.pick([min, max, r.range(min, Math.min(max, min + 100)), def.default ?? min])
    }
    case 'boolean':
      return r.chance(0.5)
    case 'string': {
      if (def.enum) return r.pick(def.enum)
      if (def.knownValues && r.chance(0.95)) return r.pick(def.knownValues)
      if (name === 'cursor') return r.pick(known.cursors)
      if (name === 'prompt') return r.pick(['sealed', 'hello there'])
      if (name === 'encryptionPubKey') return known.provider.encryptionPubKey
      if (name === 'providerDid' && r.chance(0.8)) return known.provider.did
      if (name === 'ephemeralPubKey') return Buffer.from(r.bytes(32)).toString('base64')
      if (name === 'ciphertext') return Buffer.from(r.bytes(r.range(40, 400))).toString('base64')
      if (name === 'inputCommitment') return Buffer.from(r.bytes(32)).toString('hex')
      switch (def.format) {
        case 'did':
          return r.pick(known.dids)
        case 'handle':
          return r.pick(known.handles)
        case 'at-identifier':
          return r.pick([...known.dids, ...known.handles])
        case 'at-uri':
          return r.pick(known.uris)
        case 'datetime':
          return new Date(Date.now() + r.range(-1e9, 1e10)).toISOString()
        case 'uri':
          return 'https://example.com/x'
        case 'cid':
          return 'bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm'
        case 'language':
          return 'en'
      }
      if (/model/i.test(name)) return r.chance(0.8) ? 'builtin' : r.pick(known.models)
      const min = def.minLength ?? 1
      const max = Math.min(def.maxLength ?? 40, 200)
      return 'a'.repeat(r.range(min, Math.max(min, max)))
    }
  }
  return 'x'
}

/** Text that should not pass, or should at least be handled with care. */
function nastyText(r: Rng): string {
  switch (r.int(8)) {
    case 0:
      return r.pick(INJECTIONS)
    case 1:
      return r.pick(NUMBERS)
    case 2:
      return r.pick(WORDS)
    case 3:
      return r.string(r.range(1, 64))
    case 4:
      return r.pick(['a', 'é', '😀', '\u0000']).repeat(r.pick([257, 2049, 5000]))
    case 5:
      return tamperedCursor(r)
    case 6:
      return r.pick(known.dids).slice(0, r.range(0, 20)) + r.string(r.range(0, 5))
    default:
      return r.pick(known.uris).replace(/[a-z0-9]$/, r.pick(['', '/', '#', '?', '%', '\u0000']))
  }
}

/** Cursors: random base64, well-formed JSON of the wrong shape, real ones tampered with, too long. */
function tamperedCursor(r: Rng): string {
  const b64 = (v: unknown) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url')
  switch (r.int(7)) {
    case 0:
      return Buffer.from(r.bytes(r.range(1, 64))).toString(r.chance(0.5) ? 'base64' : 'base64url')
    case 1:
      return b64(r.pick<unknown>([['a'], [1, 2], ['a', 'b', 'c'], { a: 1 }, [null, null], [1e309, 'x'], ['x', 1], 'not json', [[], {}], ['\u0000', '\ud800']]))
    case 2: {
      const c = r.pick(known.cursors)
      const i = r.int(c.length)
      return c.slice(0, i) + r.pick(['A', '_', '-', '=', '+', '/', '%', '']) + c.slice(i + 1)
    }
    case 3:
      return r.pick(known.cursors).repeat(r.range(2, 200))
    case 4:
      return b64(['9999-12-31T23:59:59.999Z', `at://${r.pick(known.dids)}/${r.string(8)}`])
    case 5:
      return String(r.pick([-1, 0, 1.5, 2 ** 63, 'NaN', '1e309', '-0']))
    default:
      return 'A'.repeat(r.pick([2049, 4096, 12_000]))
  }
}

/** A query string for a method: its parameters (valid or not), repeated, unknown or malformed ones. */
function queryString(r: Rng, nsid: string): string {
  const props = ((lexicons.getDef(nsid) as { parameters?: { properties?: Record<string, any> } } | undefined)?.parameters?.properties ?? {}) as Record<string, Record<string, any>>
  const pairs: string[] = []
  for (const [name, def] of Object.entries(props)) {
    if (!r.chance(0.75)) continue
    const times = r.chance(0.15) ? r.range(2, 4) : 1
    for (let i = 0; i < times; i++) {
      const item = def.type === 'array' ? def.items ?? { type: 'string' } : def
      const v = r.chance(0.45) ? String(validScalar(r, item, name)) : nastyText(r)
      pairs.push(`${r.chance(0.05) ? enc(name.toUpperCase()) : name}=${enc(v)}`)
    }
  }
  if (r.chance(0.2)) pairs.push(`${enc(r.pick(['foo', '__proto__', 'constructor', r.string(r.range(1, 8))]))}=${enc(nastyText(r))}`)
  if (r.chance(0.1)) pairs.push(r.pick(RAW_QUERY))
  r.chance(0.5) && pairs.sort(() => (r.chance(0.5) ? 1 : -1))
  return pairs.join('&')
}

/**
 * A JSON value for a lexicon definition. `p` is the chance that any one node
 * is garbage (or a required field missing): at 0 the value is valid, so the
 * handler behind the validator runs; small values break one or two things.
 */
function jsonFor(r: Rng, def: Record<string, any>, nsid: string, name: string, p: number, depth = 0): unknown {
  if (r.chance(p)) return r.chance(0.5) ? r.pick(NASTY_JSON) : nastyText(r)
  switch (def.type) {
    case 'ref': {
      const ref = String(def.ref)
      const resolved = lexicons.getDef(ref.startsWith('#') ? `${nsid}${ref}` : ref) as Record<string, any> | undefined
      return resolved && depth < 6 ? jsonFor(r, resolved, ref.startsWith('#') ? nsid : ref.split('#')[0]!, name, p, depth + 1) : {}
    }
    case 'union':
      return def.refs?.length ? jsonFor(r, { type: 'ref', ref: r.pick(def.refs) }, nsid, name, p, depth + 1) : {}
    case 'object': {
      const out: Record<string, unknown> = {}
      const required = new Set<string>(def.required ?? [])
      for (const [k, v] of Object.entries<Record<string, any>>(def.properties ?? {})) {
        if (required.has(k) ? !r.chance(p) : r.chance(p === 0 ? 0.2 : 0.4)) out[k] = jsonFor(r, v, nsid, k, p, depth + 1)
      }
      if (r.chance(p)) out[r.pick(['extra', '$type', '__proto__', r.string(4)])] = r.pick(NASTY_JSON)
      return out
    }
    case 'array': {
      const min = def.minLength ?? 0
      const n = r.chance(p) ? r.range(0, 300) : r.range(min, Math.max(min, Math.min(def.maxLength ?? 3, 3)))
      return Array.from({ length: n }, () => jsonFor(r, def.items ?? { type: 'unknown' }, nsid, name, p, depth + 1))
    }
    case 'integer':
      return !r.chance(p * 3) ? validScalar(r, def, name) : r.pick([-1, 0, 1.5, 2 ** 53, -(2 ** 53), 1e300, (def.maximum ?? 0) + 1, (def.minimum ?? 0) - 1])
    case 'string':
      return !r.chance(p * 3) ? validScalar(r, def, name) : nastyText(r)
    case 'boolean':
      return !r.chance(p) ? r.chance(0.5) : r.pick(['true', 1, null])
    default:
      return r.chance(0.5) ? {} : r.pick(NASTY_JSON)
  }
}

/** Deeply nested JSON (recursive parsers and validators must not blow their stack). */
const deep = (n: number, open = '[', close = ']') => open.repeat(n) + close.repeat(n)

const BAD_TYPES = ['text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'multipart/form-data', 'application/json; charset=latin1', 'APPLICATION/JSON', 'application/jsonx', 'application/json;;;', '*/*', 'x'.repeat(2000), 'application/cbor']

/** A request body and its headers: JSON of the method's shape, or broken in one of many ways. */
function bodyFor(r: Rng, value: () => unknown): { body?: Buffer | string; headers: Record<string, string>; chunked?: boolean } {
  const json = { 'content-type': 'application/json' }
  // Half the bodies are well-formed JSON, so what the method does with them is fuzzed too.
  if (r.chance(0.5)) return { body: JSON.stringify(value()), headers: json }
  switch (r.int(14)) {
    case 0:
      return { headers: json }
    case 1:
      return { body: '', headers: json }
    case 2:
      return { body: JSON.stringify(value()).slice(0, -1 - r.int(3)), headers: json }
    case 3:
      return { body: Buffer.from(r.bytes(r.range(1, 300))), headers: json }
    case 4:
      return { body: Buffer.concat([Buffer.from('{"name":"'), Buffer.from([0xff, 0xfe, 0xed, 0xa0, 0x80]), Buffer.from('"}')]), headers: json }
    case 5:
      return { body: r.pick(['null', '[]', '"str"', '1e309', '-0', 'true', '{"a":1}{"b":2}', '{"__proto__":{"x":1}}', '\ufeff{}', '{"a":1,"a":2}']), headers: json }
    case 6:
      return { body: JSON.stringify(value()), headers: { 'content-type': r.pick(BAD_TYPES) } }
    case 7:
      return { body: JSON.stringify(value()), headers: {} }
    case 8: {
      // Oversized: past any limit, declared or streamed.
      const size = r.pick([300 * 1024, 5 << 20, 10 << 20])
      const chunked = r.chance(0.5)
      return { body: `{"x":"${'a'.repeat(size)}"}`, headers: json, chunked }
    }
    case 10:
      // A body that says it is compressed, and is not.
      return { body: JSON.stringify(value()), headers: { ...json, 'content-encoding': r.pick(['gzip', 'br', 'deflate', 'x-garbage']) } }
    case 9:
      return { body: r.chance(0.5) ? deep(r.pick([1000, 50_000, 120_000])) : deep(r.pick([1000, 20_000, 60_000]), '{"a":', '}').replace(/\}$/, '1}'), headers: json }
    default:
      return { body: JSON.stringify(value()), headers: json }
  }
}

/** A seeded generator per target, so adding a method does not change the cases of the others. */
function rngFor(...parts: string[]): Rng {
  let h = seed >>> 0
  for (const ch of parts.join('\u0000')) h = Math.imul(h ^ ch.codePointAt(0)!, 0x01000193) >>> 0
  return rng(h)
}

// ---------------------------------------------------------------------------
// The stack.

let net: LocalNetwork
let av: AppView
let svc: ConsoleService
let browser: Browser
let provider: ProviderAgent
let alice: LocalAccount
let bob: LocalAccount
let market: LocalAccount
let rig: LocalAccount
let cookie: string
let apiKey: string
let readKey: string
/** A key of an account that never signed in: the console holds no PDS session to publish its jobs with. */
let bobKey: string

/** Every query and procedure the lexicons define. */
const methods = schemas.flatMap((doc) => {
  const t = (doc.defs.main as { type?: string } | undefined)?.type
  return t === 'query' || t === 'procedure' ? [{ nsid: doc.id, type: t }] : []
})

let stack: Stack

beforeAll(async () => {
  const started = await startStack({
    accounts: ['alice.test', 'bob.test', 'market.test', 'rig.test'],
    console: ([, , market], av, net) => ({
      index: av.consoleIndex(),
      exchangeDid: market.did,
      exchangeAccount: { pdsUrl: net.pdsUrl, identifier: market.handle, password: market.password },
      settleEveryMs: 200,
      // The fuzzer is one client sending thousands of requests: limits would only turn cases into 429s.
      apiKeyRatePerMinute: 1e9,
      apiKeyIpRatePerMinute: 1e9,
      apiKeyIpFailuresPerMinute: 1e9,
      loginRatePerMinute: 1e9,
      // Long runs send millions of tokens in a day.
      dailyTokenLimit: 1e15,
    }),
  })
  stack = started
  ;({ net, av, svc, browser, accounts: [alice, bob, market, rig] } = started)
  const page = await signInWithBrowser(browser, svc.url, alice.handle, alice.password)
  cookie = await sessionCookie(page)
  await page.close()
  apiKey = new ApiKeys(svc.db).create(alice.did, 'fuzz', [...SCOPES]).secret
  readKey = new ApiKeys(svc.db).create(alice.did, 'fuzz-read', ['read']).secret
  bobKey = new ApiKeys(svc.db).create(bob.did, 'fuzz-bob', [...SCOPES]).secret
  await putRecord(alice.agent, alice.did, profile('Alice'), 'self')
  await putRecord(alice.agent, alice.did, friend(bob.did))
  provider = await startBuiltinAgent(net.pdsUrl, rig, { url: svc.url, did: market.did })
  // One real job, so receipts and a settlement exist for the verify methods and cursors to name.
  const res = await fetch(`${svc.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'builtin', messages: [{ role: 'user', content: 'seed' }] }),
  })
  expect(res.status).toBe(200)
  await waitFor(() => av.db.$client.prepare(`SELECT 1 FROM records WHERE collection = 'dev.cocore.compute.settlement'`).get(), 'a settlement indexed', 60_000)
  await refreshKnown()
}, 180_000)

/** Values the generators draw valid ones from: the accounts, and every record the AppView has indexed. */
async function refreshKnown(): Promise<void> {
  await waitCaughtUp(av, net)
  const rows = av.db.$client.prepare('SELECT uri, sort_at AS sortAt FROM records').all() as { uri: string; sortAt: string }[]
  known = {
    dids: [alice.did, bob.did, market.did, rig.did, 'did:plc:aaaaaaaaaaaaaaaaaaaaaaaa', 'did:web:example.com'],
    handles: [alice.handle, bob.handle, 'nobody.test'],
    uris: rows.map((r) => r.uri),
    cursors: [...rows.map((r) => encodeCursor([r.sortAt, r.uri])), '1', '100'],
    models: ['builtin', 'no-such-model'],
    provider: svc.gateway!.connected('builtin').map((p) => ({ did: p.did, encryptionPubKey: p.encryptionPubKey }))[0]!,
  }
}

afterAll(async () => {
  console.log(`fuzz-http: ${counted} requests (seed ${seed}, ${cases} cases per target): ${JSON.stringify(tally)}; statuses ${JSON.stringify(statuses)}; events ${JSON.stringify(events)}`)
  agent.destroy()
  await provider?.stop()
  await stack?.close()
})

/** Failures of the current test, at most one per target and kind of failure (a broken handler fails many cases alike). */
let failures = new Map<string, string>()

/**
 * Cases in flight at once: the servers see concurrent clients, as they do in
 * use. The cases themselves are drawn in order, so a seed still names them.
 */
const CONCURRENCY = 4
const inFlight = new Set<Promise<void>>()

/** Sends a case once fewer than CONCURRENCY are in flight; its verdict lands in `failures`. */
async function run(c: Case, base: string): Promise<void> {
  while (inFlight.size >= CONCURRENCY) await Promise.race(inFlight)
  const p: Promise<void> = runOne(c, base).finally(() => inFlight.delete(p))
  inFlight.add(p)
}

async function runOne(c: Case, base: string): Promise<void> {
  let res: Reply
  try {
    res = await send(base, c.req)
    judge(c, res)
  } catch (err) {
    const message = (err as Error).message
    // A body past every limit (4 MB) that the server stopped reading: it answers and closes, and the
    // close can reset the connection before the answer is read (TCP discards it). Nothing to judge.
    if (c.req.body !== undefined && Buffer.byteLength(c.req.body) > 4 << 20 && /aborted|ECONNRESET|EPIPE|socket hang up/.test(message)) {
      tally.resetOnOversizedBody = (tally.resetOnOversizedBody ?? 0) + 1
      return
    }
    const text = message.startsWith('no answer') || message.includes('\n') ? message : `no answer (${message})\n${describeCase(c)}`
    const key = `${c.surface} ${c.target} ${text.split('\n')[0]}`
    if (!failures.has(key)) failures.set(key, text)
  }
}

/** Every failure of the test (once its cases have all been answered), each with the seed and the request that reproduces it. */
async function expectNoFailures(): Promise<void> {
  await Promise.all(inFlight)
  const found = [...failures.values()]
  failures = new Map()
  expect(found.length, found.join('\n\n')).toBe(0)
}

// ---------------------------------------------------------------------------

/** A method another server implements is one MethodNotImplemented answer, whatever the input: fewer cases for it. */
const casesOf = (implemented: boolean) => (implemented ? cases : Math.ceil(cases / 4))

const METHODS = ['GET', 'POST', 'PUT', 'DELETE', 'PATCH', 'HEAD', 'OPTIONS']

/** One XRPC case for `nsid`: its right verb mostly, params and body fuzzed. */
function xrpcCase(r: Rng, surface: string, nsid: string, type: string, index: number, implemented: boolean, prefix = '/xrpc/'): Case {
  const def = lexicons.getDef(nsid) as Record<string, any>
  const method = r.chance(0.85) ? (type === 'query' ? 'GET' : 'POST') : r.pick(METHODS)
  const qs = queryString(r, nsid)
  const mangled = r.chance(0.03)
  const req: Req = { method, path: `${prefix}${mangled ? enc(nsid + r.pick(['.', '/', '%00', '..'])) : nsid}${qs ? `?${qs}` : ''}`, headers: {} }
  if (method === 'POST' || method === 'PUT' || method === 'PATCH' || r.chance(0.05)) {
    const schema = def.input?.schema ?? { type: 'object', properties: {} }
    const garbage = r.pick([0, 0, 0.02, 0.05, 0.2])
    const b = bodyFor(r, () => jsonFor(r, schema, nsid, 'input', garbage))
    req.body = b.body
    req.chunked = b.chunked
    Object.assign(req.headers!, b.headers)
  }
  return { surface, target: nsid, index, req, kind: 'xrpc', nsid, implemented: implemented && !mangled }
}

/** Credentials a console call may carry: none, garbage, a key, a read-only key, the session (with or without the right Origin). */
function consoleAuth(r: Rng): Record<string, string> {
  switch (r.int(10)) {
    case 0:
      return {}
    case 1:
      return { authorization: r.pick(['Bearer', 'Bearer ', `Bearer ${apiKey} x`, `Bearer ${apiKey.slice(0, -1)}x`, 'Basic YTpi', `Bearer ${'k'.repeat(5000)}`, `bearer ${apiKey}`, 'Bearer \u00ff\u00fe']) }
    case 2:
      return { cookie: r.pick(['cocore_session=', 'cocore_session=garbage', `${cookie}x`, 'cocore_session=%ED%A0%80', `cocore_session=${'a'.repeat(4000)}`]) }
    case 3:
      return { authorization: `Bearer ${r.chance(0.5) ? readKey : bobKey}` }
    case 4:
      return { cookie, origin: r.pick([svc.url, 'http://evil.example', 'null']) }
    default:
      return { authorization: `Bearer ${apiKey}` }
  }
}

describe('console XRPC', () => {
  it('answers every method, with and without credentials, with a result or an XRPC 4xx', async () => {
    const { handlers } = await import('../console/api/index.ts')
    for (const { nsid, type } of methods) {
      const r = rngFor('console', nsid)
      const implemented = Object.hasOwn(handlers, nsid)
      for (let i = 0; i < casesOf(implemented); i++) {
        const c = xrpcCase(r, 'console-xrpc', nsid, type, i, implemented, r.chance(0.2) ? '/api/xrpc/' : '/xrpc/')
        Object.assign(c.req.headers!, consoleAuth(r))
        await run(c, svc.url)
      }
    }
    await expectNoFailures()
  }, FUZZ_TIMEOUT_MS)
})

// ---------------------------------------------------------------------------
// The console's pages and the OpenAI-compatible API: their routes read from the apps themselves.

/** The routes an app registers (middleware excluded), as `METHOD path` pairs. */
function routesOf(app: { routes: { method: string; path: string }[] }): { method: string; path: string }[] {
  const seen = new Set<string>()
  return app.routes.filter((r) => r.method !== 'ALL' || !r.path.endsWith('*')).filter((r) => !seen.has(`${r.method} ${r.path}`) && seen.add(`${r.method} ${r.path}`))
}

/** Fills `:name` and `:name{a|b}` segments: a plausible value or garbage. */
function fillPath(r: Rng, pattern: string): string {
  return pattern
    .replace(/:(\w+)\{([^}]*)\}/g, (_, _name, alts: string) => (r.chance(0.8) ? r.pick(alts.split('|')) : enc(nastyText(r))))
    .replace(/:(\w+)/g, () => enc(r.chance(0.3) ? r.pick(['3lbzmzjs3wk2a', 'self', 'a'.repeat(64), Buffer.from(r.bytes(16)).toString('base64url')]) : nastyText(r)))
    .replace(/\*$/, () => enc(r.chance(0.5) ? r.pick(['console/browser/chat.ts', 'src/client/index.ts', '../../package.json', 'node_modules/@noble/hashes/sha2.js', '..%2f..%2fsecret.key']) : nastyText(r)))
}

/** Form fields the console's pages post (and some they do not). */
const FORM_FIELDS = ['identifier', 'displayName', 'bio', 'subject', 'note', 'desiredModels', 'active', 'shareLocation', 'proBono', 'name', 'scopes', 'expires', 'confirm', 'state', 'code']

function formValue(r: Rng, field: string): string {
  if (r.chance(0.5)) return nastyText(r)
  switch (field) {
    case 'identifier':
      return r.pick([...known.handles, ...known.dids, 'https://localhost:1', 'http://169.254.169.254', 'nobody.invalid'])
    case 'subject':
      return r.pick([...known.dids, ...known.handles, `@${bob.handle}`])
    case 'scopes':
      return r.pick([...SCOPES, 'admin'])
    case 'expires':
      return r.pick(['2030-01-01', '1999-01-01', '2030-02-31', '+275760-09-13', ''])
    case 'active':
    case 'shareLocation':
      return r.pick(['1', '0', 'on'])
    case 'proBono':
      return r.pick(['any', 'friends', 'none', ''])
    case 'confirm':
      return r.pick(['wipe', `wipe ${bob.handle}`, ''])
    default:
      return 'x'.repeat(r.range(1, 300))
  }
}

/** A form body: urlencoded or multipart (well-formed or not), or anything else. */
function formBody(r: Rng): { body?: Buffer | string; headers: Record<string, string>; chunked?: boolean } {
  const fields = FORM_FIELDS.filter(() => r.chance(0.4)).flatMap((f) => (r.chance(0.1) ? [f, f] : [f]))
  const pairs = fields.map((f) => [f, formValue(r, f)] as const)
  switch (r.int(8)) {
    case 0: {
      const boundary = `----fuzz${r.int(1e9)}`
      const parts = pairs.map(([k, v]) => `--${boundary}\r\nContent-Disposition: form-data; name="${k}"\r\n\r\n${v}\r\n`).join('')
      return { body: `${parts}--${boundary}--\r\n`, headers: { 'content-type': `multipart/form-data; boundary=${boundary}` } }
    }
    case 1:
      // A multipart body that does not match its boundary, or has none.
      return { body: r.pick(['--x\r\n\r\n', 'garbage', `--b\r\nContent-Disposition: form-data; name="identifier"\r\n\r\nalice`, '']), headers: { 'content-type': r.pick(['multipart/form-data; boundary=b', 'multipart/form-data', 'multipart/form-data; boundary=']) } }
    case 2:
      return { body: `a=${'x'.repeat(r.pick([70_000, 2 << 20]))}`, headers: { 'content-type': 'application/x-www-form-urlencoded' }, chunked: r.chance(0.5) }
    case 3:
      return { body: JSON.stringify(Object.fromEntries(pairs)), headers: { 'content-type': r.pick(['application/json', 'text/plain']) } }
    case 4:
      return { body: Buffer.from(r.bytes(r.range(0, 500))), headers: r.chance(0.5) ? { 'content-type': r.pick(BAD_TYPES) } : {} }
    case 5:
      return { body: r.pick(RAW_QUERY) + '&' + pairs.map(([k, v]) => `${k}=${enc(v)}`).join('&'), headers: { 'content-type': 'application/x-www-form-urlencoded' } }
    default:
      return { body: pairs.map(([k, v]) => `${enc(k)}=${enc(v)}`).join('&'), headers: { 'content-type': 'application/x-www-form-urlencoded' } }
  }
}

/** Ends the session (or every session): fuzzed only without one, so the rest keeps its session. */
const SESSION_ENDING = new Set(['/logout', '/logout-everywhere'])

describe('console pages', () => {
  it('answer garbage forms, paths and query strings with a page and a 2xx, 3xx or 4xx, signed in or not', async () => {
    const { MODULES_PATH } = await import('../console/browser-modules.ts')
    // Built only to read its route table: nothing here is called.
    const app = createConsoleApp({ consoleUrl: svc.url, appviewUrl: av.url, secureCookies: false } as unknown as ConsoleDeps)
    const routes = routesOf(app).filter((r) => !r.path.startsWith('/xrpc/') && !r.path.startsWith('/api/xrpc/'))
    expect(routes.length).toBeGreaterThan(20)
    for (const route of routes) {
      const r = rngFor('pages', route.method, route.path)
      for (let i = 0; i < cases; i++) {
        const method = r.chance(0.9) ? (route.method === 'ALL' ? r.pick(METHODS) : route.method) : r.pick(METHODS)
        const signedIn = !SESSION_ENDING.has(route.path) && r.chance(0.7)
        const headers: Record<string, string> = {}
        if (signedIn) headers.cookie = cookie
        else if (r.chance(0.2)) headers.cookie = r.pick(['cocore_session=garbage', 'cocore_oauth_binding=x', `cocore_session=${'a'.repeat(3000)}`])
        if (method !== 'GET' && method !== 'HEAD' && r.chance(0.85)) headers.origin = svc.url
        else if (r.chance(0.3)) headers.origin = r.pick(['http://evil.example', 'null', svc.url.replace('127.0.0.1', 'localhost')])
        const query = r.chance(0.3) ? `?${[...FORM_FIELDS, 'saved', 'error', 'iss'].filter(() => r.chance(0.3)).map((f) => `${f}=${enc(nastyText(r))}`).join('&')}${r.chance(0.2) ? r.pick(RAW_QUERY) : ''}` : ''
        const req: Req = { method, path: fillPath(r, route.path) + query, headers }
        if (method === 'POST' || method === 'PUT' || method === 'PATCH') {
          const b = formBody(r)
          req.body = b.body
          req.chunked = b.chunked
          Object.assign(headers, b.headers)
        }
        await run({ surface: 'console-pages', target: `${route.method} ${route.path}`, index: i, req, kind: 'page', source: route.path.startsWith(MODULES_PATH) }, svc.url)
      }
    }
    await expectNoFailures()
    // The session survived the fuzzing (nothing above may end it), so the signed-in cases ran signed in.
    expect((await send(svc.url, { method: 'GET', path: '/keys', headers: { cookie } })).status).toBe(200)
  }, FUZZ_TIMEOUT_MS)
})

/** A 1x1 PNG. */
const PNG_DATA_URL = 'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=='

/** An OpenAI chat request; `p` is the chance that any one field is of the wrong type or out of range (0: a valid request). */
function chatBody(r: Rng, p: number): unknown {
  const nasty = () => (r.chance(0.5) ? r.pick(NASTY_JSON) : nastyText(r))
  const maybe = (good: () => unknown) => (r.chance(p) ? nasty() : good())
  const message = () =>
    !r.chance(p)
      ? {
          role: maybe(() => r.pick(['system', 'developer', 'user', 'assistant', 'user'])),
          content: maybe(() => {
            if (r.chance(0.02)) return 'word '.repeat(r.pick([100_000, 700_000])) // up to 3.5 MB: under the body limit, over most others
            if (r.chance(0.2)) return Array.from({ length: r.range(0, 50) }, () => ({ type: r.pick(['text', 'text', 'image_url']), text: r.chance(0.9) ? 'hi ' : nasty() }))
            if (r.chance(0.1)) return [{ type: 'text', text: 'what is it?' }, { type: 'image_url', image_url: { url: maybe(() => r.pick([PNG_DATA_URL, 'data:image/png;base64,', 'data:text/plain;base64,aGk=', 'http://127.0.0.1:1/x.png', 'ftp://x'])) } }]
            return r.chance(0.7) ? r.pick(['hello', 'a b c', SCRIPT]) : r.string(r.range(0, 200))
          }),
          // A tool-calling conversation's fields, on any role.
          ...(r.chance(0.05) ? { tool_calls: maybe(() => [{ id: 'call_1', type: 'function', function: { name: 'lookup', arguments: '{"q":"x"}' } }]) } : {}),
          ...(r.chance(0.05) ? { role: 'tool', tool_call_id: maybe(() => 'call_1') } : {}),
        }
      : nasty()
  const body: Record<string, unknown> = {
    model: maybe(() => (r.chance(0.8) ? 'builtin' : r.pick(known.models))),
    messages: maybe(() => Array.from({ length: r.chance(0.05) ? r.range(200, 2000) : r.range(1, 3) }, message)),
  }
  const optional: Record<string, () => unknown> = {
    max_tokens: () => r.pick([1, 16, 2_000_000]),
    max_completion_tokens: () => r.pick([1, 64]),
    temperature: () => r.pick([0, 0.7, 2]),
    top_p: () => r.pick([0, 1, 0.5]),
    seed: () => r.int(1000),
    stop: () => r.pick(['.', ['a', 'b'], []]),
    stream: () => r.chance(0.5),
    stream_options: () => ({ include_usage: r.chance(0.5) }),
    n: () => 1,
    country: () => r.pick(['DE', 'us']),
    min_provider_version: () => r.pick(['0.1.0', '99']),
    tools: () => r.pick([null, [], [{ type: 'function', function: { name: 'lookup', description: 'd', parameters: { type: 'object', properties: { q: { type: 'string', minLength: 1 } } } } }], [{ type: 'function', function: { name: 'f', parameters: { maximum: 0.5 } } }]]),
    tool_choice: () => r.pick(['auto', 'none', 'required', { type: 'function', function: { name: 'lookup' } }, { type: 'function' }]),
    response_format: () => r.pick([{ type: 'text' }, { type: 'json_object' }, { type: 'json_schema', json_schema: { name: 'a', strict: true, schema: { type: 'object' } } }, { type: 'json_schema', json_schema: { name: 'a', schema: { $link: 'x' } } }]),
    min_trust: () => r.pick(['hardware-attested', 'confidential', 'none']),
    parallel_tool_calls: () => r.chance(0.5),
    user: () => 'u',
  }
  for (const [k, good] of Object.entries(optional)) if (r.chance(0.15)) body[k] = maybe(good)
  return body
}

describe('OpenAI-compatible API', () => {
  it('answers every endpoint, whatever the key and body, with a result or an OpenAI error object', async () => {
    const { openAiRoutes } = await import('../console/exchange/openai.ts')
    const { TIERS } = await import('../console/exchange/exchange.ts')
    const routes = routesOf(openAiRoutes({} as never))
    expect(routes.length).toBeGreaterThan(3)
    for (const route of routes) {
      const r = rngFor('openai', route.method, route.path)
      for (let i = 0; i < cases * 2; i++) {
        const method = r.chance(0.85) && route.method !== 'ALL' ? route.method : r.pick(METHODS)
        const auth = r.int(10)
        const headers: Record<string, string> =
          auth < 7 ? { authorization: `Bearer ${apiKey}` } : auth === 7 ? { authorization: `Bearer ${r.chance(0.5) ? readKey : bobKey}` } : auth === 8 ? {} : { authorization: r.pick(['Bearer', `Bearer ${apiKey}x`, `Basic ${apiKey}`, 'Bearer \u00ff']) }
        if (r.chance(0.1)) headers.cookie = cookie
        const path = route.path.replace(':tier', () => (r.chance(0.7) ? r.pick(TIERS) : enc(nastyText(r)))).replace(/\*$/, () => enc(nastyText(r)))
        const req: Req = { method, path: path + (r.chance(0.1) ? `?${queryString(r, 'none')}${r.pick(RAW_QUERY)}` : ''), headers }
        if (method !== 'GET' && method !== 'HEAD') {
          const garbage = r.pick([0, 0, 0.05, 0.15, 0.4])
          const b = bodyFor(r, () => chatBody(r, garbage))
          req.body = b.body
          req.chunked = b.chunked
          Object.assign(headers, b.headers)
        }
        await run({ surface: 'openai', target: `${route.method} ${route.path}`, index: i, req, kind: 'openai' }, svc.url)
      }
    }
    await expectNoFailures()
  }, FUZZ_TIMEOUT_MS)
})

// Last of the fuzzers: by now the index also holds what the fuzzed pages and jobs published (odd
// profiles, friends, jobs, receipts, settlements), and its answers about them are checked too.
describe('AppView XRPC', () => {
  it('answers every method, whatever its params and bodies, with a result or an XRPC 4xx', async () => {
    await refreshKnown()
    const { handlers } = await import('../appview/api/index.ts')
    for (const { nsid, type } of methods) {
      const r = rngFor('appview', nsid)
      const implemented = Object.hasOwn(handlers, nsid)
      for (let i = 0; i < casesOf(implemented); i++) await run(xrpcCase(r, 'appview-xrpc', nsid, type, i, implemented), av.url)
    }
    await expectNoFailures()
  }, FUZZ_TIMEOUT_MS)

  it('refuses unknown methods and odd paths with JSON errors, and serves its other routes whatever the query', async () => {
    const r = rngFor('appview', 'paths')
    for (let i = 0; i < cases * 4; i++) {
      const path = r.pick(['/xrpc/', '/xrpc/dev.cocore.nope', `/xrpc/${enc(r.string(r.range(1, 30)))}`, `/xrpc/${enc(nastyText(r))}`, `/${enc(nastyText(r))}`, '/xrpc/..%2f..%2fhealth', '/xrpc/%ED%A0%80', `/xrpc/${'a.'.repeat(500)}b`])
      await run({ surface: 'appview-paths', target: 'paths', index: i, req: { method: r.pick(METHODS), path }, kind: 'xrpc', implemented: false }, av.url)
    }
    // Built only to read its route table.
    const { createApp } = await import('../appview/server.ts')
    const routes = routesOf(createApp({} as never)).filter((route) => !route.path.includes(':nsid'))
    expect(routes.length).toBeGreaterThan(2)
    for (const route of routes) {
      const rr = rngFor('appview', route.method, route.path)
      for (let i = 0; i < cases; i++) {
        const path = `${route.path}?${queryString(rr, 'none')}${rr.chance(0.5) ? `&${enc(nastyText(rr))}=${enc(nastyText(rr))}` : ''}${rr.chance(0.2) ? rr.pick(RAW_QUERY) : ''}`
        await run({ surface: 'appview-routes', target: `${route.method} ${route.path}`, index: i, req: { method: rr.chance(0.8) ? route.method : rr.pick(METHODS), path, headers: rr.chance(0.3) ? { host: rr.pick(['evil.example', 'a'.repeat(300), '[::1]:1', 'example.com:99999']) } : {} }, kind: route.path.startsWith('/xrpc/') ? 'xrpc' : 'page', implemented: false }, av.url)
      }
    }
    await expectNoFailures()
  }, FUZZ_TIMEOUT_MS)
})

/** What the fuzzing found, pinned as plain cases so each fix stays fixed whatever the seed. */
describe('regressions found by fuzzing', () => {
  const post = (path: string, body: string, contentType: string) => send(svc.url, { method: 'POST', path, headers: { cookie, origin: svc.url, 'content-type': contentType }, body })

  it('a form body that does not parse is a 400 page, not a 500', async () => {
    for (const path of ['/login', '/profile', '/friends', '/keys', '/account/wipe', '/machines/3lbzmzjs3wk2a']) {
      for (const type of ['multipart/form-data', 'multipart/form-data; boundary=', 'multipart/form-data; boundary=b']) {
        const res = await post(path, 'garbage', type)
        expect(res.status, `${path} ${type}`).toBe(400)
        expect(res.headers['content-type']).toMatch(/^text\/html/)
        expect(res.body).toContain('could not read this form')
      }
    }
  })

  it('a dispatch whose values would make an invalid job record is a 400 InvalidRequest, not a 500', async () => {
    const { ids } = await import('../src/lexicon/generated/ids.ts')
    const dispatch = (extra: Record<string, unknown>) =>
      send(svc.url, {
        method: 'POST',
        path: `/xrpc/${ids.InferenceDispatch}`,
        headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'builtin', prompt: 'hi', maxTokensOut: 16, priceCeiling: { amount: 1000, currency: 'CC' }, ...extra }),
      })
    const record = await dispatch({ maxTokensOut: 3_000_000 })
    expect(record.status).toBe(400)
    expect(JSON.parse(record.body)).toMatchObject({ error: 'InvalidRequest', message: expect.stringMatching(/^the job record would be invalid: /) })
    // A ceiling in another currency is refused before any record is built (this exchange settles in CC).
    const currency = await dispatch({ priceCeiling: { amount: 29, currency: 'aaaaaaaaa' } })
    expect(currency.status).toBe(400)
    expect(JSON.parse(currency.body)).toMatchObject({ error: 'InvalidCeiling', message: expect.stringMatching(/settles in CC only/) })
    // An integer past 2^53 passes the lexicon's integer check, but no record can hold it (its CID threw: 500).
    const huge = await send(svc.url, {
      method: 'POST',
      path: `/xrpc/${ids.InferenceDispatch}`,
      headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
      body: '{"model":"builtin","prompt":"hi","maxTokensOut":9007199254740994,"priceCeiling":{"amount":1000,"currency":"CC"}}',
    })
    expect(huge.status).toBe(400)
    expect(JSON.parse(huge.body)).toMatchObject({ error: 'InvalidRequest', message: expect.stringMatching(/53 bits/) })
    // Sealed by the requester to the provider's published key, but not openable: the provider refuses it, and that is the request's fault.
    const garbled = await dispatch({
      prompt: 'sealed',
      sealed: {
        scheme: 'x25519',
        inputCommitment: 'a'.repeat(64),
        envelopes: [{ providerDid: known.provider.did, encryptionPubKey: known.provider.encryptionPubKey, ephemeralPubKey: Buffer.alloc(32, 9).toString('base64'), ciphertext: Buffer.alloc(64, 1).toString('base64') }],
      },
    })
    expect(garbled.status, garbled.body).toBe(400)
    expect(JSON.parse(garbled.body)).toMatchObject({ error: 'SealedInputRefused', message: expect.stringMatching(/decrypt_failed/) })
    // The same request with valid values streams a reply.
    const ok = await dispatch({})
    expect(ok.status).toBe(200)
    expect(ok.body).toMatch(/event: complete/)
  })

  it('a prompt just under the 4 MB body limit is sealed, opened by the provider and answered (its base64 check ran out of stack: 503)', async () => {
    const content = 'word '.repeat(800_000)
    const res = await send(svc.url, {
      method: 'POST',
      path: '/v1/chat/completions',
      headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'builtin', messages: [{ role: 'user', content }], max_tokens: 8 }),
    })
    expect(res.status, res.body.slice(0, 300)).toBe(200)
    expect(JSON.parse(res.body)).toMatchObject({ object: 'chat.completion', choices: [{ message: { content: expect.stringMatching(/^You said: word word /) } }] })
  })

  it('an API key name is limited as its lexicon limits it (UTF-8 bytes, no lone surrogates), so listApiKeys never answers one it refuses', async () => {
    const { ids } = await import('../src/lexicon/generated/ids.ts')
    // 60 characters, 120 bytes: the keys page took it (it counted UTF-16 units), and listApiKeys then answered 500 for good.
    const res = await post('/keys', `name=${enc('é'.repeat(60))}&scopes=read`, 'application/x-www-form-urlencoded')
    expect(res.status).toBe(400)
    expect(res.body).toContain('1 to 100 bytes')
    // 30 lone surrogates in JSON escapes: 90 bytes as the lexicon counts them, but SQLite keeps each as
    // three bytes that read back as three replacement characters (270 bytes): the name came back too long.
    const lone = await send(svc.url, {
      method: 'POST',
      path: `/xrpc/${ids.AccountCreateApiKey}`,
      headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
      body: `{"name":"${'\\ud800'.repeat(30)}"}`,
    })
    expect(lone.status, lone.body).toBe(400)
    expect(JSON.parse(lone.body)).toMatchObject({ error: 'InvalidRequest', message: expect.stringMatching(/valid Unicode/) })
    const list = await send(svc.url, { method: 'GET', path: `/xrpc/${ids.AccountListApiKeys}`, headers: { authorization: `Bearer ${apiKey}` } })
    expect(list.status, list.body.slice(0, 300)).toBe(200)
    expect(() => lexicons.assertValidXrpcOutput(ids.AccountListApiKeys, JSON.parse(list.body))).not.toThrow()
  })

  it('profile saves that race each other are saved or refused as a conflict (409), never a 500', async () => {
    // Each save is conditional on the version it read: saves sent together find it changed under them.
    const answers = await Promise.all(Array.from({ length: 8 }, (_, i) => post('/profile', `displayName=racer+${i}&bio=`, 'application/x-www-form-urlencoded')))
    for (const a of answers) {
      expect([200, 409], a.body.slice(0, 300)).toContain(a.status)
      if (a.status === 409) expect(a.body).toContain('changed while you were editing it')
    }
    expect(answers.some((a) => a.status === 200)).toBe(true)
  })

  it('a path segment that is not a record key is a 404 page, not a 500 from the PDS client', async () => {
    for (const rkey of ['a%20b', '%5B1%2C2%5D', 'did%3Aplc%3Ax%00', `${'A'.repeat(600)}`]) {
      const machine = await post(`/machines/${rkey}`, 'active=1', 'application/x-www-form-urlencoded')
      expect(machine.status, rkey).toBe(404)
      expect(machine.body).toContain('No such machine of yours')
      const friendRemoved = await post(`/friends/${rkey}/remove`, '', 'application/x-www-form-urlencoded')
      expect(friendRemoved.status, rkey).toBe(404)
      expect(friendRemoved.body).toContain('No such friend of yours')
    }
  })
})

describe('bodies that never end', () => {
  /** Sends `size` bytes of a chunked body and never ends it: the answer must not wait for the end. */
  const endless = (base: string, path: string, headers: Record<string, string>, size: number) =>
    new Promise<number>((resolve, reject) => {
      const url = new URL(base)
      const r = httpRequest({ host: url.hostname, port: url.port, method: 'POST', path, headers: { 'content-type': 'application/json', ...headers }, agent: false }, (res) => {
        res.resume()
        resolve(res.statusCode!)
        r.destroy()
      })
      r.on('error', (err) => reject(err))
      r.write(`{"name":"${'a'.repeat(size)}`)
    })

  it('an XRPC procedure refuses an endless body once it passes the limit, without waiting for its end', async () => {
    const { MAX_INPUT_BYTES } = await import('../src/xrpc/server.ts')
    const { ids } = await import('../src/lexicon/generated/ids.ts')
    expect(await endless(svc.url, `/xrpc/${ids.AccountCreateApiKey}`, { authorization: `Bearer ${apiKey}` }, MAX_INPUT_BYTES + 1024)).toBe(413)
  })

  it('the OpenAI API and the pages do too', async () => {
    expect(await endless(svc.url, '/v1/chat/completions', { authorization: `Bearer ${apiKey}` }, (4 << 20) + 1024)).toBe(413)
    expect(await endless(svc.url, '/profile', { cookie, origin: svc.url, 'content-type': 'application/x-www-form-urlencoded' }, 65 * 1024)).toBe(413)
  })
})

// ---------------------------------------------------------------------------
// Requests that are barely HTTP, written to the socket as they are.

/** The raw answer to raw bytes: its status, or 0 when the server closed the connection without one. */
function sendRaw(base: string, bytes: Buffer): Promise<{ status: number; text: string }> {
  const url = new URL(base)
  return new Promise((resolve) => {
    const parts: Buffer[] = []
    const socket = netConnect(Number(url.port), url.hostname, () => socket.end(bytes))
    const done = () => {
      const text = Buffer.concat(parts).toString('latin1')
      resolve({ status: Number(/^HTTP\/1\.[01] (\d{3})/.exec(text)?.[1] ?? 0), text })
    }
    socket.on('data', (d: Buffer) => parts.push(d))
    socket.on('close', done)
    socket.on('error', () => {})
    socket.setTimeout(10_000, () => socket.destroy())
  })
}

/** The body of a raw answer is JSON, labelled so, and an XRPC or an OpenAI error object. */
function isServiceError(text: string): boolean {
  const split = text.indexOf('\r\n\r\n')
  if (split < 0 || !/\r\ncontent-type: application\/json/i.test(text.slice(0, split))) return false
  try {
    const body = JSON.parse(text.slice(split + 4)) as { error?: unknown; message?: unknown }
    return (typeof body.error === 'string' && typeof body.message === 'string') || isOpenAiError(body)
  } catch {
    return false
  }
}

function rawRequest(r: Rng, paths: string[]): Buffer {
  const method = r.pick(['GET', 'POST', 'get', 'FOO', 'CONNECT', 'TRACE', 'PRI', 'G\u00e9T'])
  const target = r.pick([...paths, 'http://evil.example/xrpc/x', `http://${r.pick(['127.0.0.1', 'evil.example', 'a b', ''])}${r.pick(paths)}`, '*', '/a\\b', '\\\\evil', '//evil.example/x', `/${'a'.repeat(20_000)}`, '/%', '/?%ZZ', 'xrpc/x', ''])
  const version = r.pick(['HTTP/1.1', 'HTTP/1.1', 'HTTP/1.0', 'HTTP/2.0', 'HTTP/9.9', 'HTTP/1.1 extra', ''])
  const headers: string[] = []
  if (r.chance(0.8)) headers.push(`Host: ${r.pick(['127.0.0.1', 'evil.example', 'a b', '[::1', 'x'.repeat(300), '', 'h:99999', 'h@evil'])}`)
  if (r.chance(0.2)) headers.push(`Host: second.example`)
  const body = r.chance(0.4) ? r.pick(['{}', '{"name":"x"}', 'a=1', 'x'.repeat(1000)]) : ''
  if (r.chance(0.2)) {
    // A WebSocket upgrade (the provider gateway takes /v1/agent), on any path, with any handshake.
    const path = r.pick(['/v1/agent', '/v1/agent?x=%', '/profile', '/xrpc/x', '//', '//[', 'http://[', '//a b', '/%ZZ', '*'])
    const hs = [`Host: 127.0.0.1`, `Upgrade: ${r.pick(['websocket', 'WebSocket', 'h2c', 'garbage'])}`, 'Connection: Upgrade']
    if (r.chance(0.7)) hs.push(`Sec-WebSocket-Key: ${r.pick(['dGhlIHNhbXBsZSBub25jZQ==', 'short', '', Buffer.from(r.bytes(16)).toString('base64')])}`)
    if (r.chance(0.7)) hs.push(`Sec-WebSocket-Version: ${r.pick(['13', '8', 'x', ''])}`)
    if (r.chance(0.3)) hs.push(`Authorization: ${r.pick(['Bearer x', `Bearer ${'a'.repeat(5000)}`, 'Basic x'])}`)
    return Buffer.from(`GET ${path} HTTP/1.1\r\n${hs.join('\r\n')}\r\n\r\n`, 'latin1')
  }
  switch (r.int(6)) {
    case 0:
      headers.push(`Content-Length: ${r.pick([String(body.length), '-1', '1e3', '99999999999999999999', 'abc', `${body.length}, ${body.length + 1}`, ''])}`)
      break
    case 1:
      headers.push('Transfer-Encoding: chunked', `Content-Length: ${body.length}`)
      break
    case 2:
      headers.push(`Transfer-Encoding: ${r.pick(['chunked', 'gzip, chunked', 'identity', 'xchunked'])}`)
      break
    case 3:
      for (let i = 0; i < r.pick([10, 200, 3000]); i++) headers.push(`X-H${i}: ${'v'.repeat(r.range(0, 40))}`)
      break
    case 4:
      headers.push(r.pick(['Bad Header: x', ': empty-name', 'X-Nul: a\u0000b', 'X-Fold: a\r\n folded', 'X-Long: ' + 'z'.repeat(20_000), 'Cookie: ' + 'c=1; '.repeat(2000)]))
      break
    default:
      break
  }
  headers.push('Connection: close')
  if (r.chance(0.05)) return Buffer.from(r.bytes(r.range(1, 2000)))
  if (r.chance(0.05)) return Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n')
  const chunkedBody = headers.some((h) => /chunked/.test(h)) && r.chance(0.5) ? `${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n` : body
  return Buffer.from(`${method} ${target} ${version}\r\n${headers.join('\r\n')}\r\n\r\n${chunkedBody}`, 'latin1')
}

describe('requests that are barely HTTP', () => {
  it('a WebSocket upgrade to a target that is no URL, or to a page, is answered and ends nothing (it used to throw in the upgrade listener, ending the process)', async () => {
    for (const target of ['//', '//[', 'http://[', '/profile', '/xrpc/x']) {
      const { status, text } = await sendRaw(svc.url, Buffer.from(`GET ${target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n`))
      expect(status, `${target}: ${text.slice(0, 200)}`).toBeGreaterThanOrEqual(200)
      expect(status, target).toBeLessThan(500)
    }
    expect((await send(svc.url, { method: 'GET', path: '/health' })).status).toBe(200)
  })

  it('refused before any route (by the HTTP parser, the adapter, the WebSocket handshake, CONNECT) are answered with an error object of the service, in the protocol of their path', async () => {
    const upgrade = 'Upgrade: websocket\r\nConnection: Upgrade'
    const cases: [base: string, request: string, status: number, shape: 'xrpc' | 'openai'][] = [
      [av.url, `GET /xrpc/${'a'.repeat(20_000)} HTTP/1.1\r\nHost: x\r\n\r\n`, 431, 'xrpc'],
      [svc.url, `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Long: ${'z'.repeat(20_000)}\r\n\r\n`, 431, 'openai'],
      [av.url, 'GET /xrpc/x HTTP/1.1\r\nHost: a b\r\n\r\n', 400, 'xrpc'],
      [svc.url, 'GET /v1/models HTTP/1.1\r\nHost: [::1\r\n\r\n', 400, 'openai'],
      [svc.url, 'GET * HTTP/1.1\r\nHost: x\r\n\r\n', 400, 'xrpc'],
      // HTTP/1.1 without Host (Node's own answer was an empty 400).
      [av.url, 'GET /xrpc/_health HTTP/1.1\r\nConnection: close\r\n\r\n', 400, 'xrpc'],
      [svc.url, 'POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 0\r\n\r\n', 400, 'openai'],
      [av.url, 'GET / HTTP/1.1\r\nBad Header: x\r\n\r\n', 400, 'xrpc'],
      [svc.url, 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n', 400, 'openai'],
      [av.url, 'CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n', 405, 'xrpc'],
      [svc.url, 'CONNECT /v1/models HTTP/1.1\r\nHost: x\r\n\r\n', 405, 'openai'],
      // The provider gateway's handshake refusals (ws's own are plain text): no key, a wrong version.
      [svc.url, `GET /v1/agent HTTP/1.1\r\nHost: x\r\n${upgrade}\r\nSec-WebSocket-Version: 13\r\n\r\n`, 400, 'xrpc'],
      [svc.url, `GET /v1/agent HTTP/1.1\r\nHost: x\r\n${upgrade}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 99\r\n\r\n`, 400, 'xrpc'],
    ]
    for (const [base, request, status, shape] of cases) {
      const { status: got, text } = await sendRaw(base, Buffer.from(request, 'latin1'))
      const what = `${JSON.stringify(request.slice(0, 120))} => ${JSON.stringify(text.slice(0, 400))}`
      expect(got, what).toBe(status)
      expect(isServiceError(text), what).toBe(true)
      const body = JSON.parse(text.slice(text.indexOf('\r\n\r\n') + 4)) as { error: unknown }
      expect(typeof body.error, what).toBe(shape === 'xrpc' ? 'string' : 'object')
    }
    // Both still serve.
    expect((await send(av.url, { method: 'GET', path: '/xrpc/_health' })).status).toBe(200)
    expect((await send(svc.url, { method: 'GET', path: '/health' })).status).toBe(200)
  })

  it('are refused with a 4xx carrying an XRPC or OpenAI error, never a 5xx or a stack trace, by the AppView and the console', async () => {
    const { ids } = await import('../src/lexicon/generated/ids.ts')
    const paths = [`/xrpc/${ids.ComputeListProviders}`, `/xrpc/${ids.AccountCreateApiKey}`, '/v1/chat/completions', '/profile', '/login', '/health']
    for (const [name, base] of [['appview', av.url], ['console', svc.url]] as const) {
      const r = rngFor('raw', name)
      for (let i = 0; i < cases * 4; i++) {
        const bytes = rawRequest(r, paths)
        const { status, text } = await sendRaw(base, bytes)
        counted++
        tally[`raw-${name}`] = (tally[`raw-${name}`] ?? 0) + 1
        const st = (statuses[`raw-${name}`] ??= {})
        st[status] = (st[status] ?? 0) + 1
        const where = `seed=${seed} raw-${name} case ${i}: ${JSON.stringify(bytes.toString('latin1').slice(0, 400))}\n=> ${JSON.stringify(text.slice(0, 600))}`
        if (status === 0) failures.set(`${name} no answer ${i}`, `raw request got no answer\n${where}`)
        // Every refusal carries an error object of the service, whichever layer refused (Node's parser, the
        // adapter, the WebSocket handshake, a route); the console's pages may answer as pages.
        if (status >= 400 && !(name === 'console' && /\r\ncontent-type: text\/html/i.test(text)) && !isServiceError(text)) failures.set(`${name} ${status} body ${i}`, `raw refusal without an XRPC or OpenAI error\n${where}`)
        // An unknown XRPC method is the one 5xx XRPC prescribes: 501 MethodNotImplemented.
        const unknownMethod = status === 501 && text.includes('"error":"MethodNotImplemented"')
        // A well-formed handshake to the provider gateway is accepted (the agent proves who it is in its first frame).
        const agentUpgrade = status === 101 && /^GET \/v1\/agent[ ?]/.test(bytes.toString('latin1'))
        if ((status >= 500 && !unknownMethod) || (status !== 0 && status < 200 && !agentUpgrade)) failures.set(`${name} ${status} ${i}`, `raw request answered ${status}\n${where}`)
        for (const leak of LEAKS) if (!leak.test(bytes.toString('latin1')) && leak.test(text)) failures.set(`${name} leak ${leak}`, `raw request answer leaks ${leak}\n${where}`)
      }
    }
    await expectNoFailures()
  }, FUZZ_TIMEOUT_MS)
})
