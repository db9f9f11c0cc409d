import { and, eq, sql } from 'drizzle-orm'
import { accounts, records } from '../../../../../src/db/schema.ts'
import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountListIncomingFriendsOutput, AccountListIncomingFriendsParams } from '../../../../../src/lexicon/generated/types.ts'
import { decodeCursor, encodeCursor, visible, type ApiContext } from '../../../util.ts'

interface Row {
  friender: string
  uri: string
  sortAt: string
  createdAt: unknown
  handle: string | null
}

/**
 * Accounts that friended `did`: one entry per friender, its oldest friend
 * record to `did`, ordered by that record's time (newest first), then friender.
 */
export default function listIncomingFriends(ctx: ApiContext, params: AccountListIncomingFriendsParams): AccountListIncomingFriendsOutput {
  const limit = params.limit!
  const after = decodeCursor(params.cursor, ['string', 'string']) as [string, string] | undefined
  // Friend records naming the subject: a range of the (collection, subject_did, sort_at, uri) index.
  const incoming = and(eq(records.collection, ids.AccountFriend), eq(records.subjectDid, params.did), visible())
  const rows = ctx.db.all<Row>(sql`
    WITH firsts AS (
      SELECT ${records.did} AS friender, ${records.uri} AS uri, ${records.sortAt} AS sort_at,
        json_extract(${records.body}, '$.createdAt') AS created_at,
        ROW_NUMBER() OVER (PARTITION BY ${records.did} ORDER BY ${records.sortAt}, ${records.uri}) AS rn
      FROM ${records} WHERE ${incoming}
    )
    SELECT f.friender AS friender, f.uri AS uri, f.sort_at AS sortAt, f.created_at AS createdAt, a.handle AS handle
    FROM firsts f LEFT JOIN ${accounts} a ON a.did = f.friender
    WHERE f.rn = 1 ${after ? sql`AND (f.sort_at < ${after[0]} OR (f.sort_at = ${after[0]} AND f.friender > ${after[1]}))` : sql``}
    ORDER BY f.sort_at DESC, f.friender ASC
    LIMIT ${limit + 1}`)
  const page = rows.slice(0, limit)
  const total = ctx.db.get<{ n: number }>(sql`SELECT COUNT(DISTINCT ${records.did}) AS n FROM ${records} WHERE ${incoming}`)?.n ?? 0
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
