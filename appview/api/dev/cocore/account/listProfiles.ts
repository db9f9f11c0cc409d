import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountListProfilesOutput, AccountListProfilesParams } from '../../../../../src/lexicon/generated/types.ts'
import type { JsonText } from '../../../../../src/xrpc/server.ts'
import { pageRecords, recordList, type ApiContext } from '../../../util.ts'

export default function listProfiles(ctx: ApiContext, params: AccountListProfilesParams): JsonText<AccountListProfilesOutput> {
  return recordList('profiles', pageRecords(ctx.db, ids.AccountProfile, {}, params.limit!, params.cursor))
}
