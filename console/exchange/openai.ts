/**
 * The OpenAI-compatible API on the console port, as the network's console
 * serves it (packages/console/src/lib/openai-routes.server.ts), under `/v1`
 * and under its older mount `/api/v1`, the same handlers:
 *  - `POST .../chat/completions` (streamed or not) and the routing variants
 *    `.../{private,verified,probono}/chat/completions`;
 *  - `GET .../models`, public, in OpenAI's list shape or the network's
 *    `?view=directory` / `?view=summary`; `GET /v1/recommended-models`, public;
 *  - ours: `GET /v1/{private,verified,probono}/models`, what a tier offers you.
 * Completions take an API key with the `inference` scope, or a service-auth
 * JWT from the caller's PDS for `dev.cocore.inference.dispatch` (as on the
 * network); errors are OpenAI error objects with the network's codes.
 *
 * These endpoints receive plaintext by their nature. The prompt is sealed on
 * receipt to each provider tried, reply chunks are opened only to be written
 * to the response, and neither is logged or stored: they live in this
 * request's memory and nowhere else (test/exchange-privacy.test.ts).
 */
import { randomBytes } from 'node:crypto'
import { IncomingMessage, ServerResponse } from 'node:http'
import { RESPONSE_ALREADY_SENT } from '@hono/node-server/utils/response'
import { Hono, type Context, type MiddlewareHandler } from 'hono'
import { bodyLimit } from 'hono/body-limit'
import { ids } from '../../src/lexicon/generated/ids.ts'
import type { ComputeModelActivityOutput } from '../../src/lexicon/generated/types.ts'
import { consoleLogger as log } from '../../src/logger.ts'
import { encodeInput, inputCommitment } from '../../src/protocol/input.ts'
import { AuthRequiredError, RateLimitExceededError } from '../../src/xrpc/errors.ts'
import type { KeyGate } from '../api-keys.ts'
import { admitServiceAuth, isServiceAuthToken, type ServiceAuth } from '../service-auth.ts'
import { admit, AdmissionError, type InferenceDeps } from './admission.ts'
import { ExchangeError, TIERS, type ExchangeEvent, type Route, type Tier } from './exchange.ts'
import { OpenAiError, invalid } from './openai-error.ts'
import { directorySummary, modelDirectory, RECOMMENDED_MODELS, servesTools, type ProfileChip } from './openai-models.ts'
import { toolCallDeltas, ToolCallAssembler, xCocore, type ProviderCredit, type ReplyChannel } from './openai-reply.ts'
import { fetchImages, parseChatRequest } from './openai-request.ts'
import { ReceiptSealer } from './receipt-sealer.ts'

export { OpenAiError } from './openai-error.ts'

export interface OpenAiDeps extends InferenceDeps {
  gate: KeyGate
  /** The client address, as the console takes it (for the limits per address). */
  clientIp: (c: Context) => string | undefined
  /** Checks service-auth bearers (audience: the exchange's DID); absent, they are refused. */
  serviceAuth?: ServiceAuth
  /** Fetches `image_url` URLs (SSRF-safe in production); absent, only inline data: URLs are taken. */
  fetchImage?: typeof fetch
  /** What an account's profile record says of it (the provider credit, the directory's host chips). */
  profileOf?: (did: string) => ProfileChip | null
  /** Receipt activity per model (the directory view). */
  modelActivity?: () => ComputeModelActivityOutput
}

/** The mounts: OpenAI's layout, and the network's older one. */
const BASES = ['/v1', '/api/v1'] as const
/** A service-auth bearer names this method, as the network's console asks (one token for dispatch and the OpenAI API). */
const INFERENCE_LXM = ids.InferenceDispatch

/** Who is asking: an API key's owner, or a service-auth token's issuer (no key). */
interface Requester {
  did: string
  keyId: string | null
}

type Env = { Variables: { requester: Requester } }

const MAX_BODY_BYTES = 4 << 20

