import type { AccountListIncomingFriendsOutput, AccountListIncomingFriendsParams } from '../../../../../src/lexicon/generated/types.ts'
import { decodeCursor, encodeCursor, statement, type ApiContext } from '../../../util.ts'

interface Row {
  friender: string
  uri: string
  sortAt: string
  createdAt: string | null
  handle: string | null
}

/**
 * The subject's visible frienders in `friend_edges` (one row per pair, with
 * its oldest record), newest first, then by friender: a range of its
 * (subject, friender_hidden, first_at, friender) index.
 */
const incomingPage = (keyset: boolean) => `
  SELECT e.friender AS friender, e.first_uri AS uri, e.first_at AS sortAt, e.created_at AS createdAt, a.handle AS handle
  FROM friend_edges e LEFT JOIN accounts a ON a.did = e.friender
  WHERE e.subject = ? AND e.friender_hidden = 0 ${keyset ? 'AND e.first_at <= ? AND (e.first_at < ? OR e.friender > ?)' : ''}
  ORDER BY e.first_at DESC, e.friender ASC
  LIMIT ?`
const FIRST_PAGE = incomingPage(false)
const NEXT_PAGE = incomingPage(true)

/**
 * Accounts that friended `did`: one entry per friender, its oldest friend
 * record to `did`, ordered by that record's time (newest first), then friender.
 */
export default function listIncomingFriends(ctx: ApiContext, params: AccountListIncomingFriendsParams): AccountListIncomingFriendsOutput {
  const limit = params.limit!
  const after = decodeCursor(params.cursor, ['string', 'string']) as [string, string] | undefined
  const rows = (
    after ? statement(ctx.db, NEXT_PAGE).all(params.did, after[0], after[0], after[1], limit + 1) : statement(ctx.db, FIRST_PAGE).all(params.did, limit + 1)
  ) as Row[]
  const page = rows.slice(0, limit)
  const total = (statement(ctx.db, 'SELECT n FROM friend_counts WHERE subject = ?').pluck().get(params.did) as number | undefined) ?? 0
  const last = page[page.length - 1]
  return {
    friends: page.map((r) => {
      const createdAt = r.createdAt ?? (r.sortAt || undefined)
      return {
        friender: r.friender,
        ...(r.handle ? { frienderHandle: r.handle } : {}),
        subject: params.did,
        uri: r.uri,
        ...(createdAt ? { createdAt } : {}),
      }
    }),
    total,
    cursor: rows.length > limit && last ? encodeCursor([last.sortAt, last.friender]) : undefined,
  }
}
