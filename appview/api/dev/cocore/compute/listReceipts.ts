import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeListReceiptsOutput, ComputeListReceiptsParams } from '../../../../../src/lexicon/generated/types.ts'
import { pageRecords, recordView, type ApiContext } from '../../../util.ts'

export default function listReceipts(ctx: ApiContext, params: ComputeListReceiptsParams): ComputeListReceiptsOutput {
  const page = pageRecords(ctx.db, ids.ComputeReceipt, { providerDid: params.provider, requesterDid: params.requester, jobUri: params.job }, params.limit!, params.cursor)
  return { receipts: page.rows.map(recordView), cursor: page.cursor }
}
