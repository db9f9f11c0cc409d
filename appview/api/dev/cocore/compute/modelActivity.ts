import type { ComputeModelActivityOutput, ComputeModelActivityParams } from '../../../../../src/lexicon/generated/types.ts'
import { modelActivity as activity } from '../../../aggregates.ts'
import type { ApiContext } from '../../../util.ts'

/** Per-model request and token counts over the trailing hour/day/week/30 days, by completedAt, from the counters the indexer keeps. */
export default function modelActivity(ctx: ApiContext, _params: ComputeModelActivityParams): ComputeModelActivityOutput {
  return activity(ctx.db, Date.now())
}
