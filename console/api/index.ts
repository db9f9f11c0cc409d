/**
 * The console's XRPC methods (one handler file per NSID under dev/cocore/),
 * served at /xrpc/ and, for cocore clients, /api/xrpc/. Every call is
 * authenticated here first: a console session, `Authorization: Bearer <api
 * key>` (rate-limited per client address and per key, and counted per day;
 * see KeyGate), or `Authorization: Bearer <service-auth JWT>` for the method
 * it names (console/service-auth.ts). The AppView forwards the ones the
 * network's AppView serves (appview/console-link.ts); their tokens name the
 * AppView's DID.
 */
import type { Context, MiddlewareHandler } from 'hono'
import { getCookie } from 'hono/cookie'
import { ids } from '../../src/lexicon/generated/ids.ts'
import { lexicons } from '../../src/lexicon/validate.ts'
import { AuthRequiredError, ForbiddenError, RateLimitExceededError } from '../../src/xrpc/errors.ts'
import type { QueryHandler } from '../../src/xrpc/server.ts'
import type { KeyGate } from '../api-keys.ts'
import { admitServiceAuth, isServiceAuthToken } from '../service-auth.ts'
import type { Forwarded } from '../../appview/console-link.ts'
import { sessionCaller } from './key-actions.ts'
import type { ApiDeps, Caller } from './context.ts'
import createApiKey from './dev/cocore/account/createApiKey.ts'
import deleteApiKey from './dev/cocore/account/deleteApiKey.ts'
import listApiKeys from './dev/cocore/account/listApiKeys.ts'
import revokeApiKey from './dev/cocore/account/revokeApiKey.ts'
import confirm from './dev/cocore/devicePair/confirm.ts'
import poll from './dev/cocore/devicePair/poll.ts'
import start from './dev/cocore/devicePair/start.ts'
import dispatch from './dev/cocore/inference/dispatch.ts'
import getBalance from './org/cocoreexchange/ledger/getBalance.ts'
import getPolicy from './org/cocoreexchange/ledger/getPolicy.ts'
import getTreasury from './org/cocoreexchange/ledger/getTreasury.ts'
import listEntries from './org/cocoreexchange/ledger/listEntries.ts'

export const handlers = {
  [ids.AccountCreateApiKey]: createApiKey,
  [ids.AccountDeleteApiKey]: deleteApiKey,
  [ids.AccountListApiKeys]: listApiKeys,
  [ids.AccountRevokeApiKey]: revokeApiKey,
  [ids.DevicePairConfirm]: confirm,
  [ids.DevicePairPoll]: poll,
  [ids.DevicePairStart]: start,
  [ids.InferenceDispatch]: dispatch,
  [ids.OrgCocoreexchangeLedgerGetBalance]: getBalance,
  [ids.OrgCocoreexchangeLedgerListEntries]: listEntries,
  [ids.OrgCocoreexchangeLedgerGetPolicy]: getPolicy,
  [ids.OrgCocoreexchangeLedgerGetTreasury]: getTreasury,
} as unknown as Record<string, QueryHandler<ApiDeps>>

/** Methods anyone may call, signed in or not (they show no account's data; a device pairs before it has a credential). */
const PUBLIC = new Set<string>([ids.OrgCocoreexchangeLedgerGetPolicy, ids.OrgCocoreexchangeLedgerGetTreasury, ids.DevicePairStart, ids.DevicePairPoll])

export interface AuthOpts {
  deps: ApiDeps
  gate: KeyGate
  origin: string
  sessionCookie: { name: string; prefix?: 'host' }
  clientIp: (c: Context) => string | undefined
}

/** One answer for every unusable key, so nothing tells whether a key exists, was revoked or expired. */
const INVALID_KEY = 'Invalid API key'

/** A call the AppView forwarded: only the AppView (in this process) sets this. */
export const forwardedFrom = (c: { env: unknown }): Forwarded | undefined => (c.env as { forwarded?: Forwarded } | undefined)?.forwarded

/**
 * The caller a service-auth token authenticates: its issuer, acting as in a session, for the method the token
 * names (`lxm`) and no other, with the audience of the door it came in by (the AppView's DID when forwarded).
 */
async function serviceAuthCaller(opts: AuthOpts, c: Context, token: string, ip: string | undefined, ipHash: string | null): Promise<Caller> {
  const did = await admitServiceAuth(opts.gate, opts.deps.serviceAuth, token, c.req.path.split('/').pop() ?? '', ip, forwardedFrom(c)?.audience)
  return { ...sessionCaller(did, ipHash), via: 'service-auth' }
}

export function authenticate(opts: AuthOpts): MiddlewareHandler {
  return async (c, next) => {
    const ip = opts.clientIp(c)
    c.set('clientAddress', ip)
    if (PUBLIC.has(c.req.path.split('/').pop() ?? '')) return next()
    const { deps } = opts
    const ipHash = deps.sessions.hashIp(ip)
    const header = c.req.header('authorization')
    let caller: Caller
    const jwt = /^Bearer (\S+)$/.exec(header ?? '')?.[1]
    if (jwt !== undefined && isServiceAuthToken(jwt)) {
      caller = await serviceAuthCaller(opts, c, jwt, ip, ipHash)
    } else if (header !== undefined) {
      const key = opts.gate.admit(header, ip)
      if ('refused' in key) {
        if (key.refused === 'invalid') throw new AuthRequiredError(INVALID_KEY, 'AuthRequired')
        throw new RateLimitExceededError(key.retryAfterSec)
      }
      deps.usage.add(key.did, key.id, { requests: 1 })
      caller = { did: key.did, via: 'key', keyId: key.id, expiresAt: key.expiresAt, scopes: key.scopes, ipHash }
    } else {
      const session = deps.sessions.lookup(opts.sessionCookie.prefix ? getCookie(c, opts.sessionCookie.name, opts.sessionCookie.prefix) : getCookie(c, opts.sessionCookie.name))
      if (!session) throw new AuthRequiredError('Sign in to the console or send an API key', 'AuthRequired')
      // Cookie-authenticated changes must come from the console's own pages.
      const nsid = c.req.path.split('/').pop() ?? ''
      if (lexicons.getDef(nsid)?.type === 'procedure' && c.req.header('origin') !== opts.origin) {
        throw new ForbiddenError('cross-site request refused', 'CrossSiteRequest')
      }
      caller = sessionCaller(session.did, ipHash)
    }
    c.set('caller', caller)
    await next()
  }
}
