import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountListFriendEdgesOutput, AccountListFriendEdgesParams } from '../../../../../src/lexicon/generated/types.ts'
import { decodeCursor, encodeCursor, statement, visible, type ApiContext } from '../../../util.ts'

/** Friend records with a subject other than their author; an edge to a deactivated account would expose it: hidden as well. */
const EDGES = `collection = ? AND subject_did IS NOT NULL AND did <> subject_did AND ${visible()} AND ${visible('subject_did')}`

/** Distinct friender -> subject pairs over all friend records, self-edges left out, by (friender, subject). */
export default function listFriendEdges(ctx: ApiContext, params: AccountListFriendEdgesParams): AccountListFriendEdgesOutput {
  const limit = params.limit!
  const after = decodeCursor(params.cursor, ['string', 'string']) as [string, string] | undefined
  // From the (collection, did, subject_did) index, in its order.
  const rows = (
    after
      ? statement(ctx.db, `SELECT DISTINCT did AS friender, subject_did AS subject FROM records WHERE ${EDGES} AND (did, subject_did) > (?, ?) ORDER BY did, subject_did LIMIT ?`).all(ids.AccountFriend, after[0], after[1], limit + 1)
      : statement(ctx.db, `SELECT DISTINCT did AS friender, subject_did AS subject FROM records WHERE ${EDGES} ORDER BY did, subject_did LIMIT ?`).all(ids.AccountFriend, limit + 1)
  ) as { friender: string; subject: string }[]
  const edges = rows.slice(0, limit)
  const last = edges[edges.length - 1]
  const total = (statement(ctx.db, `SELECT COUNT(*) AS n FROM (SELECT DISTINCT did, subject_did FROM records WHERE ${EDGES})`).get(ids.AccountFriend) as { n: number }).n
  return { edges, total, cursor: rows.length > limit && last ? encodeCursor([last.friender, last.subject]) : undefined }
}
