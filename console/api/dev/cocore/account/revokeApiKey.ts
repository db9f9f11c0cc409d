import type { Context } from 'hono'
import type { AccountRevokeApiKeyInput, AccountRevokeApiKeyOutput } from '../../../../../src/lexicon/generated/types.ts'
import { callerOf, requireScope, type ApiDeps } from '../../../../api/context.ts'

export default function revokeApiKey(deps: ApiDeps, _params: unknown, c: Context, input?: unknown): AccountRevokeApiKeyOutput {
  const caller = callerOf(c)
  requireScope(caller, 'keys:manage')
  const { id } = input as AccountRevokeApiKeyInput
  const revoked = deps.keys.revoke(caller.did, id)
  if (revoked) deps.audit.record(caller.did, 'api-key-revoke', caller.ipHash, { key: id, via: caller.via })
  return { revoked }
}
