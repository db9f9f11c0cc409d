import type { Context } from 'hono'
import type { AccountListApiKeysOutput } from '../../../../../src/lexicon/generated/types.ts'
import { callerOf, requireScope, type ApiDeps } from '../../../../api/context.ts'

export default function listApiKeys(deps: ApiDeps, _params: unknown, c: Context): AccountListApiKeysOutput {
  const caller = callerOf(c)
  requireScope(caller, 'keys:manage')
  // Metadata only: neither secrets (never kept) nor hashes leave the server.
  return { keys: deps.keys.list(caller.did) }
}
