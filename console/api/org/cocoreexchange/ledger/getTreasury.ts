import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { OrgCocoreexchangeLedgerGetTreasuryOutput } from '../../../../../src/lexicon/generated/types.ts'
import { MethodNotImplementedError } from '../../../../../src/xrpc/errors.ts'
import { CURRENCY } from '../../../../exchange/policy.ts'
import type { ApiDeps } from '../../../context.ts'

/** Public aggregates of the ledger; no account's balance but the treasury's. */
export default function getTreasury(deps: ApiDeps): OrgCocoreexchangeLedgerGetTreasuryOutput {
  const economy = deps.inference?.economy
  if (!economy) throw new MethodNotImplementedError(ids.OrgCocoreexchangeLedgerGetTreasury)
  return { ...economy.figures(), currency: CURRENCY }
}
