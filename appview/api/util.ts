/** Shared pieces of the read API: the handler context, record views and keyset cursors. */
import { and, desc, eq, notInArray, sql, type SQL } from 'drizzle-orm'
import type { IdResolver } from '@atproto/identity'
import type { Db } from '../../src/db/index.ts'
import { accounts, records } from '../../src/db/schema.ts'
import { InvalidRequestError } from '../../src/xrpc/errors.ts'
import type { DefsIndexedRecord } from '../../src/lexicon/generated/types.ts'

export interface ApiContext {
  db: Db
  /** For the few reads that need a DID document (the exchange's settlement key). */
  idResolver?: IdResolver
}

/** One indexed, visible record with its parsed body. */
export function getIndexed<T>(db: Db, uri: string | undefined): { uri: string; cid: string; did: string; collection: string; body: T } | undefined {
  if (!uri) return undefined
  const row = db.select().from(records).where(and(eq(records.uri, uri), visible())).get()
  return row ? { uri: row.uri, cid: row.cid, did: row.did, collection: row.collection, body: JSON.parse(row.body) as T } : undefined
}

export type RecordRow = typeof records.$inferSelect

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

/** Rows of deactivated accounts stay in the index but are hidden from reads. */
export const visible = () => notInArray(records.did, sql`(SELECT ${accounts.did} FROM ${accounts} WHERE ${accounts.active} = 0)`)

/**
 * One page of records of a collection, newest first by (sortAt, uri), with
 * optional extra filters: an indexed range scan that visits only the page.
 */
export function pageRecords(db: Db, collection: string, filters: (SQL | undefined)[], limit: number, cursor: unknown) {
  const after = decodeCursor(cursor, ['string', 'string']) as [string, string] | undefined
  const rows = db
    .select()
    .from(records)
    .where(
      and(
        eq(records.collection, collection),
        ...filters,
        visible(),
        // A row-value comparison, which SQLite answers from the (…, sort_at, uri) indexes.
        after ? sql`(${records.sortAt}, ${records.uri}) < (${after[0]}, ${after[1]})` : undefined,
      ),
    )
    .orderBy(desc(records.sortAt), desc(records.uri))
    .limit(limit + 1)
    .all()
  const more = rows.length > limit
  const page = more ? rows.slice(0, limit) : rows
  const last = page[page.length - 1]
  return { rows: page, cursor: more && last ? encodeCursor([last.sortAt, last.uri]) : undefined }
}
