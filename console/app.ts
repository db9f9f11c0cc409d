/**
 * The console's routes: OAuth sign-in, console sessions, activity log.
 * Every cookie-authenticated state change goes through the CSRF origin check.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto'
import { Hono, type Context } from 'hono'
import { bodyLimit } from 'hono/body-limit'
import { HTTPException } from 'hono/http-exception'
import { deleteCookie, getCookie, setCookie } from 'hono/cookie'
import type { NodeOAuthClient } from '@atproto/oauth-client-node'
import { isValidRecordKey } from '@atproto/syntax'
import { consoleLogger as log } from '../src/logger.ts'
import { xrpcErrorHandler, xrpcRouter } from '../src/xrpc/server.ts'
import { contextClientAddress, TrustedProxies } from '../src/net/client-address.ts'
import { authenticate, handlers } from './api/index.ts'
import type { ApiDeps } from './api/context.ts'
import { limitedAddress, type KeyGate, type RateLimiter } from './api-keys.ts'
import { confirmPairing, createKey, deleteKey, revokeKey, sessionCaller } from './api/key-actions.ts'
import { InvalidRequestError, NotFoundError, XrpcError } from '../src/xrpc/errors.ts'
import { OpenAiError } from './exchange/openai.ts'
import { CALLBACK_PATH, CLIENT_METADATA_PATH, JWKS_PATH } from './oauth/client.ts'
import type { stateStore } from './oauth/stores.ts'
import { browserModules, MODULES_PATH } from './browser-modules.ts'
import { accountPage, auditPage, chatPage, continueToPdsPage, dashboardPage, devicePage, errorPage, friendsPage, keysPage, machinesPage, profilePage, sessionsPage, signInPage, wipePage } from './pages.ts'
import type { Wiper } from './wipe.ts'
import { InvalidRecordError, type Publisher } from './publisher.ts'
import { SESSION_TTL_MS, type AuditLog, type ConsoleSession, type ConsoleSessions } from './sessions.ts'

export interface ConsoleDeps {
  oauth: NodeOAuthClient
  states: ReturnType<typeof stateStore>
  sessions: ConsoleSessions
  audit: AuditLog
  appviewUrl: string
  /** The console's own origin, for the CSRF check and cookie security. */
  consoleUrl: string
  /** production: `__Host-` cookies with Secure. */
  secureCookies: boolean
  /** Shown on the sign-in page in dev mode only. */
  demoAccounts?: { handle: string; password: string; role: string }[]
  api: ApiDeps
  /** API-key requests: limits per client address and per key (the inference API holds the same gate). */
  gate: KeyGate
  /** Sign-in attempts per client address. */
  loginLimiter: RateLimiter
  /** Forgets sign-ins in flight that were abandoned. */
  oauthStateGc: () => void
  publisher: Publisher
  wiper: Wiper
  /** Everything held about the account (console/export.ts). */
  exportData: (did: string, handle: string | null) => Promise<Record<string, unknown>>
  /** After each completed sign-in (the exchange's welcome grant, once per account). */
  onSignIn?: (did: string) => void
  /** The OpenAI-compatible inference API (`/v1/...`), when this console is an exchange. */
  inference?: Hono<any>
  /** The client address every per-address limit uses (src/net/client-address.ts); default: the TCP peer. */
  clientIp?: (c: Context) => string | undefined
}

type Env = { Variables: { session: ConsoleSession | null } }

const SESSION_COOKIE = 'cocore_session'
const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS'])
const formBodyLimit = bodyLimit({ maxSize: 64 * 1024, onError: (c) => c.html(errorPage('Too large', 'That form was too large.'), 413) })

const BINDING_COOKIE = 'cocore_oauth_binding'

/** Production is served over https only (as its Secure cookies assume): browsers are told never to try http. */
export const HSTS = 'max-age=31536000; includeSubDomains'
/** Where a sign-in leaves for the PDS (see POST /login). */
const CONTINUE_PATH = '/login/continue'

/** A form body that does not parse (a multipart body without its boundary, say) is the client's error: 400, not 500. */
async function readForm(c: Context, all = false): Promise<Record<string, string | File | (string | File)[]>> {
  try {
    return await c.req.parseBody({ all })
  } catch {
    throw new HTTPException(400, { message: 'malformed form body' })
  }
}

