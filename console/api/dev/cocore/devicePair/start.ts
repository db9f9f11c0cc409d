/**
 * dev.cocore.devicePair.start: a device opens a pairing and is told its user
 * code, where its owner approves it, and how often to poll. No credentials
 * (the device has none yet): limited per client address.
 */
import type { Context } from 'hono'
import type { DevicePairStartOutput } from '../../../../../src/lexicon/generated/types.ts'
import { RateLimitExceededError } from '../../../../../src/xrpc/errors.ts'
import { clientAddressOf, type ApiDeps } from '../../../context.ts'

export default function start(deps: ApiDeps, _params: unknown, c: Context): DevicePairStartOutput {
  const pairing = deps.pairing
  const wait = pairing.gate.admit('start', clientAddressOf(c))
  if (wait > 0) throw new RateLimitExceededError(wait)
  return pairing.pairs.start()
}
