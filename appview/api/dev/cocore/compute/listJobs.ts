import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeListJobsOutput, ComputeListJobsParams } from '../../../../../src/lexicon/generated/types.ts'
import { pageRecords, recordView, type ApiContext } from '../../../util.ts'

export default function listJobs(ctx: ApiContext, params: ComputeListJobsParams): ComputeListJobsOutput {
  const page = pageRecords(ctx.db, ids.ComputeJob, { requesterDid: params.requester }, params.limit!, params.cursor)
  return { jobs: page.rows.map(recordView), cursor: page.cursor }
}
