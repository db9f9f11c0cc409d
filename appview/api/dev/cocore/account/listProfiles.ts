import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountListProfilesOutput, AccountListProfilesParams } from '../../../../../src/lexicon/generated/types.ts'
import { pageRecords, recordView, type ApiContext } from '../../../util.ts'

export default function listProfiles(ctx: ApiContext, params: AccountListProfilesParams): AccountListProfilesOutput {
  const page = pageRecords(ctx.db, ids.AccountProfile, {}, params.limit!, params.cursor)
  return { profiles: page.rows.map(recordView), cursor: page.cursor }
}