export function createConsoleApp(deps: ConsoleDeps): Hono<Env> {
  const app = new Hono<Env>()
  const origin = new URL(deps.consoleUrl).origin
  // The chat page reads provider keys from the AppView itself.
  const appviewOrigin = new URL(deps.appviewUrl).origin
  const ip = deps.clientIp ?? ((c: Context) => contextClientAddress(c, TrustedProxies.none))
  // Per process: a sign-in in flight across a restart starts again anyway (its state is an hour old at most).
  const continueKey = randomBytes(32)
  const continueMac = (to: string) => createHmac('sha256', continueKey).update(to).digest('base64url')
  const cookieOpts = deps.secureCookies
    ? ({ prefix: 'host', secure: true, httpOnly: true, sameSite: 'Lax', path: '/' } as const)
    : ({ httpOnly: true, sameSite: 'Lax', path: '/' } as const)
  const readCookie = (c: Context, name: string) => (deps.secureCookies ? getCookie(c, name, 'host') : getCookie(c, name))

  app.onError((err, c) => {
    if (err instanceof HTTPException && err.status === 403) {
      return c.html(errorPage('Request refused', 'This request did not come from a console page (cross-site requests are refused). Nothing was changed.'), 403)
    }
    if (err instanceof HTTPException && err.status === 400) return c.html(errorPage('Bad request', 'The console could not read this form. Nothing was changed.'), 400)
    log.error('console error', { path: c.req.path, err })
    return c.html(errorPage('Something went wrong', 'The console could not complete this request. Nothing was changed.'), 500)
  })

  // A path no route takes is answered in the protocol its prefix speaks.
  app.notFound((c) => {
    const path = c.req.path
    if (isBearerApi(path)) return c.json(new OpenAiError(404, 'not_found_error', 'unknown_endpoint', `no such endpoint: ${c.req.method} ${path.slice(0, 200)}`).toJSON(), 404)
    if (isXrpc(path)) return c.json(new NotFoundError('no such XRPC endpoint').toJSON(), 404)
    return c.html(errorPage('Not found', 'There is no console page at this address.'), 404)
  })

  app.use(async (c, next) => {
    await next()
    // Nothing from other origins: no analytics, no third-party assets, no framing.
    c.header('Content-Security-Policy', `default-src 'self'; connect-src 'self' ${appviewOrigin}; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'`)
    if (deps.secureCookies) c.header('Strict-Transport-Security', HSTS)
    c.header('X-Content-Type-Options', 'nosniff')
    c.header('Referrer-Policy', 'same-origin')
    c.header('Cache-Control', 'no-store')
  })

  // CSRF: every state-changing request to a page must come from a page of this
  // origin, whatever its content type. A request without an Origin header is
  // refused, as is any other origin. XRPC (below) accepts only JSON and checks
  // the Origin of cookie-authenticated calls itself.
  app.use(async (c, next) => {
    if (isXrpc(c.req.path) || isBearerApi(c.req.path) || SAFE_METHODS.has(c.req.method)) return next()
    if (c.req.header('origin') !== origin) throw new HTTPException(403, { message: 'cross-site request' })
    return next()
  })
  // Forms are small: refuse big bodies before reading them.
  app.use(async (c, next) => (isXrpc(c.req.path) || isBearerApi(c.req.path) ? next() : formBodyLimit(c, next)))

  app.use(async (c, next) => {
    c.set('session', deps.sessions.lookup(readCookie(c, SESSION_COOKIE)))
    await next()
  })

  const who = async (c: Context<Env>) => {
    const s = c.get('session')!
    let handle: string | null = null
    try {
      const info = await deps.oauth.oauthResolver.identityResolver.resolve(s.did)
      handle = info.handle === 'handle.invalid' ? null : info.handle
    } catch {
      // The page still works without a handle.
    }
    return { did: s.did, handle }
  }

  const requireSession = async (c: Context<Env>, next: () => Promise<void>) => {
    if (!c.get('session')) return c.redirect('/', 303)
    await next()
  }

  app.get('/', async (c) => {
    if (!c.get('session')) return c.html(signInPage(undefined, '', deps.demoAccounts))
    const economy = deps.api.inference?.economy
    const did = c.get('session')!.did
    const ledger = economy ? { ...economy.admissible(did), floor: economy.policy.floor, entries: economy.ledger.history(did, 20) } : undefined
    return c.html(dashboardPage(await who(c), deps.appviewUrl, ledger))
  })

  app.post('/login', async (c) => {
    // Each sign-in makes the server call out to a PDS: limited per client address.
    const wait = deps.loginLimiter.take(deps.sessions.hashIp(limitedAddress(ip(c))) ?? 'unknown')
    if (wait > 0) {
      c.header('Retry-After', String(wait))
      return c.html(signInPage(`Too many sign-in attempts from here; try again in ${wait} s.`), 429)
    }
    deps.oauthStateGc()
    const form = await readForm(c)
    const identifier = String(form.identifier ?? '').trim()
    if (!identifier || identifier.length > 512) return c.html(signInPage('Type your handle (like alice.bsky.social), your DID, or your PDS address.', identifier), 400)
    // Binds the OAuth state to this browser: the callback must present the same cookie.
    const binding = randomBytes(32).toString('base64url')
    let url: URL
    try {
      url = await deps.oauth.authorize(identifier, { state: binding })
    } catch (err) {
      log.info('sign-in could not start', { err: err as Error })
      const unreachable = /fetch|ECONN|timeout|network/i.test(String((err as Error)?.message) + String((err as Error)?.cause ?? ''))
      const message = unreachable
        ? `Could not reach the server for "${identifier}". Check the address, or try again later.`
        : `Could not find an AT Protocol account or PDS for "${identifier}".`
      return c.html(signInPage(message, identifier), 400)
    }
    setCookie(c, BINDING_COOKIE, binding, { ...cookieOpts, maxAge: 600 })
    // form-action 'self' covers every redirect of a form submission, so the form's answer stays on this
    // origin; the page there sends the browser on, by a navigation that is not a form submission.
    const to = url.toString()
    return c.redirect(`${origin}${CONTINUE_PATH}?${new URLSearchParams({ to, mac: continueMac(to) })}`, 303)
  })

  // Only to an address POST /login gave out (its MAC): never an open redirect.
  app.get(CONTINUE_PATH, (c) => {
    const to = c.req.query('to') ?? ''
    const mac = Buffer.from(c.req.query('mac') ?? '')
    const expected = Buffer.from(continueMac(to))
    if (!to || mac.length !== expected.length || !timingSafeEqual(mac, expected)) {
      return c.html(errorPage('Sign-in refused', 'This sign-in link was not made by this console, or it expired. Start again from the sign-in page.', 'sign-in'), 400)
    }
    c.header('Refresh', `0; url=${to}`)
    return c.html(continueToPdsPage(to))
  })

  app.get(CALLBACK_PATH, async (c) => {
    const params = new URL(c.req.url).searchParams
    const stateKey = params.get('state')
    // Before anything else: this browser must be the one that started this sign-in.
    const stored = stateKey ? await deps.states.get(stateKey) : undefined
    const binding = readCookie(c, BINDING_COOKIE)
    const expected = stored?.appState
    const ours = !!binding && !!expected && binding.length === expected.length && timingSafeEqual(Buffer.from(binding), Buffer.from(expected))
    if (params.get('error')) {
      // Only that browser may cancel the sign-in in flight: anyone else's error link leaves it alone.
      if (stateKey && ours) await deps.states.del(stateKey)
      // Fixed wording: the PDS's own text is not echoed on this origin.
      const denied = params.get('error') === 'access_denied'
      return c.html(errorPage(denied ? 'Sign-in cancelled' : 'Sign-in failed', denied ? 'You did not grant access, so you are not signed in.' : 'Your PDS did not complete the sign-in. Start again from the sign-in page.', 'sign-in'), 400)
    }
    if (!ours) {
      return c.html(errorPage('Sign-in refused', 'This sign-in was not started in this browser, or it expired. Start again from the sign-in page.', 'sign-in'), 400)
    }
    deleteCookie(c, BINDING_COOKIE, cookieOpts)
    let did: string
    try {
      const { session } = await deps.oauth.callback(params)
      did = session.did
      // A new OAuth session (and DPoP key): an agent made from the previous one must not be reused.
      deps.publisher.forget(did)
    } catch (err) {
      log.info('sign-in callback failed', { err: err as Error })
      return c.html(errorPage('Sign-in failed', 'Your PDS did not confirm the sign-in. Start again from the sign-in page.', 'sign-in'), 400)
    }
    // The account is frozen while its data is wiped: no console session acts for it meanwhile.
    if (deps.wiper.activeJob(did)) {
      return c.html(errorPage('Wipe under way', 'Your data is being wiped; the console does not sign you in until that is finished. Follow it at the address the wipe gave you, then sign in again if you like.', 'sign-in'), 409)
    }
    const { token, session } = deps.sessions.create(did, c.req.header('user-agent'), ip(c))
    deps.audit.record(did, 'sign-in', session.ipHash, { session: session.id })
    deps.onSignIn?.(did)
    setCookie(c, SESSION_COOKIE, token, { ...cookieOpts, maxAge: SESSION_TTL_MS / 1000 })
    return c.redirect('/', 303)
  })

  app.post('/logout', async (c) => {
    const s = c.get('session')
    if (s) {
      // Ends this console session only: the OAuth session stays, so API keys keep working.
      deps.sessions.revoke(s.did, s.id)
      deps.audit.record(s.did, 'sign-out', deps.sessions.hashIp(ip(c)), { session: s.id })
    }
    deleteCookie(c, SESSION_COOKIE, cookieOpts)
    return c.redirect('/', 303)
  })

  app.post('/logout-everywhere', requireSession, async (c) => {
    const s = c.get('session')!
    const n = deps.sessions.revokeAll(s.did)
    deps.publisher.forget(s.did)
    await deps.oauth.revoke(s.did).catch((err) => log.warn('OAuth revoke failed', { err: err as Error }))
    deps.audit.record(s.did, 'sign-out-everywhere', deps.sessions.hashIp(ip(c)), { sessions: n })
    deleteCookie(c, SESSION_COOKIE, cookieOpts)
    return c.redirect('/', 303)
  })

  app.get('/sessions', requireSession, async (c) => {
    const s = c.get('session')!
    return c.html(sessionsPage(await who(c), deps.sessions.list(s.did), s.id))
  })

  app.post('/sessions/:id/revoke', requireSession, async (c) => {
    const s = c.get('session')!
    const id = c.req.param('id') ?? ''
    if (!deps.sessions.revoke(s.did, id)) return c.html(errorPage('Not found', 'No such session of yours.'), 404)
    deps.audit.record(s.did, 'session-revoke', deps.sessions.hashIp(ip(c)), { session: id })
    if (id === s.id) deleteCookie(c, SESSION_COOKIE, cookieOpts)
    return c.redirect(id === s.id ? '/' : '/sessions', 303)
  })

  // Publishing on the user's behalf: everything goes through the Publisher.
  const failure = (err: unknown) => (err instanceof InvalidRecordError ? `Not saved: ${err.message}.` : null)
  // Writes are conditional on the version read (swapRecord): another tab or device saved in between.
  const CONFLICT = 'Not saved: this record changed while you were editing it (another tab or device?). Nothing was overwritten; check it and save again.'
  const conflicted = (err: unknown) => (err as { error?: string }).error === 'InvalidSwap'

  app.get('/profile', requireSession, async (c) => {
    const s = c.get('session')!
    const p = await deps.publisher.getProfile(s.did)
    return c.html(profilePage(await who(c), p?.value ?? null, { saved: c.req.query('saved') === '1' }))
  })

  app.post('/profile', requireSession, async (c) => {
    const s = c.get('session')!
    const form = await readForm(c)
    const edit = { displayName: String(form.displayName ?? '').trim(), bio: String(form.bio ?? '').trim() }
    try {
      const saved = await deps.publisher.putProfile(s.did, edit)
      deps.audit.record(s.did, 'profile-update', deps.sessions.hashIp(ip(c)), { cid: saved.cid })
      // Read-after-write: the page shows what was just written, before the firehose brings it back.
      return c.html(profilePage(await who(c), saved.value, { saved: true }))
    } catch (err) {
      if (conflicted(err)) return c.html(profilePage(await who(c), edit, { error: CONFLICT }), 409)
      const message = failure(err)
      if (!message) throw err
      return c.html(profilePage(await who(c), edit, { error: message }), 400)
    }
  })

  app.get('/friends', requireSession, async (c) => {
    const s = c.get('session')!
    return c.html(friendsPage(await who(c), await deps.publisher.listFriends(s.did)))
  })

  app.post('/friends', requireSession, async (c) => {
    const s = c.get('session')!
    const form = await readForm(c)
    const input = String(form.subject ?? '').trim().replace(/^@/, '')
    const note = String(form.note ?? '').trim() || undefined
    let subject = input
    if (!input.startsWith('did:')) {
      try {
        subject = (await deps.oauth.oauthResolver.identityResolver.resolve(input)).did
      } catch {
        return c.html(friendsPage(await who(c), await deps.publisher.listFriends(s.did), { error: `Could not find an account for "${input}".` }), 400)
      }
    }
    try {
      await deps.publisher.addFriend(s.did, subject, note)
    } catch (err) {
      const message = failure(err)
      if (!message) throw err
      return c.html(friendsPage(await who(c), await deps.publisher.listFriends(s.did), { error: message }), 400)
    }
    return c.html(friendsPage(await who(c), await deps.publisher.listFriends(s.did), { saved: true }))
  })

  app.post('/friends/:rkey/remove', requireSession, async (c) => {
    const s = c.get('session')!
    const rkey = c.req.param('rkey') ?? ''
    // Not a record key: nothing of the account's has it (and the PDS client would throw before asking).
    if (!isValidRecordKey(rkey)) return c.html(errorPage('Not found', 'No such friend of yours.'), 404)
    await deps.publisher.removeFriend(s.did, rkey)
    return c.redirect('/friends', 303)
  })

  app.get('/machines', requireSession, async (c) => {
    const s = c.get('session')!
    return c.html(machinesPage(await who(c), await deps.publisher.listProviders(s.did), { saved: c.req.query('saved') === '1' }))
  })

  app.post('/machines/:rkey', requireSession, async (c) => {
    const s = c.get('session')!
    const rkey = c.req.param('rkey') ?? ''
    if (!isValidRecordKey(rkey)) return c.html(errorPage('Not found', 'No such machine of yours.'), 404)
    const form = await readForm(c)
    const desired = String(form.desiredModels ?? '')
      .split(',')
      .map((m) => m.trim())
      .filter(Boolean)
    const mode = String(form.proBono ?? '')
    try {
      await deps.publisher.setProviderIntent(s.did, rkey, {
        desiredModels: desired.length ? desired : undefined,
        active: form.active === '1',
        shareLocation: form.shareLocation === '1',
        proBono: mode ? { mode } : undefined,
      })
    } catch (err) {
      // Only the account's own repo is read: another account's rkey names nothing there.
      if ((err as { error?: string }).error === 'RecordNotFound') return c.html(errorPage('Not found', 'No such machine of yours.'), 404)
      if (conflicted(err)) return c.html(machinesPage(await who(c), await deps.publisher.listProviders(s.did), { error: CONFLICT }), 409)
      const message = failure(err)
      if (!message) throw err
      return c.html(machinesPage(await who(c), await deps.publisher.listProviders(s.did), { error: message }), 400)
    }
    return c.redirect('/machines?saved=1', 303)
  })

  // API keys from the browser (the same store as the XRPC methods).
  app.get('/keys', requireSession, async (c) => {
    const s = c.get('session')!
    return c.html(keysPage(await who(c), deps.api.keys.list(s.did)))
  })

  app.post('/keys', requireSession, async (c) => {
    const s = c.get('session')!
    const form = await readForm(c, true)
    const name = String(form.name ?? '')
    const scopes = ([] as unknown[]).concat(form.scopes ?? []).map(String)
    const expires = String(form.expires ?? '')
    let secret: string
    try {
      // An unticked form would fall back to the API's default scopes: ask instead.
      if (scopes.length === 0) throw new InvalidRequestError('tick at least one scope')
      ;({ secret } = createKey(deps.api, sessionCaller(s.did, deps.sessions.hashIp(ip(c))), { name, scopes, expiresAt: expires ? `${expires}T23:59:59Z` : undefined }))
    } catch (err) {
      if (!(err instanceof InvalidRequestError)) throw err
      return c.html(keysPage(await who(c), deps.api.keys.list(s.did), { error: `Not created: ${err.message}.` }), 400)
    }
    // Shown in this response only; a reload does not show it again.
    return c.html(keysPage(await who(c), deps.api.keys.list(s.did), { created: { name: name.trim(), secret } }))
  })

  app.post('/keys/:id/:action{revoke|delete}', requireSession, async (c) => {
    const s = c.get('session')!
    const id = c.req.param('id') ?? ''
    const caller = sessionCaller(s.did, deps.sessions.hashIp(ip(c)))
    if (c.req.param('action') === 'revoke') revokeKey(deps.api, caller, id)
    else deleteKey(deps.api, caller, id)
    return c.redirect('/keys', 303)
  })

  // A pairing device's verificationUri: its owner approves or denies the code it shows (dev.cocore.devicePair.confirm's page).
  app.get('/devices/new', async (c) => {
    if (!c.get('session')) return c.html(signInPage('Sign in to approve your device, then open the address it showed you again.'))
    return c.html(devicePage(await who(c), (c.req.query('code') ?? '').slice(0, 20)))
  })

  app.post('/devices/new', requireSession, async (c) => {
    const s = c.get('session')!
    const form = await readForm(c)
    const code = String(form.code ?? '').slice(0, 20)
    try {
      const done = await confirmPairing(deps.api, sessionCaller(s.did, deps.sessions.hashIp(ip(c))), ip(c), code, form.decision === 'approve' ? 'approve' : 'deny')
      return c.html(devicePage(await who(c), '', { done }))
    } catch (err) {
      if (!(err instanceof XrpcError)) throw err
      return c.html(devicePage(await who(c), code, { error: `Nothing done: ${err.message}.` }), err.status as 400)
    }
  })

  // Your data: export and wipe.
  app.get('/account', requireSession, async (c) => c.html(accountPage(await who(c))))

  // A POST: the download writes an activity entry, which no cross-site link may trigger.
  app.post('/account/export', requireSession, async (c) => {
    const s = c.get('session')!
    const ipHash = deps.sessions.hashIp(ip(c))
    deps.audit.record(s.did, 'export', ipHash)
    const data = await deps.exportData(s.did, (await who(c)).handle)
    c.header('Content-Disposition', `attachment; filename="cocore-export-${s.did.replace(/[^a-z0-9]/gi, '_')}.json"`)
    return c.json(data)
  })

  app.post('/account/wipe', requireSession, async (c) => {
    const s = c.get('session')!
    const form = await readForm(c)
    const me = await who(c)
    const typed = String(form.confirm ?? '').trim()
    if (typed !== `wipe ${me.handle ?? me.did}` && typed !== `wipe ${me.did}`) {
      return c.html(accountPage(me, { error: `To confirm, type exactly: wipe ${me.handle ?? me.did}` }), 400)
    }
    deps.audit.record(s.did, 'wipe-start', deps.sessions.hashIp(ip(c)))
    const job = deps.wiper.start(s.did)
    // The job id is the capability to read the report: the wipe ends this session.
    return c.redirect(`/wipe/${job.id}`, 303)
  })

  app.get('/wipe/:id', async (c) => {
    const job = deps.wiper.get(c.req.param('id') ?? '')
    if (!job) return c.html(errorPage('Not found', 'No such wipe report (reports are kept for 7 days).'), 404)
    return c.html(wipePage(job))
  })

  app.route('/', browserModules())
  app.get('/chat', requireSession, async (c) => c.html(chatPage(await who(c), deps.appviewUrl, `${MODULES_PATH}/console/browser/chat.ts`)))

  app.get('/audit', requireSession, async (c) => {
    const s = c.get('session')!
    return c.html(auditPage(await who(c), deps.audit.list(s.did)))
  })

  // Production OAuth client metadata and public keys (a confidential client is identified by these URLs).
  app.get(CLIENT_METADATA_PATH, (c) => c.json(deps.oauth.clientMetadata))
  app.get(JWKS_PATH, (c) => c.json(deps.oauth.jwks))

  app.get('/health', (c) => c.json({ status: 'ok' }))

  // XRPC: the account's API keys (and more to come), at /xrpc/ and /api/xrpc/.
  const api = new Hono()
  api.onError(xrpcErrorHandler(log))
  api.use(
    '/xrpc/*',
    authenticate({
      deps: deps.api,
      gate: deps.gate,
      origin,
      sessionCookie: deps.secureCookies ? { name: SESSION_COOKIE, prefix: 'host' } : { name: SESSION_COOKIE },
      clientIp: ip,
    }),
  )
  api.route('/', xrpcRouter({ handlers, ctx: deps.api, log, validateOutput: process.env.NODE_ENV !== 'production' }))
  app.route('/', api)
  app.route('/api', api)
  if (deps.inference) app.route('/', deps.inference)
  return app
}

/** The OpenAI-compatible API (at /v1, and the network's older /api/v1): bearer credentials only, never cookies, so no CSRF check applies. */
export const isBearerApi = (path: string) => path.startsWith('/v1/') || path.startsWith('/api/v1/')
const isXrpc = (path: string) => path.startsWith('/xrpc/') || path.startsWith('/api/xrpc/')
