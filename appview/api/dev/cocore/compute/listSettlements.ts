import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeListSettlementsOutput, ComputeListSettlementsParams } from '../../../../../src/lexicon/generated/types.ts'
import { pageRecords, recordView, type ApiContext } from '../../../util.ts'

export default function listSettlements(ctx: ApiContext, params: ComputeListSettlementsParams): ComputeListSettlementsOutput {
  // The requester is the repo of the settlement's requesterAuthorization (see indexer/columns.ts).
  const page = pageRecords(ctx.db, ids.ComputeSettlement, { receiptUri: params.receipt, requesterDid: params.requester }, params.limit!, params.cursor)
  return { settlements: page.rows.map(recordView), cursor: page.cursor }
}
