import type { Context } from 'hono'
import type { AccountCreateApiKeyInput, AccountCreateApiKeyOutput } from '../../../../../src/lexicon/generated/types.ts'
import { InvalidRequestError } from '../../../../../src/xrpc/errors.ts'
import { SCOPES, type Scope } from '../../../../api-keys.ts'
import { callerOf, requireScope, type ApiDeps } from '../../../../api/context.ts'

const DEFAULT_SCOPES: Scope[] = ['read', 'inference']

export default function createApiKey(deps: ApiDeps, _params: unknown, c: Context, input?: unknown): AccountCreateApiKeyOutput {
  const caller = callerOf(c)
  requireScope(caller, 'keys:manage')
  const body = input as AccountCreateApiKeyInput
  const scopes = (body.scopes ?? DEFAULT_SCOPES) as string[]
  const unknown = scopes.filter((s) => !(SCOPES as readonly string[]).includes(s))
  if (unknown.length) throw new InvalidRequestError(`unknown scope: ${unknown.join(', ')} (known: ${SCOPES.join(', ')})`)
  // A key cannot mint a key more powerful than itself.
  const beyond = scopes.filter((s) => !caller.scopes.includes(s as Scope))
  if (beyond.length) throw new InvalidRequestError(`cannot grant scopes the caller lacks: ${beyond.join(', ')}`)
  if (body.expiresAt && Date.parse(body.expiresAt) <= Date.now()) throw new InvalidRequestError('expiresAt is in the past')
  // ...nor one that outlives it: a key-made key expires no later than its parent.
  let expiresAt = body.expiresAt ? new Date(body.expiresAt).toISOString() : caller.expiresAt
  if (caller.expiresAt && expiresAt && expiresAt > caller.expiresAt) throw new InvalidRequestError(`expiresAt cannot be later than the calling key's (${caller.expiresAt})`)
  expiresAt ??= undefined
  const { key, secret } = deps.keys.create(caller.did, body.name, scopes as Scope[], expiresAt)
  deps.audit.record(caller.did, 'api-key-create', caller.ipHash, { key: key.id, name: key.name, scopes: key.scopes, via: caller.via })
  return { key, secret }
}
