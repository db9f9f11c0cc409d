import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountGetProfileOutput, AccountGetProfileParams } from '../../../../../src/lexicon/generated/types.ts'
import { NotFoundError } from '../../../../../src/xrpc/errors.ts'
import { statement, visible, type ApiContext } from '../../../util.ts'

/** The account's `dev.cocore.account.profile` record (rkey `self`), as published. */
export default function getProfile(ctx: ApiContext, params: AccountGetProfileParams): AccountGetProfileOutput {
  const row = statement(ctx.db, `SELECT body FROM records WHERE did = ? AND collection = ? AND rkey = 'self' AND ${visible()}`).get(params.did, ids.AccountProfile) as { body: string } | undefined
  if (!row) throw new NotFoundError('profile not found')
  return { profile: JSON.parse(row.body) }
}
