import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeAttestation, ComputeJob, ComputeReceipt, ComputeVerifyReceiptOutput, ComputeVerifyReceiptParams } from '../../../../../src/lexicon/generated/types.ts'
import { InvalidRequestError, NotFoundError } from '../../../../../src/xrpc/errors.ts'
import { verifyReceipt as verify } from '../../../../verify/receipt.ts'
import { getIndexed, type ApiContext } from '../../../util.ts'

export default async function verifyReceipt(ctx: ApiContext, params: ComputeVerifyReceiptParams): Promise<ComputeVerifyReceiptOutput> {
  const receipt = getIndexed<ComputeReceipt>(ctx.db, params.uri)
  if (!receipt) throw new NotFoundError('receipt not indexed')
  if (receipt.collection !== ids.ComputeReceipt) throw new InvalidRequestError('uri does not name a receipt')
  const job = getIndexed<ComputeJob>(ctx.db, receipt.body.job?.uri)
  const attestation = getIndexed<ComputeAttestation>(ctx.db, receipt.body.attestation?.uri)
  // The one networked step: the countersigning brokerage's DID document (cached), resolved before the offline checks.
  const authority = receipt.body.brokerageCountersignature?.authority
  const authorityDoc = typeof authority === 'string' && ctx.brokerage ? await ctx.brokerage.authorities.resolve(authority) : null
  return verify(receipt, job?.collection === ids.ComputeJob ? job : undefined, attestation?.collection === ids.ComputeAttestation ? attestation : undefined, {
    trusted: ctx.brokerage?.trusted ?? new Set(),
    authorityDoc,
  })
}
