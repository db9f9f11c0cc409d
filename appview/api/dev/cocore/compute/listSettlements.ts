import { eq } from 'drizzle-orm'
import { records } from '../../../../../src/db/schema.ts'
import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeListSettlementsOutput, ComputeListSettlementsParams } from '../../../../../src/lexicon/generated/types.ts'
import { pageRecords, recordView, type ApiContext } from '../../../util.ts'

export default function listSettlements(ctx: ApiContext, params: ComputeListSettlementsParams): ComputeListSettlementsOutput {
  const page = pageRecords(
    ctx.db,
    ids.ComputeSettlement,
    [
      params.receipt ? eq(records.receiptUri, params.receipt) : undefined,
      // The requester is the repo of the settlement's requesterAuthorization (see indexer/columns.ts).
      params.requester ? eq(records.requesterDid, params.requester) : undefined,
    ],
    params.limit!,
    params.cursor,
  )
  return { settlements: page.rows.map(recordView), cursor: page.cursor }
}
