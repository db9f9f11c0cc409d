import { and, asc, count, eq, isNotNull, ne, notInArray, sql } from 'drizzle-orm'
import { accounts, records } from '../../../../../src/db/schema.ts'
import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountListFriendEdgesOutput, AccountListFriendEdgesParams } from '../../../../../src/lexicon/generated/types.ts'
import { decodeCursor, encodeCursor, visible, type ApiContext } from '../../../util.ts'

/** Distinct friender -> subject pairs over all friend records, self-edges left out, by (friender, subject). */
export default function listFriendEdges(ctx: ApiContext, params: AccountListFriendEdgesParams): AccountListFriendEdgesOutput {
  const limit = params.limit!
  const after = decodeCursor(params.cursor, ['string', 'string']) as [string, string] | undefined
  const filters = [
    eq(records.collection, ids.AccountFriend),
    isNotNull(records.subjectDid),
    ne(records.did, records.subjectDid),
    visible(),
    // An edge to a deactivated account would expose it: hidden as well.
    notInArray(records.subjectDid, sql`(SELECT ${accounts.did} FROM ${accounts} WHERE ${accounts.active} = 0)`),
  ]
  const rows = ctx.db
    .selectDistinct({ friender: records.did, subject: sql<string>`${records.subjectDid}` })
    .from(records)
    .where(and(...filters, after ? sql`(${records.did}, ${records.subjectDid}) > (${after[0]}, ${after[1]})` : undefined))
    .orderBy(asc(records.did), asc(records.subjectDid))
    .limit(limit + 1)
    .all()
  const edges = rows.slice(0, limit)
  const last = edges[edges.length - 1]
  const distinct = ctx.db.selectDistinct({ friender: records.did, subject: records.subjectDid }).from(records).where(and(...filters)).as('edges')
  const total = ctx.db.select({ n: count() }).from(distinct).get()?.n ?? 0
  return { edges, total, cursor: rows.length > limit && last ? encodeCursor([last.friender, last.subject]) : undefined }
}
