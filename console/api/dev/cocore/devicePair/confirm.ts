/**
 * dev.cocore.devicePair.confirm: the signed-in account approves or denies the
 * pairing its device shows the code of. Approving mints an API key of the
 * account (the default scopes; a calling key's limits apply, as to any key it
 * creates) and binds it to the pairing, for the device to collect once. The
 * input's `session` is not read: the session is always made here, as the
 * network's AppView does for every caller it does not trust, so whoever
 * knows a code cannot point a device at a key or address of their choosing.
 *
 * Authenticated as every console method: a service-auth token (the network's
 * way: the approver's PDS mints it), a console session or an API key with
 * `keys:manage`. A code that names no pairing counts against the address, as
 * a refused key, and against the account.
 */
import type { Context } from 'hono'
import type { DevicePairConfirmInput, DevicePairConfirmOutput } from '../../../../../src/lexicon/generated/types.ts'
import { NotFoundError, RateLimitExceededError, XrpcError } from '../../../../../src/xrpc/errors.ts'
import { PairingError } from '../../../../device-pairs.ts'
import { callerOf, clientAddressOf, requireScope, type ApiDeps } from '../../../context.ts'
import { createKey } from '../../../key-actions.ts'

const toXrpc = (err: PairingError) => (err.kind === 'not-found' ? new NotFoundError(err.message) : new XrpcError(409, 'Conflict', err.message))

export default async function confirm(deps: ApiDeps, _params: unknown, c: Context, raw?: unknown): Promise<DevicePairConfirmOutput> {
  const pairing = deps.pairing
  const caller = callerOf(c)
  requireScope(caller, 'keys:manage')
  const ip = clientAddressOf(c)
  const wait = pairing.gate.admit('confirm', ip, caller.did)
  if (wait > 0) throw new RateLimitExceededError(wait)
  const input = raw as DevicePairConfirmInput
  const state = pairing.pairs.stateOf(input.userCode)
  if (!state) {
    pairing.gate.missed(ip, caller.did)
    throw new NotFoundError('no pairing in progress uses this code')
  }
  try {
    if (input.decision === 'deny') {
      pairing.pairs.deny(input.userCode, caller.did)
      deps.audit.record(caller.did, 'device-pair-deny', caller.ipHash, { via: caller.via })
      return { ok: true, status: 'denied' }
    }
    if (state !== 'pending') throw new PairingError('conflict', `this pairing is already ${state}`)
    const handle = await pairing.handleOf(caller.did)
    let keyId = ''
    pairing.pairs.approve(input.userCode, caller.did, () => {
      const { key, secret } = createKey(deps, caller, { name: `paired machine (${new Date().toISOString().slice(0, 10)})` })
      keyId = key.id
      return { keyId, session: { did: caller.did, handle, apiKey: secret, apiBase: pairing.apiBase } }
    })
    deps.audit.record(caller.did, 'device-pair-approve', caller.ipHash, { key: keyId, via: caller.via })
    return { ok: true, status: 'approved' }
  } catch (err) {
    throw err instanceof PairingError ? toXrpc(err) : err
  }
}
