import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { OrgCocoreexchangeLedgerGetPolicyOutput } from '../../../../../src/lexicon/generated/types.ts'
import { MethodNotImplementedError } from '../../../../../src/xrpc/errors.ts'
import { policyRecord } from '../../../../exchange/policy.ts'
import type { ApiDeps } from '../../../context.ts'

/** Public: what this exchange enforces, and where it published it. */
export default function getPolicy(deps: ApiDeps): OrgCocoreexchangeLedgerGetPolicyOutput {
  const economy = deps.inference?.economy
  if (!economy) throw new MethodNotImplementedError(ids.OrgCocoreexchangeLedgerGetPolicy)
  const { policy, attestation } = economy.refs
  return {
    exchange: economy.repo.did,
    policy: { uri: policy.uri, cid: policy.cid },
    attestation: { uri: attestation.uri, cid: attestation.cid },
    signingKeyFingerprint: economy.key.fingerprint,
    value: { $type: ids.ComputeExchangePolicy, ...policyRecord(economy.policy, economy.repo.did) },
  }
}
