import type { Context } from 'hono'
import type { AccountCreateApiKeyInput, AccountCreateApiKeyOutput } from '../../../../../src/lexicon/generated/types.ts'
import { callerOf, type ApiDeps } from '../../../context.ts'
import { createKey } from '../../../key-actions.ts'

export default function createApiKey(deps: ApiDeps, _params: unknown, c: Context, input?: unknown): AccountCreateApiKeyOutput {
  const body = input as AccountCreateApiKeyInput
  return createKey(deps, callerOf(c), { name: body.name, scopes: body.scopes as string[] | undefined, expiresAt: body.expiresAt })
}
