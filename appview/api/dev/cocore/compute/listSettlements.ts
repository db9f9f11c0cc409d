import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeListSettlementsOutput, ComputeListSettlementsParams } from '../../../../../src/lexicon/generated/types.ts'
import type { JsonText } from '../../../../../src/xrpc/server.ts'
import { pageRecords, recordList, type ApiContext } from '../../../util.ts'

export default function listSettlements(ctx: ApiContext, params: ComputeListSettlementsParams): JsonText<ComputeListSettlementsOutput> {
  // The requester is the repo of the settlement's requesterAuthorization (see indexer/columns.ts).
  return recordList('settlements', pageRecords(ctx.db, ids.ComputeSettlement, { receiptUri: params.receipt, requesterDid: params.requester }, params.limit!, params.cursor))
}
