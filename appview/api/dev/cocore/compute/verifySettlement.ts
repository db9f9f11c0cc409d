import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type {
  ComputeExchangeAttestation,
  ComputePaymentAuthorization,
  ComputeReceipt,
  ComputeSettlement,
  ComputeVerifySettlementOutput,
  ComputeVerifySettlementParams,
} from '../../../../../src/lexicon/generated/types.ts'
import { InvalidRequestError, NotFoundError } from '../../../../../src/xrpc/errors.ts'
import { verifySettlement as verify } from '../../../../verify/settlement.ts'
import { getIndexed, type ApiContext } from '../../../util.ts'

export default async function verifySettlement(ctx: ApiContext, params: ComputeVerifySettlementParams): Promise<ComputeVerifySettlementOutput> {
  const settlement = getIndexed<ComputeSettlement>(ctx.db, params.uri)
  if (!settlement) throw new NotFoundError('settlement not indexed')
  if (settlement.collection !== ids.ComputeSettlement) throw new InvalidRequestError('uri does not name a settlement')
  const of = <T>(uri: string | undefined, collection: string) => {
    const row = getIndexed<T>(ctx.db, uri)
    return row?.collection === collection ? row : undefined
  }
  const doc = ctx.idResolver ? await ctx.idResolver.did.resolve(settlement.did).catch(() => null) : null
  return verify(
    settlement,
    of<ComputeReceipt>(settlement.body.receipt?.uri, ids.ComputeReceipt),
    of<ComputePaymentAuthorization>(settlement.body.requesterAuthorization?.uri, ids.ComputePaymentAuthorization),
    of<ComputeExchangeAttestation>(settlement.body.exchangeAttestation?.uri, ids.ComputeExchangeAttestation),
    doc,
  )
}
