/**
 * What can be done to an account's API keys, with its checks and its
 * activity entry, for both ways in: the XRPC methods and the console's pages
 * (keys, and the device page that approves a pairing, which mints one).
 */
import { InvalidRequestError, NotFoundError, RateLimitExceededError, XrpcError } from '../../src/xrpc/errors.ts'
import { isWellFormed } from '../../src/xrpc/server.ts'
import { SCOPES, type ApiKey, type Scope } from '../api-keys.ts'
import { PairingError } from '../device-pairs.ts'
import { requireScope, type ApiDeps, type Caller } from './context.ts'

const DEFAULT_SCOPES: Scope[] = ['read', 'inference']

/** A console session acts with every scope of its account. */
export const sessionCaller = (did: string, ipHash: string | null): Caller => ({ did, via: 'session', scopes: SCOPES, ipHash })

/** @throws InvalidRequestError naming what is wrong with the request. */
export function createKey(deps: ApiDeps, caller: Caller, req: { name: string; scopes?: string[]; expiresAt?: string }): { key: ApiKey; secret: string } {
  requireScope(caller, 'keys:manage')
  const name = req.name.trim()
  // Counted as the lexicon counts (UTF-8 bytes), or listApiKeys would answer a name its lexicon refuses;
  // a lone surrogate has no UTF-8 at all (stored, it would read back as three replacement characters).
  if (!isWellFormed(name)) throw new InvalidRequestError('a key name must be valid Unicode')
  if (!name || Buffer.byteLength(name) > 100) throw new InvalidRequestError('a key needs a name of 1 to 100 bytes (UTF-8)')
  const scopes = req.scopes ?? DEFAULT_SCOPES
  const unknown = scopes.filter((s) => !(SCOPES as readonly string[]).includes(s))
  if (unknown.length) throw new InvalidRequestError(`unknown scope: ${unknown.join(', ')} (known: ${SCOPES.join(', ')})`)
  // A key cannot mint a key more powerful than itself...
  const beyond = scopes.filter((s) => !caller.scopes.includes(s as Scope))
  if (beyond.length) throw new InvalidRequestError(`cannot grant scopes the caller lacks: ${beyond.join(', ')}`)
  if (req.expiresAt !== undefined && Number.isNaN(Date.parse(req.expiresAt))) throw new InvalidRequestError('expiresAt is not a date')
  if (req.expiresAt && Date.parse(req.expiresAt) <= Date.now()) throw new InvalidRequestError('expiresAt is in the past')
  // ...nor one that outlives it: a key-made key expires no later than its parent.
  const expiresAt = req.expiresAt ? new Date(req.expiresAt).toISOString() : caller.expiresAt
  if (caller.expiresAt && expiresAt && expiresAt > caller.expiresAt) throw new InvalidRequestError(`expiresAt cannot be later than the calling key's (${caller.expiresAt})`)
  const created = deps.keys.create(caller.did, name, scopes as Scope[], expiresAt)
  deps.audit.record(caller.did, 'api-key-create', caller.ipHash, { key: created.key.id, name, scopes: created.key.scopes, via: caller.via })
  return created
}

/** True only when an active key of the caller's account was revoked (another account's id answers like an unknown one). */
export function revokeKey(deps: ApiDeps, caller: Caller, id: string): boolean {
  requireScope(caller, 'keys:manage')
  const revoked = deps.keys.revoke(caller.did, id)
  if (revoked) deps.audit.record(caller.did, 'api-key-revoke', caller.ipHash, { key: id, via: caller.via })
  return revoked
}

export function deleteKey(deps: ApiDeps, caller: Caller, id: string): boolean {
  requireScope(caller, 'keys:manage')
  const deleted = deps.keys.delete(caller.did, id)
  if (deleted) deps.audit.record(caller.did, 'api-key-delete', caller.ipHash, { key: id, via: caller.via })
  return deleted
}

/**
 * Approves or denies the device pairing a user code names. Approving mints an
 * API key of the caller's account (the default scopes; a calling key's limits
 * apply, as to any key it creates), bound to the pairing for the device to
 * collect once. A code that names no pairing counts against the address, as a
 * refused key, and against the account.
 * @throws XrpcError: 403 InsufficientScope, 404 NotFound (no pairing in progress uses the code),
 *   409 Conflict (it is past approval), 429 RateLimitExceeded
 */
export async function confirmPairing(deps: ApiDeps, caller: Caller, ip: string | undefined, userCode: string, decision: 'approve' | 'deny'): Promise<'approved' | 'denied'> {
  const { pairs, gate } = deps.pairing
  requireScope(caller, 'keys:manage')
  const wait = gate.admit('confirm', ip, caller.did)
  if (wait > 0) throw new RateLimitExceededError(wait)
  const state = pairs.stateOf(userCode)
  if (!state) {
    gate.missed(ip, caller.did)
    throw new NotFoundError('no pairing in progress uses this code')
  }
  try {
    if (decision === 'deny') {
      pairs.deny(userCode, caller.did)
      deps.audit.record(caller.did, 'device-pair-deny', caller.ipHash, { via: caller.via })
      return 'denied'
    }
    if (state !== 'pending') throw new PairingError('conflict', `this pairing is already ${state}`)
    const handle = await deps.pairing.handleOf(caller.did)
    let keyId = ''
    pairs.approve(userCode, caller.did, () => {
      const { key, secret } = createKey(deps, caller, { name: `paired machine (${new Date().toISOString().slice(0, 10)})` })
      keyId = key.id
      return { keyId, session: { did: caller.did, handle, apiKey: secret, apiBase: deps.pairing.apiBase } }
    })
    deps.audit.record(caller.did, 'device-pair-approve', caller.ipHash, { key: keyId, via: caller.via })
    return 'approved'
  } catch (err) {
    if (!(err instanceof PairingError)) throw err
    throw err.kind === 'not-found' ? new NotFoundError(err.message) : new XrpcError(409, 'Conflict', err.message)
  }
}
