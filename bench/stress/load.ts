/**
 * The load of the stress run, as closed loops that stop at the end of the
 * run: XRPC readers paging through lists, streamed chat completions checked
 * against the engine's own answer, sign-ins in a browser, API-key calls. Every
 * request is a valid one: anything but its documented answer is an error,
 * counted by kind.
 */
import OpenAI from 'openai'
import type { Browser } from 'playwright-core'
import { ids, NSID_PREFIX } from '../../src/lexicon/generated/ids.ts'
import { BuiltinEngine } from '../../src/provider/engine.ts'
import { sessionCookie, signInWithBrowser } from '../../test/fixture/console.ts'
import type { Account } from './roles.ts'
import { MODEL } from './roles.ts'
import type { Tally } from './stats.ts'

export interface LoadContext {
  tally: Tally
  /** True once the run is over: loops finish the request in hand and return. */
  stopped(): boolean
  /** Resolves when the run is over (for pauses). */
  over: Promise<void>
}

/** Each request's own bound: a request still unanswered after this is an error (timeout). */
const REQUEST_TIMEOUT_MS = 60_000
/** A list is paged through at most this far before the reader starts on the next one. */
const MAX_PAGES = 10_000

const errorKind = (err: unknown): string => {
  const e = err as { name?: string; cause?: { code?: string } }
  return e.cause?.code ?? e.name ?? 'Error'
}
const message = (err: unknown) => (err instanceof Error ? err.message : String(err))

type Check = (status: number, body: unknown) => string | null

/** One HTTP request, timed and checked; the parsed body when it is the expected answer, else undefined (an error counted). */
async function request(ctx: LoadContext, kind: string, endpoint: string, url: string, init: RequestInit, check: Check): Promise<unknown> {
  const t0 = performance.now()
  let status: number
  let body: unknown
  let serverMs: number | undefined
  // A timer cleared with the answer: AbortSignal.timeout would keep every request's signal alive for the whole timeout.
  const abort = new AbortController()
  const timer = setTimeout(() => abort.abort(new Error(`no answer in ${REQUEST_TIMEOUT_MS} ms`)), REQUEST_TIMEOUT_MS)
  try {
    const res = await fetch(url, { ...init, signal: abort.signal })
    status = res.status
    serverMs = serverTiming(res.headers.get('server-timing'))
    const text = await res.text()
    try {
      body = JSON.parse(text)
    } catch {
      body = text
    }
  } catch (err) {
    ctx.tally.error(`${endpoint} ${abort.signal.aborted ? `timeout (${REQUEST_TIMEOUT_MS / 1000} s)` : errorKind(err)}`, message(err))
    return undefined
  } finally {
    clearTimeout(timer)
  }
  const ms = performance.now() - t0
  const problem = check(status, body)
  if (problem !== null) {
    const code = (body as { error?: unknown } | null)?.error
    const name = typeof code === 'string' ? code : typeof (code as { code?: unknown } | null)?.code === 'string' ? (code as { code: string }).code : problem
    ctx.tally.error(`${endpoint} ${status}/${name}`, `${problem}: ${typeof body === 'string' ? body : JSON.stringify(body)}`)
    return undefined
  }
  ctx.tally.ok(kind, endpoint, ms)
  // The server's own time for the same request (the AppView says it): the rest of `ms` is waiting.
  if (serverMs !== undefined) ctx.tally.time(`${endpoint} (in server)`, serverMs)
  return body
}

/** The `app` duration of a Server-Timing header, in ms. */
function serverTiming(header: string | null): number | undefined {
  const dur = header && /(?:^|,)\s*app;dur=([\d.]+)/.exec(header)?.[1]
  return dur ? Number(dur) : undefined
}

const expect200 =
  (field: string, limit?: number): Check =>
  (status, body) => {
    if (status !== 200) return 'status'
    const items = (body as Record<string, unknown> | null)?.[field]
    if (field && !Array.isArray(items)) return `no ${field} array`
    if (limit !== undefined && (items as unknown[]).length > limit) return `more than ${limit} items`
    const cursor = (body as { cursor?: unknown }).cursor
    if (cursor !== undefined && typeof cursor !== 'string') return 'cursor not a string'
    return null
  }

// ---- readers ------------------------------------------------------------------------

export interface ReadTarget {
  /** Which AppView and method, as the report names it. */
  label: string
  base: string
  nsid: string
  params: Record<string, string>
  /** The array the answer carries ('' for answers that are not lists). */
  field: string
  /** Page size; undefined for a method that is not paged. */
  limit?: number
}

