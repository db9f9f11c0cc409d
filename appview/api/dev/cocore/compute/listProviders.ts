import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeListProvidersOutput, ComputeListProvidersParams } from '../../../../../src/lexicon/generated/types.ts'
import type { JsonText } from '../../../../../src/xrpc/server.ts'
import { pageRecords, recordList, type ApiContext } from '../../../util.ts'

export default function listProviders(ctx: ApiContext, params: ComputeListProvidersParams): JsonText<ComputeListProvidersOutput> {
  return recordList('providers', pageRecords(ctx.db, ids.ComputeProvider, { providerDid: params.provider }, params.limit!, params.cursor))
}
