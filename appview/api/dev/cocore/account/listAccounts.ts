import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountListAccountsOutput, AccountListAccountsParams } from '../../../../../src/lexicon/generated/types.ts'
import { ACCOUNT_DIRECTORY, ACCOUNT_DIRECTORY_PARAMS } from '../../../aggregates.ts'
import { decodeCursor, encodeCursor, statement, type ApiContext } from '../../../util.ts'

interface Row {
  did: string
  handle: string | null
  displayName: string | null
  avatarUrl: string | null
  providerCount: number
  lastAt: string
  joinedAt: string | null
  sortKey: string
  total: number
}

/** A non-empty string field of the profile body `p.body`, else NULL. */
const textField = (path: string) => `CASE WHEN json_type(p.body, '${path}') = 'text' THEN NULLIF(json_extract(p.body, '${path}'), '') END`

/**
 * Every account of the directory (aggregates.ts) with its handle and profile
 * details. `p` is the account's profile record (rkey self), `a` its accounts
 * row. An account none of whose records is dated sorts last by `newest`.
 */
const directory = (sortBy: 'recent' | 'newest') => `
  SELECT d.did AS did, d.last_at AS lastAt, d.joined_at AS joinedAt, d.provider_count AS providerCount,
    ${sortBy === 'newest' ? "COALESCE(d.joined_at, '')" : 'd.last_at'} AS sortKey,
    COALESCE(NULLIF(a.handle, ''), ${textField('$.handle')}) AS handle,
    ${textField('$.displayName')} AS displayName,
    ${textField('$.avatarUrl')} AS avatarUrl
  FROM (${ACCOUNT_DIRECTORY}) d
  LEFT JOIN accounts a ON a.did = d.did
  LEFT JOIN records p ON p.did = d.did AND p.collection = ? AND p.rkey = 'self'`

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

  // The SQL is built from fixed fragments by which filters apply (a bounded set of statements); values are bound, in text order.
  const filters: string[] = []
  const filterParams: (string | number)[] = []
  if (providersOnly) filters.push('providerCount > 0')
  if (params.viewerDid) {
    filters.push('did <> ?')
    filterParams.push(params.viewerDid)
    if (excludeViewerFriends) {
      // The viewer's friend records, from the (did, collection, …) index. COALESCE: a NULL in a NOT IN list would exclude every row.
      filters.push(`did NOT IN (SELECT COALESCE(subject_did, '') FROM records WHERE did = ? AND collection = ?)`)
      filterParams.push(params.viewerDid, ids.AccountFriend)
    }
  }
  if (q !== undefined) {
    filters.push('(instr(lower(handle), ?) > 0 OR instr(lower(did), ?) > 0)')
    filterParams.push(q, q)
  }
  const where = filters.length ? `WHERE ${filters.join(' AND ')}` : ''
  const dir = directory(sortBy)
  const dirParams = [...ACCOUNT_DIRECTORY_PARAMS, ids.AccountProfile]

  // The total is counted over the filtered set before the page's keyset/offset applies.
  const rows = statement(
    ctx.db,
    `SELECT * FROM (SELECT dir.*, COUNT(*) OVER () AS total FROM (${dir}) dir ${where})
    ${after ? 'WHERE (sortKey < ? OR (sortKey = ? AND did > ?))' : ''}
    ORDER BY sortKey DESC, did ASC
    LIMIT ? ${after ? '' : 'OFFSET ?'}`,
  ).all(...dirParams, ...filterParams, ...(after ? [after[0], after[0], after[1], limit + 1] : [limit + 1, offset])) as Row[]

  const page = rows.slice(0, limit)
  const total =
    rows[0]?.total ??
    (after || offset > 0 ? ((statement(ctx.db, `SELECT COUNT(*) AS n FROM (${dir}) dir ${where}`).get(...dirParams, ...filterParams) as { n: number } | undefined)?.n ?? 0) : 0)
  const last = page[page.length - 1]
  return {
    // Absent values are null, not left out, as the reference AppView answers.
    accounts: page.map((r) => ({
      did: r.did,
      handle: r.handle,
      displayName: r.displayName,
      avatarUrl: r.avatarUrl,
      joinedAt: r.joinedAt,
      lastActivityAt: r.lastAt || null,
      providerCount: r.providerCount,
      isProvider: r.providerCount > 0,
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
