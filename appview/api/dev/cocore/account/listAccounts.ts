import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountListAccountsOutput, AccountListAccountsParams } from '../../../../../src/lexicon/generated/types.ts'
import { decodeCursor, encodeCursor, statement, type ApiContext } from '../../../util.ts'

interface Row {
  did: string
  handle: string | null
  displayName: string | null
  avatarUrl: string | null
  machines: number
  lastAt: string
  joinedAt: string
  sortKey: string
}

/** A non-empty string field of the profile body `p.body`, else NULL. */
const textField = (path: string) => `CASE WHEN json_type(p.body, '${path}') = 'text' THEN NULLIF(json_extract(p.body, '${path}'), '') END`

/**
 * The directory is `account_stats` (one row per account with records, kept by
 * the indexer), walked in the order asked for by its partial index of visible
 * accounts: a page reads its rows and no others. `sortKey` is `last_at` or
 * `joined_at` ('' when no record is dated: such an account sorts last).
 */
const SORT_COLUMN = { recent: 'last_at', newest: 'joined_at' } as const

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
  const key = SORT_COLUMN[sortBy]

  // The SQL is built from fixed fragments by which filters apply (a bounded set of statements); values are bound, in text order.
  const filters = ['s.hidden = 0']
  const filterParams: string[] = []
  if (providersOnly) filters.push('s.machines > 0')
  if (params.viewerDid) {
    filters.push('s.did <> ?')
    filterParams.push(params.viewerDid)
    if (excludeViewerFriends) {
      // The viewer's friend records, from the (did, collection, …) index.
      filters.push('s.did NOT IN (SELECT subject_did FROM records WHERE did = ? AND collection = ? AND subject_did IS NOT NULL)')
      filterParams.push(params.viewerDid, ids.AccountFriend)
    }
  }
  if (q !== undefined) {
    filters.push('(instr(lower(s.handle), ?) > 0 OR instr(lower(s.did), ?) > 0)')
    filterParams.push(q, q)
  }
  const where = filters.join(' AND ')

  const page = statement(
    ctx.db,
    `SELECT s.did AS did, s.handle AS handle, s.last_at AS lastAt, s.joined_at AS joinedAt, s.machines AS machines, s.sortKey AS sortKey,
      ${textField('$.displayName')} AS displayName, ${textField('$.avatarUrl')} AS avatarUrl
    FROM (
      SELECT s.*, s.${key} AS sortKey FROM account_stats s WHERE ${where}
      ${after ? `AND s.${key} <= ? AND (s.${key} < ? OR s.did > ?)` : ''}
      ORDER BY s.${key} DESC, s.did ASC LIMIT ? ${after ? '' : 'OFFSET ?'}
    ) s LEFT JOIN records p ON p.uri = 'at://' || s.did || '/${ids.AccountProfile}/self'
    ORDER BY s.sortKey DESC, s.did ASC`,
  ).all(...filterParams, ...(after ? [after[0], after[0], after[1], limit + 1] : [limit + 1, offset])) as Row[]
  // The total is counted over the filtered set, before the page's keyset/offset applies.
  const total = statement(ctx.db, `SELECT COUNT(*) FROM account_stats s WHERE ${where}`).pluck().get(...filterParams) as number

  const rows = page.slice(0, limit)
  const last = rows[rows.length - 1]
  return {
    // Absent values are null, not left out, as the reference AppView answers.
    accounts: rows.map((r) => ({
      did: r.did,
      handle: r.handle,
      displayName: r.displayName,
      avatarUrl: r.avatarUrl,
      joinedAt: r.joinedAt || null,
      lastActivityAt: r.lastAt || null,
      providerCount: r.machines,
      isProvider: r.machines > 0,
    })),
    total,
    limit,
    offset,
    sortBy,
    providersOnly,
    excludeViewerFriends,
    ...(params.q !== undefined ? { q: params.q } : {}),
    ...(page.length > limit && last ? { cursor: encodeCursor([last.sortKey, last.did]) } : {}),
  }
}
