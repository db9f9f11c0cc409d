import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { ComputeAttestation, ComputeJob, ComputeReceipt, ComputeVerifyReceiptOutput, ComputeVerifyReceiptParams } from '../../../../../src/lexicon/generated/types.ts'
import { InvalidRequestError, NotFoundError } from '../../../../../src/xrpc/errors.ts'
import { verifyReceipt as verify } from '../../../../verify/receipt.ts'
import { getIndexed, type ApiContext } from '../../../util.ts'

export default function verifyReceipt(ctx: ApiContext, params: ComputeVerifyReceiptParams): ComputeVerifyReceiptOutput {
  const receipt = getIndexed<ComputeReceipt>(ctx.db, params.uri)
  if (!receipt) throw new NotFoundError('receipt not indexed')
  if (receipt.collection !== ids.ComputeReceipt) throw new InvalidRequestError('uri does not name a receipt')
  const job = getIndexed<ComputeJob>(ctx.db, receipt.body.job?.uri)
  const attestation = getIndexed<ComputeAttestation>(ctx.db, receipt.body.attestation?.uri)
  return verify(receipt, job?.collection === ids.ComputeJob ? job : undefined, attestation?.collection === ids.ComputeAttestation ? attestation : undefined)
}
