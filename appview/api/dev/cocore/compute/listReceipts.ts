import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeListReceiptsOutput, ComputeListReceiptsParams } from '../../../../../src/lexicon/generated/types.ts'
import type { JsonText } from '../../../../../src/xrpc/server.ts'
import { pageRecords, recordList, type ApiContext } from '../../../util.ts'

export default function listReceipts(ctx: ApiContext, params: ComputeListReceiptsParams): JsonText<ComputeListReceiptsOutput> {
  return recordList('receipts', pageRecords(ctx.db, ids.ComputeReceipt, { providerDid: params.provider, requesterDid: params.requester, jobUri: params.job }, params.limit!, params.cursor))
}