/** The list methods of an AppView, paged through. */
export function readTargets(label: string, base: string, opts: { requesters: string[]; subjects: string[]; exchangeData: boolean }): ReadTarget[] {
  const t = (nsid: string, field: string, limit?: number, params: Record<string, string> = {}): ReadTarget => ({
    // 'exchange: compute.listJobs': which AppView, and the method without the common prefix.
    label: `${label}: ${nsid.slice(NSID_PREFIX.length)}`,
    base,
    nsid,
    params: limit === undefined ? params : { ...params, limit: String(limit) },
    field,
    limit,
  })
  const common = [
    t(ids.AccountListProfiles, 'profiles', 10),
    t(ids.AccountListAccounts, 'accounts', 10),
    t(ids.AccountListFriendEdges, 'edges', 50),
    ...opts.subjects.slice(0, 4).map((did) => t(ids.AccountListIncomingFriends, 'friends', 10, { did })),
  ]
  if (!opts.exchangeData) return common
  return [
    ...common,
    t(ids.ComputeListProviders, 'providers', 25),
    t(ids.ComputeListReceipts, 'receipts', 25),
    t(ids.ComputeListSettlements, 'settlements', 25),
    ...opts.requesters.map((did) => t(ids.ComputeListJobs, 'jobs', 25, { requester: did })),
    t(ids.ComputeModelActivity, 'models'),
    t(ids.ComputeLatency, ''),
  ]
}

/** A reader: pages through one list to its end, then the next, round the targets, until the run is over. */
export async function reader(ctx: LoadContext, targets: ReadTarget[], start: number): Promise<void> {
  for (let n = start; !ctx.stopped(); n++) {
    const target = targets[n % targets.length]!
    let cursor: string | undefined
    for (let page = 0; page < MAX_PAGES && !ctx.stopped(); page++) {
      const q = new URLSearchParams(target.params)
      if (cursor) q.set('cursor', cursor)
      const body = (await request(ctx, 'xrpc read', target.label, `${target.base}/xrpc/${target.nsid}?${q}`, {}, expect200(target.field, target.limit))) as { cursor?: string } | undefined
      cursor = body?.cursor
      if (!cursor || target.limit === undefined) break
    }
  }
}

// ---- chats ----------------------------------------------------------------------------

const engine = new BuiltinEngine()

/** Streamed chat completions, one after another, each checked against what the engine answers to the same prompt. */
export async function chatter(ctx: LoadContext, opts: { baseURL: string; apiKey: string; loop: number; maxTokens: number }): Promise<void> {
  const openai = new OpenAI({ baseURL: opts.baseURL, apiKey: opts.apiKey, maxRetries: 0, timeout: REQUEST_TIMEOUT_MS })
  for (let i = 0; !ctx.stopped(); i++) {
    const messages = [{ role: 'user' as const, content: `stress ${opts.loop}.${i}: tell me about rivers and the sea` }]
    const want = engine.plan({ model: MODEL, messages, maxTokens: opts.maxTokens, params: {} })
    const t0 = performance.now()
    let ttft = NaN
    let text = ''
    let finish: string | null = null
    try {
      const stream = await openai.chat.completions.create({ model: MODEL, messages, max_tokens: opts.maxTokens, stream: true })
      for await (const chunk of stream) {
        const choice = chunk.choices[0]
        const piece = choice?.delta?.content
        if (piece) {
          if (!text) ttft = performance.now() - t0
          text += piece
        }
        if (choice?.finish_reason) finish = choice.finish_reason
      }
    } catch (err) {
      const e = err as { status?: number; code?: string | null }
      ctx.tally.error(`chat ${e.status ?? 'stream'}/${e.code ?? errorKind(err)}`, message(err))
      continue
    }
    const total = performance.now() - t0
    if (text !== want.pieces.join('') || finish !== want.completion.finishReason) {
      ctx.tally.error('chat wrong-reply', `finish ${finish} (want ${want.completion.finishReason}); got ${JSON.stringify(text.slice(0, 120))}; want ${JSON.stringify(want.pieces.join('').slice(0, 120))}`)
      continue
    }
    ctx.tally.ok('chat', 'chat completion (stream end)', total)
    ctx.tally.time('chat TTFT', ttft)
  }
}

// ---- sign-ins and API keys --------------------------------------------------------

