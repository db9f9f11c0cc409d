import { and, eq, sql, type SQL } from 'drizzle-orm'
import { accounts, records } from '../../../../../src/db/schema.ts'
import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountListAccountsOutput, AccountListAccountsParams } from '../../../../../src/lexicon/generated/types.ts'
import { decodeCursor, encodeCursor, visible, type ApiContext } from '../../../util.ts'

interface Row {
  did: string
  handle: string | null
  displayName: string | null
  avatarUrl: string | null
  providerCount: number
  lastAt: string
  sortKey: string
  total: number
}

/** A non-empty string field of a JSON body, else NULL. */
const textField = (body: SQL, path: string) => sql`CASE WHEN json_type(${body}, ${path}) = 'text' THEN NULLIF(json_extract(${body}, ${path}), '') END`

/**
 * The account directory: every visible DID with at least one indexed record,
 * with profile details and provider count, by latest activity or by first
 * record (`newest`), then DID. Pages by keyset cursor, or by `offset` for
 * older clients (used only without a cursor).
 */
export default function listAccounts(ctx: ApiContext, params: AccountListAccountsParams): AccountListAccountsOutput {
  const limit = params.limit!
  const offset = params.offset ?? 0
  const sortBy = params.sortBy ?? 'recent'
  const providersOnly = params.providersOnly ?? false
  const excludeViewerFriends = params.excludeViewerFriends ?? false
  const after = decodeCursor(params.cursor, ['string', 'string']) as [string, string] | undefined
  const q = params.q === undefined ? undefined : params.q.trim().replace(/^@/, '').toLowerCase()

  // `p` is the account's profile record (rkey self), `a` its accounts row.
  const profileBody = sql`p.body`

  // Per DID, one pass over the (did, collection, sort_at, uri) index.
  const perDid = sql`
    SELECT ${records.did} AS did, MAX(${records.sortAt}) AS last_at, MIN(${records.sortAt}) AS joined_at,
      SUM(${records.collection} = ${ids.ComputeProvider}) AS provider_count
    FROM ${records} WHERE ${visible()} GROUP BY ${records.did}`
  const directory = sql`
    SELECT d.did AS did, d.last_at AS lastAt, d.provider_count AS providerCount,
      ${sortBy === 'newest' ? sql`d.joined_at` : sql`d.last_at`} AS sortKey,
      COALESCE(NULLIF(a.handle, ''), ${textField(profileBody, '$.handle')}) AS handle,
      ${textField(profileBody, '$.displayName')} AS displayName,
      ${textField(profileBody, '$.avatarUrl')} AS avatarUrl
    FROM (${perDid}) d
    LEFT JOIN ${accounts} a ON a.did = d.did
    LEFT JOIN ${records} p ON p.did = d.did AND p.collection = ${ids.AccountProfile} AND p.rkey = 'self'`

  // The viewer's friend records, from the (did, collection, …) index. COALESCE: a NULL in a NOT IN list would exclude every row.
  const viewerFriends = ctx.db
    .select({ subject: sql`COALESCE(${records.subjectDid}, '')` })
    .from(records)
    .where(and(eq(records.did, params.viewerDid ?? ''), eq(records.collection, ids.AccountFriend)))
  const filters = and(
    providersOnly ? sql`providerCount > 0` : undefined,
    params.viewerDid ? sql`did <> ${params.viewerDid}` : undefined,
    params.viewerDid && excludeViewerFriends ? sql`did NOT IN ${viewerFriends}` : undefined,
    q !== undefined ? sql`(instr(lower(handle), ${q}) > 0 OR instr(lower(did), ${q}) > 0)` : undefined,
  )
  const where = filters ? sql`WHERE ${filters}` : sql``

  // The total is counted over the filtered set before the page's keyset/offset applies.
  const rows = ctx.db.all<Row>(sql`
    SELECT * FROM (SELECT dir.*, COUNT(*) OVER () AS total FROM (${directory}) dir ${where})
    ${after ? sql`WHERE (sortKey < ${after[0]} OR (sortKey = ${after[0]} AND did > ${after[1]}))` : sql``}
    ORDER BY sortKey DESC, did ASC
    LIMIT ${limit + 1} ${after ? sql`` : sql`OFFSET ${offset}`}`)

  const page = rows.slice(0, limit)
  const total =
    rows[0]?.total ?? (after || offset > 0 ? (ctx.db.get<{ n: number }>(sql`SELECT COUNT(*) AS n FROM (${directory}) dir ${where}`)?.n ?? 0) : 0)
  const last = page[page.length - 1]
  return {
    accounts: page.map((r) => ({
      did: r.did,
      ...(r.handle ? { handle: r.handle } : {}),
      ...(r.displayName ? { displayName: r.displayName } : {}),
      ...(r.avatarUrl ? { avatarUrl: r.avatarUrl } : {}),
      providerCount: r.providerCount,
      ...(r.lastAt ? { lastActivityAt: r.lastAt } : {}),
    })),
    total,
    limit,
    offset,
    sortBy,
    providersOnly,
    excludeViewerFriends,
    ...(params.q !== undefined ? { q: params.q } : {}),
    ...(rows.length > limit && last ? { cursor: encodeCursor([last.sortKey, last.did]) } : {}),
  }
}
