import { eq } from 'drizzle-orm'
import { records } from '../../../../../src/db/schema.ts'
import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeListReceiptsOutput, ComputeListReceiptsParams } from '../../../../../src/lexicon/generated/types.ts'
import { pageRecords, recordView, type ApiContext } from '../../../util.ts'

export default function listReceipts(ctx: ApiContext, params: ComputeListReceiptsParams): ComputeListReceiptsOutput {
  const page = pageRecords(
    ctx.db,
    ids.ComputeReceipt,
    [
      params.provider ? eq(records.providerDid, params.provider) : undefined,
      params.requester ? eq(records.requesterDid, params.requester) : undefined,
      params.job ? eq(records.jobUri, params.job) : undefined,
    ],
    params.limit!,
    params.cursor,
  )
  return { receipts: page.rows.map(recordView), cursor: page.cursor }
}
