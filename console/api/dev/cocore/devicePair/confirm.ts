/**
 * dev.cocore.devicePair.confirm: the signed-in account approves or denies the
 * pairing its device shows the code of (confirmPairing: approving mints the
 * device's API key). The input's `session` is not read: the session is always
 * made here, as the network's AppView does for every caller it does not
 * trust, so whoever knows a code cannot point a device at a key or address of
 * their choosing.
 *
 * Authenticated as every console method: a service-auth token (the network's
 * way: the approver's PDS mints it), a console session or an API key with
 * `keys:manage`.
 */
import type { Context } from 'hono'
import type { DevicePairConfirmInput, DevicePairConfirmOutput } from '../../../../../src/lexicon/generated/types.ts'
import { callerOf, clientAddressOf, type ApiDeps } from '../../../context.ts'
import { confirmPairing } from '../../../key-actions.ts'

export default async function confirm(deps: ApiDeps, _params: unknown, c: Context, raw?: unknown): Promise<DevicePairConfirmOutput> {
  const input = raw as DevicePairConfirmInput
  // The lexicon's enum: validated before the handler runs.
  const decision = input.decision as 'approve' | 'deny'
  return { ok: true, status: await confirmPairing(deps, callerOf(c), clientAddressOf(c), input.userCode, decision) }
}
