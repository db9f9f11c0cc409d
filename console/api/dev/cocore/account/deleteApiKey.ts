import type { Context } from 'hono'
import type { AccountDeleteApiKeyInput, AccountDeleteApiKeyOutput } from '../../../../../src/lexicon/generated/types.ts'
import { callerOf, type ApiDeps } from '../../../context.ts'
import { deleteKey } from '../../../key-actions.ts'

export default function deleteApiKey(deps: ApiDeps, _params: unknown, c: Context, input?: unknown): AccountDeleteApiKeyOutput {
  return { deleted: deleteKey(deps, callerOf(c), (input as AccountDeleteApiKeyInput).id) }
}
