import type { Context } from 'hono'
import type { AccountDeleteApiKeyInput, AccountDeleteApiKeyOutput } from '../../../../../src/lexicon/generated/types.ts'
import { callerOf, requireScope, type ApiDeps } from '../../../../api/context.ts'

export default function deleteApiKey(deps: ApiDeps, _params: unknown, c: Context, input?: unknown): AccountDeleteApiKeyOutput {
  const caller = callerOf(c)
  requireScope(caller, 'keys:manage')
  const { id } = input as AccountDeleteApiKeyInput
  const deleted = deps.keys.delete(caller.did, id)
  if (deleted) deps.audit.record(caller.did, 'api-key-delete', caller.ipHash, { key: id, via: caller.via })
  return { deleted }
}