/** Sign-ins through the PDS in a browser, one at a time, one every `everyMs`, each in a fresh browser context. */
export async function signIns(ctx: LoadContext, opts: { browser: Browser; consoleUrl: string; accounts: Account[]; everyMs: number; onCookie(did: string, cookie: string): void }): Promise<void> {
  for (let i = 0; !ctx.stopped(); i++) {
    const account = opts.accounts[i % opts.accounts.length]!
    const t0 = performance.now()
    const context = await opts.browser.newContext()
    // The same bound as every other request (Playwright's own default is 30 s per step).
    context.setDefaultTimeout(REQUEST_TIMEOUT_MS)
    try {
      const page = await signInWithBrowser(context, opts.consoleUrl, account.handle, account.password)
      opts.onCookie(account.did, await sessionCookie(page))
      ctx.tally.ok('sign-in', 'sign-in (browser, PDS OAuth)', performance.now() - t0)
    } catch (err) {
      ctx.tally.error(`sign-in ${errorKind(err)}`, message(err))
    } finally {
      await context.close()
    }
    const wait = t0 + opts.everyMs - performance.now()
    if (wait > 0) {
      let timer: NodeJS.Timeout | undefined
      await Promise.race([ctx.over, new Promise((r) => (timer = setTimeout(r, wait)))])
      // A pause cut short by the end of the run must not keep the process alive.
      clearTimeout(timer)
    }
  }
}

/** Creates an API key with a console session (XRPC); returns its secret. */
export async function createKey(ctx: LoadContext, consoleUrl: string, cookie: string, name: string, scopes: string[]): Promise<{ id: string; secret: string } | undefined> {
  const body = (await request(ctx, 'api-key', 'createApiKey', `${consoleUrl}/xrpc/${ids.AccountCreateApiKey}`, post(consoleUrl, cookie, { name, scopes }), (s, b) =>
    s === 200 && typeof (b as { secret?: unknown }).secret === 'string' ? null : 'status',
  )) as { key: { id: string }; secret: string } | undefined
  return body && { id: body.key.id, secret: body.secret }
}

const post = (consoleUrl: string, cookie: string, input: unknown): RequestInit => ({
  method: 'POST',
  // A console session on XRPC: the cookie, and the Origin the CSRF check wants.
  headers: { cookie, origin: consoleUrl, 'content-type': 'application/json' },
  body: JSON.stringify(input),
})

/**
 * One key's life, again and again: created with a console session, used on
 * /v1/private/models (a keyed listing: /v1/models is public), listed, revoked, refused once revoked (401: the expected answer),
 * deleted. The sessions come from the sign-ins.
 */
export async function keyCalls(ctx: LoadContext, opts: { consoleUrl: string; loop: number; session(i: number): string }): Promise<void> {
  const { consoleUrl } = opts
  for (let i = 0; !ctx.stopped(); i++) {
    const cookie = opts.session(i)
    const key = await createKey(ctx, consoleUrl, cookie, `stress-${opts.loop}-${i}`, ['inference'])
    if (!key) continue
    const bearer = { headers: { authorization: `Bearer ${key.secret}` } }
    await request(ctx, 'api-key', 'GET /v1/private/models', `${consoleUrl}/v1/private/models`, bearer, (s, b) =>
      // The private tier lists friends' models only (none here): the key is what is exercised.
      s === 200 && Array.isArray((b as { data?: unknown }).data) ? null : 'status or no list',
    )
    await request(ctx, 'api-key', 'listApiKeys', `${consoleUrl}/xrpc/${ids.AccountListApiKeys}`, { headers: { cookie, origin: consoleUrl } }, (s, b) =>
      s === 200 && ((b as { keys?: { id: string }[] }).keys ?? []).some((k) => k.id === key.id) ? null : 'status or key not listed',
    )
    await request(ctx, 'api-key', 'revokeApiKey', `${consoleUrl}/xrpc/${ids.AccountRevokeApiKey}`, post(consoleUrl, cookie, { id: key.id }), (s, b) =>
      s === 200 && (b as { revoked?: unknown }).revoked === true ? null : 'status or not revoked',
    )
    await request(ctx, 'api-key', 'GET /v1/private/models, revoked key (401)', `${consoleUrl}/v1/private/models`, bearer, (s) => (s === 401 ? null : 'revoked key not refused'))
    await request(ctx, 'api-key', 'deleteApiKey', `${consoleUrl}/xrpc/${ids.AccountDeleteApiKey}`, post(consoleUrl, cookie, { id: key.id }), (s, b) =>
      s === 200 && (b as { deleted?: unknown }).deleted === true ? null : 'status or not deleted',
    )
  }
}
