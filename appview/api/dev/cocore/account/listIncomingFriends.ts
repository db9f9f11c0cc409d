import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountListIncomingFriendsOutput, AccountListIncomingFriendsParams } from '../../../../../src/lexicon/generated/types.ts'
import { decodeCursor, encodeCursor, statement, visible, type ApiContext } from '../../../util.ts'

interface Row {
  friender: string
  uri: string
  sortAt: string
  createdAt: unknown
  handle: string | null
}

/** Friend records naming the subject: a range of the (collection, subject_did, sort_at, uri) index. */
const INCOMING = `collection = ? AND subject_did = ? AND ${visible()}`

/** Per friender, its oldest friend record to the subject; then the page, newest first, then by friender. */
const incomingPage = (keyset: boolean) => `
  WITH firsts AS (
    SELECT did AS friender, uri, sort_at, json_extract(body, '$.createdAt') AS created_at,
      ROW_NUMBER() OVER (PARTITION BY did ORDER BY sort_at, uri) AS rn
    FROM records WHERE ${INCOMING}
  )
  SELECT f.friender AS friender, f.uri AS uri, f.sort_at AS sortAt, f.created_at AS createdAt, a.handle AS handle
  FROM firsts f LEFT JOIN accounts a ON a.did = f.friender
  WHERE f.rn = 1 ${keyset ? 'AND (f.sort_at < ? OR (f.sort_at = ? AND f.friender > ?))' : ''}
  ORDER BY f.sort_at DESC, f.friender ASC
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
    after
      ? statement(ctx.db, NEXT_PAGE).all(ids.AccountFriend, params.did, after[0], after[0], after[1], limit + 1)
      : statement(ctx.db, FIRST_PAGE).all(ids.AccountFriend, params.did, limit + 1)
  ) as Row[]
  const page = rows.slice(0, limit)
  const total = (statement(ctx.db, `SELECT COUNT(DISTINCT did) AS n FROM records WHERE ${INCOMING}`).get(ids.AccountFriend, params.did) as { n: number }).n
  const last = page[page.length - 1]
  return {
    friends: page.map((r) => {
      const createdAt = typeof r.createdAt === 'string' ? r.createdAt : r.sortAt || undefined
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
