/**
 * Service-auth tokens as console credentials. A reference client calls
 * `dev.cocore.inference.dispatch` and the API-key methods with a JWT its PDS
 * mints for its account (com.atproto.server.getServiceAuth, or a call proxied
 * with `atproto-proxy`): `iss` the account, `aud` this service's DID, `lxm`
 * the method, signed with the account's atproto key. A valid token acts for
 * its issuer like a console session, for that one method only.
 *
 * Tighter than `verifyJwt` alone, as the reference AppView is: a lifetime of
 * at most five minutes, each `jti` accepted once, and the issuer an account
 * (a DID, not a `did#service`).
 *
 * Two doors, one audience each: a call made to the console must name the
 * exchange's DID; a call the AppView forwarded (appview/console-link.ts) must
 * name the AppView's, which is what a PDS mints when it proxies to
 * `#cocore_appview`. Either way the token is checked, and its `jti` spent,
 * here.
 */
import type { IdResolver } from '@atproto/identity'
import { verifyJwt } from '@atproto/xrpc-server'
import { AuthRequiredError, RateLimitExceededError } from '../src/xrpc/errors.ts'
import type { KeyGate } from './api-keys.ts'

/** A captured token replays only until `exp`: refuse any that would live longer than this. */
const MAX_LIFETIME_SEC = 5 * 60
/** Clock skew allowed between the issuing PDS and us, on the lifetime bound. */
const CLOCK_SKEW_SEC = 30
/** Replay-guard entries kept at most (each expires with its token). */
const MAX_SEEN = 100_000

/** A compact JWS (three base64url parts); API keys never contain a dot. */
export const isServiceAuthToken = (token: string): boolean => /^[\w-]+\.[\w-]+\.[\w-]*$/.test(token)

export class ServiceAuth {
  /** This service's DID: the `aud` every token made to the console must name (none: only forwarded calls are taken). */
  readonly audience: string | undefined
  private readonly idResolver: IdResolver
  /** jti -> expiry (ms) of tokens already accepted. In memory: per process, like the rate limits. */
  private readonly seen = new Map<string, number>()

  constructor(opts: { audience: string | undefined; idResolver: IdResolver }) {
    this.audience = opts.audience
    this.idResolver = opts.idResolver
  }

  /**
   * The DID a token authenticates for the method `lxm`. `audience`: the DID the
   * token must name, when not this service's own (the AppView's, for a call it forwarded).
   * @throws AuthRequiredError (401) naming what is wrong, as `verifyJwt` names it (BadJwt, JwtExpired,
   *   BadJwtAudience, BadJwtLexiconMethod, BadJwtIss, BadJwtSignature) or JwtReplayed, and AuthRequired with no audience.
   */
  async verify(token: string, lxm: string, opts: { audience?: string; now?: number } = {}): Promise<string> {
    const audience = opts.audience ?? this.audience
    const now = opts.now ?? Date.now()
    if (!audience) throw new AuthRequiredError('this console has no service DID: service-auth tokens are not accepted', 'AuthRequired')
    let payload: Awaited<ReturnType<typeof verifyJwt>>
    try {
      payload = await verifyJwt(token, audience, lxm, async (iss, force) => {
        if (iss.includes('#')) throw new AuthRequiredError('the token is issued by a service, not an account', 'BadJwtIss')
        return this.idResolver.did.resolveAtprotoKey(iss, force)
      })
    } catch (err) {
      if (err instanceof AuthRequiredError) throw err
      // verifyJwt's own refusals carry their name; anything else is the issuer's key not being found.
      const e = err as { customErrorName?: string; errorMessage?: string; type?: number }
      if (e.type === 401 && e.customErrorName) throw new AuthRequiredError(e.errorMessage ?? 'invalid service-auth token', e.customErrorName)
      throw new AuthRequiredError("could not resolve the token issuer's signing key", 'BadJwtIss')
    }
    if (payload.exp - now / 1000 > MAX_LIFETIME_SEC + CLOCK_SKEW_SEC) {
      throw new AuthRequiredError(`the token lives longer than ${MAX_LIFETIME_SEC} s`, 'BadJwt')
    }
    // Recorded only once the signature holds, so nobody can spend another's jti.
    if (payload.jti !== undefined && !this.firstUse(payload.jti, payload.exp * 1000, now)) {
      throw new AuthRequiredError('the token was already used', 'JwtReplayed')
    }
    return payload.iss
  }

  private firstUse(jti: string, expMs: number, now: number): boolean {
    const prior = this.seen.get(jti)
    if (prior !== undefined && prior > now) return false
    if (this.seen.size >= MAX_SEEN) {
      for (const [k, exp] of this.seen) if (exp <= now) this.seen.delete(k)
      // All still live: drop the oldest entries; their tokens expire within minutes anyway.
      for (const k of this.seen.keys()) {
        if (this.seen.size < MAX_SEEN) break
        this.seen.delete(k)
      }
    }
    this.seen.set(jti, expMs)
    return true
  }
}

/**
 * The DID a service-auth bearer authenticates for `lxm` (and `audience`, see
 * ServiceAuth.verify). Checking a token may fetch the issuer's DID document,
 * so the address limits of API keys apply first, and a refused token counts
 * as a refused key.
 * @throws RateLimitExceededError, AuthRequiredError (as ServiceAuth.verify names it)
 */
export async function admitServiceAuth(gate: KeyGate, serviceAuth: ServiceAuth | undefined, token: string, lxm: string, ip: string | undefined, audience?: string): Promise<string> {
  const blocked = gate.admitAddress(ip)
  if (blocked > 0) throw new RateLimitExceededError(blocked)
  try {
    if (!serviceAuth) throw new AuthRequiredError('this console has no service DID: service-auth tokens are not accepted', 'AuthRequired')
    return await serviceAuth.verify(token, lxm, { audience })
  } catch (err) {
    gate.refused(ip)
    throw err
  }
}
