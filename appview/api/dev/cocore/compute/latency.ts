import type { ComputeLatencyOutput, ComputeLatencyParams } from '../../../../../src/lexicon/generated/types.ts'
import { networkLatency } from '../../../aggregates.ts'
import type { ApiContext } from '../../../util.ts'

/** Latency (completedAt - startedAt) of receipts completed in the last 7 days, from the histograms the indexer keeps. */
export default function latency(ctx: ApiContext, _params: ComputeLatencyParams): ComputeLatencyOutput {
  return networkLatency(ctx.db, Date.now())
}
