import type { AccountListFriendEdgesOutput, AccountListFriendEdgesParams } from '../../../../../src/lexicon/generated/types.ts'
import { decodeCursor, encodeCursor, statement, type ApiContext } from '../../../util.ts'

/**
 * A page of `friend_edges` (one row per pair, kept by the indexer) in
 * (friender, subject) order, from its partial index of the listed pairs:
 * both ends visible, not a self-edge.
 */
const edgesPage = (keyset: boolean) => `
  SELECT friender, subject, first_at AS first, created_at AS createdAt FROM friend_edges
  WHERE friender_hidden = 0 AND subject_hidden = 0 AND friender <> subject ${keyset ? 'AND (friender, subject) > (?, ?)' : ''}
  ORDER BY friender, subject LIMIT ?`
const FIRST_PAGE = edgesPage(false)
const NEXT_PAGE = edgesPage(true)

/** Distinct friender -> subject pairs over all friend records, self-edges left out, by (friender, subject), each with its oldest record's createdAt. */
export default function listFriendEdges(ctx: ApiContext, params: AccountListFriendEdgesParams): AccountListFriendEdgesOutput {
  const limit = params.limit!
  const after = decodeCursor(params.cursor, ['string', 'string']) as [string, string] | undefined
  const rows = (after ? statement(ctx.db, NEXT_PAGE).all(after[0], after[1], limit + 1) : statement(ctx.db, FIRST_PAGE).all(limit + 1)) as {
    friender: string
    subject: string
    first: string
    createdAt: string | null
  }[]
  const page = rows.slice(0, limit)
  const last = page[page.length - 1]
  const total = (statement(ctx.db, "SELECT n FROM index_counts WHERE name = 'friend_edges'").pluck().get() as number | undefined) ?? 0
  return {
    edges: page.map((r) => {
      const createdAt = r.createdAt ?? (r.first || undefined)
      return { friender: r.friender, subject: r.subject, ...(createdAt ? { createdAt } : {}) }
    }),
    total,
    cursor: rows.length > limit && last ? encodeCursor([last.friender, last.subject]) : undefined,
  }
}
