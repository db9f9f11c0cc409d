import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeListJobsOutput, ComputeListJobsParams } from '../../../../../src/lexicon/generated/types.ts'
import type { JsonText } from '../../../../../src/xrpc/server.ts'
import { pageRecords, recordList, type ApiContext } from '../../../util.ts'

export default function listJobs(ctx: ApiContext, params: ComputeListJobsParams): JsonText<ComputeListJobsOutput> {
  return recordList('jobs', pageRecords(ctx.db, ids.ComputeJob, { requesterDid: params.requester }, params.limit!, params.cursor))
}
