/**
 * dev.cocore.devicePair.poll: where a pairing stands, as the device is told.
 * An approved pairing answers `session` (its API key) once; after that,
 * `consumed`. The answers that end a pairing carry the network's status codes
 * (denied 403, expired and consumed 410, unknown 404) with `status` in the
 * body, which is what its agent reads, and `error`/`message` for XRPC clients.
 * No credentials: limited per client address, and a device id that names
 * nothing counts as a refused credential of the address.
 */
import type { Context } from 'hono'
import type { DevicePairPollOutput, DevicePairPollParams } from '../../../../../src/lexicon/generated/types.ts'
import { RateLimitExceededError } from '../../../../../src/xrpc/errors.ts'
import type { PollStatus } from '../../../../device-pairs.ts'
import { clientAddressOf, type ApiDeps } from '../../../context.ts'

const ENDED: Record<Exclude<PollStatus, 'pending'>, { http: 403 | 404 | 410; error: string; message: string }> = {
  unknown: { http: 404, error: 'NotFound', message: 'no pairing has this device id' },
  denied: { http: 403, error: 'AccessDenied', message: 'the pairing was denied' },
  expired: { http: 410, error: 'ExpiredToken', message: 'the pairing expired before it was approved and collected' },
  consumed: { http: 410, error: 'AlreadyConsumed', message: 'the session of this pairing was already collected' },
}

export default function poll(deps: ApiDeps, params: DevicePairPollParams, c: Context): DevicePairPollOutput | Response {
  const pairing = deps.pairing
  const ip = clientAddressOf(c)
  const wait = pairing.gate.admit('poll', ip)
  if (wait > 0) throw new RateLimitExceededError(wait)
  const answer = pairing.pairs.poll(params.deviceId)
  if (answer.status === 'pending' || answer.status === 'session') return answer
  if (answer.status === 'unknown') pairing.gate.missed(ip)
  const ended = ENDED[answer.status]
  return c.json({ status: answer.status, error: ended.error, message: ended.message }, ended.http)
}
