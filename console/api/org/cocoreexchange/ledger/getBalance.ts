import type { Context } from 'hono'
import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { OrgCocoreexchangeLedgerGetBalanceOutput } from '../../../../../src/lexicon/generated/types.ts'
import { MethodNotImplementedError } from '../../../../../src/xrpc/errors.ts'
import { CURRENCY } from '../../../../exchange/policy.ts'
import { callerOf, requireScope, type ApiDeps } from '../../../context.ts'

export default function getBalance(deps: ApiDeps, _params: unknown, c: Context): OrgCocoreexchangeLedgerGetBalanceOutput {
  const economy = deps.inference?.economy
  if (!economy) throw new MethodNotImplementedError(ids.OrgCocoreexchangeLedgerGetBalance)
  const caller = callerOf(c)
  requireScope(caller, 'read')
  const { ok, balance, held, available } = economy.admissible(caller.did)
  return { did: caller.did, balance, held, available, currency: CURRENCY, floor: economy.policy.floor, admissible: ok }
}
