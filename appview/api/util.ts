/**
 * Shared pieces of the read API: the handler context, prepared statements,
 * record views and keyset cursors.
 *
 * Reads are plain SQL on statements prepared once per connection, not drizzle
 * queries: building a query and having SQLite compile it cost more than
 * running it (a page of a list is an index range scan of a few dozen rows),
 * and under load that was half the CPU of every read (bench/reads.ts).
 */
import type { Statement } from 'better-sqlite3'
import type { IdResolver } from '@atproto/identity'
import type { Db } from '../../src/db/index.ts'
import type { AuthorityResolver } from '../../src/identity/authority.ts'
import { InvalidRequestError } from '../../src/xrpc/errors.ts'
import { JsonText } from '../../src/xrpc/server.ts'
import type { DefsIndexedRecord } from '../../src/lexicon/generated/types.ts'

export interface ApiContext {
  db: Db
  /** For the few reads that need a DID document (the exchange's settlement key). */
  idResolver?: IdResolver
  /** verifyReceipt: the brokerages it trusts, and their DID documents (absent: every countersignature is unverifiable). */
  brokerage?: { trusted: ReadonlySet<string>; authorities: AuthorityResolver }
}

const prepared = new WeakMap<Db['$client'], Map<string, Statement>>()

/**
 * The statement for `sql` on this connection, compiled on first use. Callers
 * build `sql` from fixed fragments only (values are always bound), so the
 * cache holds a bounded set: one per query shape.
 */
export function statement(db: Db, sql: string): Statement {
  const client = db.$client
  let byText = prepared.get(client)
  if (!byText) prepared.set(client, (byText = new Map()))
  let st = byText.get(sql)
  if (!st) byText.set(sql, (st = client.prepare(sql)))
  return st
}

/**
 * Rows of deactivated accounts stay in the index but are hidden from reads: a
 * condition on `column` (a DID column of `records`). SQLite runs the
 * subquery once per statement, from the partial index of hidden accounts.
 */
export const visible = (column = 'did') => `${column} NOT IN (SELECT did FROM accounts WHERE active = 0)`

/** The columns of a record row as the views read them. */
const RECORD_COLUMNS = 'uri, cid, did, collection, rkey, body, sort_at AS sortAt, indexed_at AS indexedAt'

export interface RecordRow {
  uri: string
  cid: string
  did: string
  collection: string
  rkey: string
  /** The record as published, JSON. */
  body: string
  sortAt: string
  indexedAt: string
}

/** One indexed, visible record with its parsed body. */
export function getIndexed<T>(db: Db, uri: string | undefined): { uri: string; cid: string; did: string; collection: string; body: T } | undefined {
  if (!uri) return undefined
  const row = statement(db, `SELECT ${RECORD_COLUMNS} FROM records WHERE uri = ? AND ${visible()}`).get(uri) as RecordRow | undefined
  return row ? { uri: row.uri, cid: row.cid, did: row.did, collection: row.collection, body: JSON.parse(row.body) as T } : undefined
}

export function recordView(row: RecordRow): DefsIndexedRecord {
  return {
    uri: row.uri,
    cid: row.cid,
    collection: row.collection,
    repo: row.did,
    rkey: row.rkey,
    body: JSON.parse(row.body),
    indexedAt: row.indexedAt,
  }
}

const str = JSON.stringify

/**
 * A page of records as the list methods answer it, `{ [field]: views,
 * cursor }`, as JSON text: each body is spliced in as stored. The indexer
 * wrote it with JSON.stringify (lexStringify), so the text is what parsing
 * it and writing it again would give, without the cost of either (most of a
 * list's time besides the query).
 */
export function recordList<T>(field: string, page: { rows: RecordRow[]; cursor: string | undefined }): JsonText<T> {
  let out = `{"${field}":[`
  for (let i = 0; i < page.rows.length; i++) {
    const r = page.rows[i]!
    // The keys in recordView's order.
    out += `${i ? ',' : ''}{"uri":${str(r.uri)},"cid":${str(r.cid)},"collection":${str(r.collection)},"repo":${str(r.did)},"rkey":${str(r.rkey)},"body":${r.body},"indexedAt":${str(r.indexedAt)}}`
  }
  return new JsonText<T>(`${out}]${page.cursor === undefined ? '' : `,"cursor":${str(page.cursor)}`}}`)
}

/** An opaque cursor: base64url of the JSON array of the last row's sort key. */
export function encodeCursor(key: (string | number)[]): string {
  return Buffer.from(JSON.stringify(key)).toString('base64url')
}

export function decodeCursor(cursor: unknown, shape: ('string' | 'number')[]): (string | number)[] | undefined {
  if (cursor === undefined) return undefined
  let parsed: unknown
  try {
    parsed = typeof cursor === 'string' && cursor.length <= 2048 ? JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8')) : undefined
  } catch {
    parsed = undefined
  }
  if (!Array.isArray(parsed) || parsed.length !== shape.length || parsed.some((v, i) => typeof v !== shape[i])) {
    throw new InvalidRequestError('malformed cursor', 'InvalidCursor')
  }
  return parsed as (string | number)[]
}

/** The indexed columns a record list may be filtered on (see indexer/columns.ts), by their names in SQL. */
const FILTER_COLUMNS = {
  providerDid: 'provider_did',
  requesterDid: 'requester_did',
  jobUri: 'job_uri',
  receiptUri: 'receipt_uri',
} as const
export type RecordFilter = Partial<Record<keyof typeof FILTER_COLUMNS, string>>

/**
 * One page of records of a collection, newest first by (sortAt, uri), with
 * optional equality filters: an indexed range scan that visits only the page.
 */
export function pageRecords(db: Db, collection: string, filter: RecordFilter, limit: number, cursor: unknown): { rows: RecordRow[]; cursor: string | undefined } {
  const after = decodeCursor(cursor, ['string', 'string']) as [string, string] | undefined
  const where = ['collection = ?']
  const params: (string | number)[] = [collection]
  for (const key of Object.keys(FILTER_COLUMNS) as (keyof typeof FILTER_COLUMNS)[]) {
    const value = filter[key]
    if (!value) continue
    where.push(`${FILTER_COLUMNS[key]} = ?`)
    params.push(value)
  }
  where.push(visible())
  if (after) {
    // A row-value comparison, which SQLite answers from the (…, sort_at, uri) indexes.
    where.push('(sort_at, uri) < (?, ?)')
    params.push(after[0], after[1])
  }
  params.push(limit + 1)
  const rows = statement(db, `SELECT ${RECORD_COLUMNS} FROM records WHERE ${where.join(' AND ')} ORDER BY sort_at DESC, uri DESC LIMIT ?`).all(...params) as RecordRow[]
  const more = rows.length > limit
  const page = more ? rows.slice(0, limit) : rows
  const last = page[page.length - 1]
  return { rows: page, cursor: more && last ? encodeCursor([last.sortAt, last.uri]) : undefined }
}