/** Headers of a streamed completion besides its content type. */
const API_STREAM_HEADERS = { 'cache-control': 'no-store', 'x-content-type-options': 'nosniff' }
const tooLarge = () => new OpenAiError(413, 'invalid_request_error', 'request_too_large', 'the request body is over 4 MB')
const unavailable = (code: string, message: string) => new OpenAiError(503, 'service_unavailable_error', code, message)

const fromAdmission = (err: AdmissionError) =>
  err.code === 'insufficient_quota' ? new OpenAiError(429, 'insufficient_quota', err.code, err.message) : new OpenAiError(403, 'permission_error', err.code, err.message)

/** The channel of a relayed chunk (absent: the answer). */
const channelOf = (e: Extract<ExchangeEvent, { kind: 'chunk' }>): ReplyChannel => (e as { channel?: ReplyChannel }).channel ?? 'content'

/** Node's request and response, when the app runs on @hono/node-server (not under app.request in tests). */
function nodeBindings(c: Context): { incoming: IncomingMessage; outgoing: ServerResponse } | null {
  const env = c.env as { incoming?: unknown; outgoing?: unknown } | undefined
  return env?.incoming instanceof IncomingMessage && env.outgoing instanceof ServerResponse ? (env as { incoming: IncomingMessage; outgoing: ServerResponse }) : null
}

/**
 * The JSON body. On Node's server, read straight from the request stream:
 * through the adapter's WHATWG Request (a Request object and two stream
 * wrappers per call) it took a few hundred microseconds of the job's path.
 */
async function readJson(c: Context): Promise<unknown> {
  const node = nodeBindings(c)
  // Read already (through the adapter's Request): its cached body.
  if (!node || node.incoming.readableDidRead) return c.req.json()
  const { incoming } = node
  if (Number(incoming.headers['content-length']) > MAX_BODY_BYTES) throw tooLarge()
  const text = await new Promise<string>((resolve, reject) => {
    const parts: Buffer[] = []
    let size = 0
    const done = (err: Error | null) => {
      incoming.off('data', onData).off('end', onEnd).off('error', done).off('close', onClose)
      if (err) reject(err)
      else resolve(Buffer.concat(parts, size).toString('utf8'))
    }
    const onData = (part: Buffer) => {
      size += part.length
      // Refused without reading on (the adapter drains the rest once the answer is sent).
      if (size > MAX_BODY_BYTES) done(tooLarge())
      else parts.push(part)
    }
    const onEnd = () => done(null)
    const onClose = () => done(Object.assign(new Error('the client closed the request before its body ended'), { name: 'AbortError' }))
    incoming.on('data', onData).once('end', onEnd).once('error', done).once('close', onClose)
  })
  return JSON.parse(text)
}

