import type { Context } from 'hono'
import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { OrgCocoreexchangeLedgerListEntriesOutput, OrgCocoreexchangeLedgerListEntriesParams } from '../../../../../src/lexicon/generated/types.ts'
import { InvalidRequestError, MethodNotImplementedError } from '../../../../../src/xrpc/errors.ts'
import { callerOf, requireScope, type ApiDeps } from '../../../context.ts'

export default function listEntries(deps: ApiDeps, params: OrgCocoreexchangeLedgerListEntriesParams, c: Context): OrgCocoreexchangeLedgerListEntriesOutput {
  const economy = deps.inference?.economy
  if (!economy) throw new MethodNotImplementedError(ids.OrgCocoreexchangeLedgerListEntries)
  const caller = callerOf(c)
  requireScope(caller, 'read')
  // The cursor is the last transaction id seen.
  const before = params.cursor === undefined ? undefined : Number(params.cursor)
  if (before !== undefined && !Number.isSafeInteger(before)) throw new InvalidRequestError('malformed cursor')
  const limit = params.limit ?? 50
  const rows = economy.ledger.history(caller.did, limit + 1, before)
  const page = rows.slice(0, limit)
  return {
    entries: page.map((r) => ({
      id: r.txnId,
      kind: r.kind,
      amount: r.amount,
      ...(typeof r.meta?.receipt === 'string' ? { receipt: r.meta.receipt } : {}),
      createdAt: r.createdAt,
    })),
    ...(rows.length > limit ? { cursor: String(page[page.length - 1]!.txnId) } : {}),
  }
}
