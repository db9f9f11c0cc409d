import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeListProvidersOutput, ComputeListProvidersParams } from '../../../../../src/lexicon/generated/types.ts'
import { pageRecords, recordView, type ApiContext } from '../../../util.ts'

export default function listProviders(ctx: ApiContext, params: ComputeListProvidersParams): ComputeListProvidersOutput {
  const page = pageRecords(ctx.db, ids.ComputeProvider, { providerDid: params.provider }, params.limit!, params.cursor)
  return { providers: page.rows.map(recordView), cursor: page.cursor }
}
