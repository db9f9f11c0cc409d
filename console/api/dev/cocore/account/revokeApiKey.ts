import type { Context } from 'hono'
import type { AccountRevokeApiKeyInput, AccountRevokeApiKeyOutput } from '../../../../../src/lexicon/generated/types.ts'
import { callerOf, type ApiDeps } from '../../../context.ts'
import { revokeKey } from '../../../key-actions.ts'

export default function revokeApiKey(deps: ApiDeps, _params: unknown, c: Context, input?: unknown): AccountRevokeApiKeyOutput {
  return { revoked: revokeKey(deps, callerOf(c), (input as AccountRevokeApiKeyInput).id) }
}
