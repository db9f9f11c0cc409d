import { and, eq } from 'drizzle-orm'
import { records } from '../../../../../src/db/schema.ts'
import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountGetProfileOutput, AccountGetProfileParams } from '../../../../../src/lexicon/generated/types.ts'
import { NotFoundError } from '../../../../../src/xrpc/errors.ts'
import { visible, type ApiContext } from '../../../util.ts'

/** The account's `dev.cocore.account.profile` record (rkey `self`), as published. */
export default function getProfile(ctx: ApiContext, params: AccountGetProfileParams): AccountGetProfileOutput {
  const row = ctx.db
    .select({ body: records.body })
    .from(records)
    .where(and(eq(records.did, params.did), eq(records.collection, ids.AccountProfile), eq(records.rkey, 'self'), visible()))
    .get()
  if (!row) throw new NotFoundError('profile not found')
  return { profile: JSON.parse(row.body) }
}