export function openAiRoutes(deps: OpenAiDeps): Hono<Env> {
  const app = new Hono<Env>()

  /**
   * An exchange refusal in the network's vocabulary: an unknown model is 404
   * `model_not_found` (503 `no_providers_connected` when nobody is
   * connected), what is only missing now (a country, a version, friends, pro
   * bono, capacity) a 503 to retry.
   */
  const fromExchange = (err: ExchangeError, did: string | undefined): OpenAiError => {
    switch (err.code) {
      case 'no_providers_for_model':
        if (deps.exchange.gateway.connected().length === 0) return unavailable('no_providers_connected', 'no provider is connected to this exchange now')
        return new OpenAiError(404, 'invalid_request_error', 'model_not_found', err.message, 'model')
      case 'no_providers_for_country':
      case 'no_providers_for_version':
      case 'verified_tier_unavailable':
        return unavailable(err.code, err.message)
      case 'no_private_providers':
        // No friend's machine serves anything: none to be had; some do, but not this model: as an unknown model.
        return did !== undefined && deps.exchange.models(did, 'private').length > 0
          ? new OpenAiError(404, 'invalid_request_error', 'no_friends_for_model', err.message, 'model')
          : unavailable('no_friends_available', `no provider whose owner lists you as a friend is connected (${err.message})`)
      case 'no_probono_providers':
        return unavailable('no_pro_bono_providers', `${err.message}; use /v1/chat/completions for a normal (billed) request`)
      case 'no_capacity':
        return unavailable('model_unavailable', err.message)
      case 'provider_not_connected':
        return unavailable('provider_offline', err.message)
      default:
        return new OpenAiError(err.status, err.status < 500 ? 'invalid_request_error' : err.status === 503 ? 'service_unavailable_error' : 'server_error', err.code, err.message)
    }
  }

  const toOpenAi = (err: unknown, did?: string): OpenAiError | null =>
    err instanceof OpenAiError ? err : err instanceof ExchangeError ? fromExchange(err, did) : err instanceof AdmissionError ? fromAdmission(err) : null

  app.onError((err, c) => {
    // The client went away before the reply began: nobody to answer.
    if (err.name === 'AbortError') return c.body(null, 499 as 400)
    const e = toOpenAi(err, c.get('requester')?.did)
    if (!e) {
      log.error('inference API error', { path: c.req.path, err })
      return c.json(new OpenAiError(500, 'server_error', 'internal_error', 'The exchange could not complete this request.').toJSON(), 500)
    }
    if (e.retryAfterSec !== undefined) c.header('Retry-After', String(e.retryAfterSec))
    return c.json(e.toJSON(), e.status as 400)
  })

  /** A service-auth token's issuer, for the inference method only. */
  const serviceAuthRequester = async (token: string, ip: string | undefined): Promise<Requester> => {
    try {
      return { did: await admitServiceAuth(deps.gate, deps.serviceAuth, token, INFERENCE_LXM, ip), keyId: null }
    } catch (err) {
      if (err instanceof RateLimitExceededError) throw new OpenAiError(429, 'rate_limit_error', 'rate_limit_exceeded', err.message, null, err.retryAfterSec)
      // Named as the network names its refusals (BadJwtAudience, JwtExpired, ...).
      if (err instanceof AuthRequiredError) throw new OpenAiError(401, 'authentication_error', err.error, `Invalid service-auth token: ${err.message}`)
      throw err
    }
  }

  // Every keyed call: the limits of its client address, a live key (one answer for every unusable key), then the key's limit.
  const authenticate: MiddlewareHandler<Env> = async (c, next) => {
    const ip = deps.clientIp(c)
    const header = c.req.header('authorization')
    const token = /^Bearer (\S+)$/.exec(header ?? '')?.[1]
    let requester: Requester
    if (token !== undefined && isServiceAuthToken(token)) requester = await serviceAuthRequester(token, ip)
    else {
      const key = deps.gate.admit(header, ip)
      if ('refused' in key) {
        if (key.refused === 'invalid') throw new OpenAiError(401, 'authentication_error', 'invalid_api_key', 'Invalid API key: send a console API key, or a service-auth token for dev.cocore.inference.dispatch, as "Authorization: Bearer <credential>"')
        const whose = key.refused === 'key' ? 'this API key' : 'this client address'
        throw new OpenAiError(429, 'rate_limit_error', 'rate_limit_exceeded', `Rate limit exceeded for ${whose}; retry after ${key.retryAfterSec} s`, null, key.retryAfterSec)
      }
      if (!key.scopes.includes('inference')) throw new OpenAiError(403, 'permission_error', 'missing_scope', 'this API key lacks the inference scope')
      requester = { did: key.did, keyId: key.id }
    }
    deps.usage.add(requester.did, requester.keyId, { requests: 1 })
    c.set('requester', requester)
    await next()
  }
  // Public listings: no credential is read (as on the network), the client address's limit applies.
  const publicLimit: MiddlewareHandler<Env> = async (c, next) => {
    const wait = deps.gate.admitAddress(deps.clientIp(c))
    if (wait > 0) throw new OpenAiError(429, 'rate_limit_error', 'rate_limit_exceeded', `Rate limit exceeded for this client address; retry after ${wait} s`, null, wait)
    await next()
  }
  // On Node's server the body is read (and limited) from the request stream itself, in the handler.
  const limitBody = bodyLimit({ maxSize: MAX_BODY_BYTES, onError: () => Promise.reject(tooLarge()) })
  const bodyLimited: MiddlewareHandler<Env> = (c, next) => (nodeBindings(c) ? next() : limitBody(c, next))

  const tierOf = (c: Context): Tier | undefined => {
    const t = c.req.param('tier')
    if (t === undefined) return undefined
    if (!(TIERS as readonly string[]).includes(t)) throw new OpenAiError(404, 'not_found_error', 'unknown_endpoint', `no such routing tier: ${t}`)
    return t as Tier
  }

  const publicModels = (c: Context<Env>) => {
    const view = c.req.query('view')
    let activity: ComputeModelActivityOutput | null = null
    try {
      activity = view === 'directory' ? (deps.modelActivity?.() ?? null) : null
    } catch (err) {
      log.warn('model activity unavailable', { err: err as Error })
    }
    const directory = modelDirectory(deps.exchange.gateway.connected(), { activity, profileOf: deps.profileOf })
    if (view === 'directory') return c.json(directory)
    if (view === 'summary') return c.json(directorySummary(directory))
    // OpenAI's shape: `created` is the freshest sighting of a machine serving the model.
    const data = directory.models.map((m) => ({ id: m.modelId, object: 'model', created: Math.floor(Date.parse(m.freshestAt ?? directory.generatedAt) / 1000), owned_by: 'cocore', providers: m.machineCount }))
    return c.json({ object: 'list', data })
  }
  const tierModels = (c: Context<Env>) => {
    const data = deps.exchange.models(c.get('requester').did, tierOf(c)).map((m) => ({ id: m.id, object: 'model', created: 0, owned_by: 'cocore', providers: m.providers }))
    return c.json({ object: 'list', data })
  }

  /** Who ran the job, from the machine that answered (its record's label) and its owner's profile. */
  const creditOf = (meta: Extract<ExchangeEvent, { kind: 'meta' }>): ProviderCredit => {
    const machine = deps.exchange.gateway.machinesOf(meta.providerDid).find((p) => p.encryptionPubKey === meta.encryptionPubKey)
    const label = machine?.record.body.machineLabel
    const profile = deps.profileOf?.(meta.providerDid) ?? null
    return { did: meta.providerDid, handle: profile?.handle ?? null, displayName: profile?.displayName ?? null, machineLabel: typeof label === 'string' && label ? label : null }
  }

  const completions = async (c: Context<Env>) => {
    const { did, keyId } = c.get('requester')
    let body: unknown
    try {
      body = await readJson(c)
    } catch (err) {
      if (err instanceof OpenAiError || (err as Error).name === 'AbortError') throw err
      throw invalid('the request body is not valid JSON', null, 'invalid_json')
    }
    const tier = tierOf(c)
    const req = parseChatRequest(body, tier)
    const route: Route = { model: req.model, requesterDid: did, tier, ...(req.country ? { country: req.country } : {}), ...(req.minProviderVersion ? { minProviderVersion: req.minProviderVersion } : {}) }
    admit(deps, did)
    // Fail fast on routing, before anything is fetched, sealed or published.
    const routable = deps.exchange.route(route)
    if (req.constraints?.tools) {
      // Only machines whose owners serve tools are tried (a job with tools is refused by the others).
      const capable = routable.filter((p) => servesTools(p, req.model))
      if (capable.length === 0) {
        const offered = [...new Set(deps.exchange.gateway.connected().flatMap((p) => p.models.filter((m) => servesTools(p, m))))].sort()
        const hint = offered.length ? ` Models with tool calling online now: ${offered.join(', ')}.` : ' No connected provider serves tool calling now.'
        throw new OpenAiError(400, 'invalid_request_error', 'tool_calls_not_supported', `No connected provider serves tool calling for model '${req.model}'.${hint} Switch to one of those models or retry without tools.`, 'tools')
      }
      route.onlyMachines = capable.map((p) => p.machine)
    }

    const ac = new AbortController()
    const node = nodeBindings(c)
    // The client went away before the reply ended (as the adapter decides it for its request's signal).
    if (node) node.outgoing.once('close', () => node.outgoing.writableFinished || ac.abort())
    else c.req.raw.signal.addEventListener('abort', () => ac.abort())
    await fetchImages(req, deps.fetchImage, ac.signal)
    const plaintext = encodeInput(req.messages)
    const sealer = new ReceiptSealer(plaintext)
    const events = deps.exchange.run({
      route,
      inputCommitment: inputCommitment(plaintext),
      inputFormat: 'messages-v1',
      inputBytes: plaintext.length,
      maxTokensOut: req.maxTokens,
      params: req.params,
      ...(req.constraints ? { constraints: req.constraints } : {}),
      signal: ac.signal,
      seal: sealer.seal,
    })
    const id = `chatcmpl-${randomBytes(12).toString('base64url')}`
    const created = Math.floor(Date.now() / 1000)
    let provider: { did: string; key: string } | null = null
    let meta: Extract<ExchangeEvent, { kind: 'meta' }> | null = null
    let credit: ProviderCredit | null = null
    const onMeta = (e: Extract<ExchangeEvent, { kind: 'meta' }>) => {
      meta = e
      provider = { did: e.providerDid, key: e.encryptionPubKey }
      credit = creditOf(e)
    }
    const open = (e: Extract<ExchangeEvent, { kind: 'chunk' }>): string => sealer.open(provider!, e.ciphertext, channelOf(e))
    const settle = (e: Extract<ExchangeEvent, { kind: 'complete' }>) => deps.usage.add(did, keyId, { tokensIn: e.tokensIn, tokensOut: e.tokensOut })
    const wipe = () => sealer.wipe()
    const usage = (e: Extract<ExchangeEvent, { kind: 'complete' }>) => ({ prompt_tokens: e.tokensIn, completion_tokens: e.tokensOut, total_tokens: e.tokensIn + e.tokensOut })
    // Ours (the job and receipt, kept for clients that read it), then the network's x_cocore.
    const whoRanIt = (e: Extract<ExchangeEvent, { kind: 'complete' }>) => ({ cocore: { provider: meta?.providerDid, job: meta?.jobUri, receipt: e.receiptUri ?? null }, ...xCocore(credit, e.receiptUri) })

    if (!req.stream) {
      let text = ''
      let reasoning = ''
      const calls = new ToolCallAssembler()
      try {
        for await (const e of events) {
          if (e.kind === 'meta') onMeta(e)
          else if (e.kind === 'chunk') {
            const piece = open(e)
            const channel = channelOf(e)
            if (channel === 'reasoning') reasoning += piece
            else if (channel === 'tool_call') {
              // A fragment that is no tool-call delta is left out, as on the network.
              const deltas = toolCallDeltas(piece)
              if (deltas) calls.add(deltas)
            } else text += piece
          } else {
            settle(e)
            const toolCalls = calls.calls()
            const message = {
              role: 'assistant',
              // OpenAI's form: a reply that only calls tools has no content.
              content: toolCalls.length && !text ? null : text,
              ...(reasoning ? { reasoning_content: reasoning } : {}),
              ...(toolCalls.length ? { tool_calls: toolCalls } : {}),
            }
            return c.json({
              id,
              object: 'chat.completion',
              created,
              model: req.model,
              choices: [{ index: 0, message, finish_reason: toolCalls.length ? 'tool_calls' : e.finishReason, logprobs: null }],
              usage: usage(e),
              ...whoRanIt(e),
            })
          }
        }
        throw new ExchangeError('provider_failed', 502, 'the job ended without completing')
      } finally {
        text = ''
        reasoning = ''
        wipe()
      }
    }

    // Pull the first event before answering, so routing and publishing errors are plain HTTP errors.
    const first = await events.next().catch((err: unknown) => {
      wipe()
      throw err
    })
    const encoder = new TextEncoder()
    const sse = (data: unknown) => `data: ${JSON.stringify(data)}\n\n`
    const chunk = (delta: Record<string, unknown>, finish: string | null, extra: Record<string, unknown> = {}) =>
      sse({ id, object: 'chat.completion.chunk', created, model: req.model, choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }], ...extra })
    let pending: IteratorResult<ExchangeEvent> | null = first
    let ended = false
    let calledTools = false
    const end = async () => {
      if (ended) return
      ended = true
      await events.return(undefined)
      wipe()
    }
    /**
     * The SSE text of the next event, or null once the reply has ended. The
     * role chunk (sent when a provider answers, with its first piece already
     * in hand) leaves together with that piece: one write, one wake-up of the
     * client, for the time to first token.
     */
    const nextText = async (): Promise<string | null> => {
      try {
        const next = pending ?? (await events.next())
        pending = null
        if (next.done) {
          await end()
          return null
        }
        const e = next.value
        if (e.kind === 'meta') {
          onMeta(e)
          return chunk({ role: 'assistant', content: '' }, null) + ((await nextText()) ?? '')
        }
        if (e.kind === 'chunk') {
          const piece = open(e)
          const channel = channelOf(e)
          // Reasoning rides delta.reasoning_content (the vLLM/DeepSeek convention, as on the network).
          if (channel === 'reasoning') return chunk({ reasoning_content: piece }, null)
          if (channel === 'content') return chunk({ content: piece }, null)
          const deltas = toolCallDeltas(piece)
          if (!deltas?.length) return nextText()
          calledTools = true
          return chunk({ tool_calls: deltas }, null)
        }
        settle(e)
        let text = chunk({}, calledTools ? 'tool_calls' : e.finishReason, whoRanIt(e))
        if (req.includeUsage) text += sse({ id, object: 'chat.completion.chunk', created, model: req.model, choices: [], usage: usage(e) })
        await end()
        return `${text}data: [DONE]\n\n`
      } catch (err) {
        if (ac.signal.aborted) {
          await end()
          return null
        }
        const e = toOpenAi(err, did) ?? new OpenAiError(500, 'server_error', 'internal_error', 'The exchange could not complete this request.')
        if (!(err instanceof OpenAiError || err instanceof ExchangeError)) log.error('inference stream error', { err: err as Error })
        await end()
        // Mid-stream, an error is an event carrying an OpenAI error object.
        return sse(e.toJSON())
      }
    }

    if (node) {
      // Written to Node's response directly: the headers leave with the first event in one write
      // (through the adapter they are flushed alone), and each event is one write, in order, waiting
      // for 'drain' when the client reads slowly, so a slow client holds the relay back. The headers
      // are those the console's middleware gives every response, which does not see this one.
      const out = node.outgoing
      out.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', ...API_STREAM_HEADERS })
      void (async () => {
        for (let text = await nextText(); text !== null; text = await nextText()) {
          if (out.destroyed) return void (await end())
          if (!out.write(text)) await new Promise((resolve) => (out.once('drain', resolve), out.once('close', resolve)))
        }
        out.end()
      })().catch((err: unknown) => {
        log.error('inference stream error', { err: err as Error })
        out.destroy()
      })
      return RESPONSE_ALREADY_SENT
    }
    c.header('Content-Type', 'text/event-stream; charset=utf-8')
    for (const [name, value] of Object.entries(API_STREAM_HEADERS)) c.header(name, value)
    // Pulled as the response is written, one event at a time: a slow client holds the relay back.
    const sseStream = new ReadableStream<Uint8Array>(
      {
        pull: async (controller) => {
          const text = await nextText()
          if (text === null) return controller.close()
          controller.enqueue(encoder.encode(text))
          if (ended) controller.close()
        },
        // The client went away.
        cancel: async () => {
          ac.abort()
          await end()
        },
      },
      { highWaterMark: 0 },
    )
    return c.body(sseStream)
  }

  for (const base of BASES) {
    app.get(`${base}/models`, publicLimit, publicModels)
    app.post(`${base}/chat/completions`, authenticate, bodyLimited, completions)
    app.post(`${base}/:tier/chat/completions`, authenticate, bodyLimited, completions)
  }
  app.get('/v1/recommended-models', publicLimit, (c) => c.json(RECOMMENDED_MODELS))
  app.get('/v1/:tier/models', authenticate, tierModels)
  for (const base of BASES) {
    app.all(`${base}/*`, (c) => c.json(new OpenAiError(404, 'not_found_error', 'unknown_endpoint', `no such endpoint: ${c.req.method} ${c.req.path.slice(0, 200)}`).toJSON(), 404))
  }
  return app
}
