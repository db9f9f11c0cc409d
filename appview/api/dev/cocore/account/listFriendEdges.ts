import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountListFriendEdgesOutput, AccountListFriendEdgesParams } from '../../../../../src/lexicon/generated/types.ts'
import { decodeCursor, encodeCursor, statement, visible, type ApiContext } from '../../../util.ts'

/** Friend records with a subject other than their author; an edge to a deactivated account would expose it: hidden as well. */
const EDGES = `collection = ? AND subject_did IS NOT NULL AND did <> subject_did AND ${visible()} AND ${visible('subject_did')}`

/**
 * A page of pairs in (friender, subject) order, walking the (collection, did,
 * subject_did) index. With MIN(), SQLite takes the bare `created_at` from the
 * row holding the minimum: the createdAt of the pair's oldest record.
 */
const edgesPage = (keyset: boolean) => `
  SELECT did AS friender, subject_did AS subject, MIN(sort_at) AS first, json_extract(body, '$.createdAt') AS createdAt
  FROM records WHERE ${EDGES} ${keyset ? 'AND (did, subject_did) > (?, ?)' : ''}
  GROUP BY did, subject_did ORDER BY did, subject_did LIMIT ?`
const FIRST_PAGE = edgesPage(false)
const NEXT_PAGE = edgesPage(true)

/** Distinct friender -> subject pairs over all friend records, self-edges left out, by (friender, subject), each with its oldest record's createdAt. */
export default function listFriendEdges(ctx: ApiContext, params: AccountListFriendEdgesParams): AccountListFriendEdgesOutput {
  const limit = params.limit!
  const after = decodeCursor(params.cursor, ['string', 'string']) as [string, string] | undefined
  const rows = (after ? statement(ctx.db, NEXT_PAGE).all(ids.AccountFriend, after[0], after[1], limit + 1) : statement(ctx.db, FIRST_PAGE).all(ids.AccountFriend, limit + 1)) as {
    friender: string
    subject: string
    first: string
    createdAt: unknown
  }[]
  const page = rows.slice(0, limit)
  const last = page[page.length - 1]
  const total = (statement(ctx.db, `SELECT COUNT(*) AS n FROM (SELECT DISTINCT did, subject_did FROM records WHERE ${EDGES})`).get(ids.AccountFriend) as { n: number }).n
  return {
    edges: page.map((r) => {
      const createdAt = typeof r.createdAt === 'string' ? r.createdAt : r.first || undefined
      return { friender: r.friender, subject: r.subject, ...(createdAt ? { createdAt } : {}) }
    }),
    total,
    cursor: rows.length > limit && last ? encodeCursor([last.friender, last.subject]) : undefined,
  }
}
