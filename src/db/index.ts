import { mkdirSync } from 'node:fs'
import { dirname, join } from 'node:path'
import Database from 'better-sqlite3'
import { drizzle, type BetterSQLite3Database } from 'drizzle-orm/better-sqlite3'
import { migrate } from 'drizzle-orm/better-sqlite3/migrator'
import * as schema from './schema.ts'

export type Db = BetterSQLite3Database<typeof schema> & { $client: Database.Database }

/** Opens (creating if needed) a SQLite database and applies pending migrations. */
export function openDb(path: string): Db {
  if (path !== ':memory:') mkdirSync(dirname(path), { recursive: true })
  const sqlite = new Database(path)
  // WAL: readers (the XRPC API) never block the indexer's writes.
  sqlite.pragma('journal_mode = WAL')
  // NORMAL is durable across process crashes in WAL mode (only an OS crash can lose the tail).
  sqlite.pragma('synchronous = NORMAL')
  sqlite.pragma('busy_timeout = 5000')
  sqlite.pragma('foreign_keys = ON')
  // The aggregate triggers (migration 0007) pass rows through views, which SQLite holds in temporary tables: in memory, not files.
  sqlite.pragma('temp_store = MEMORY')
  const db = drizzle(sqlite, { schema }) as Db
  migrate(db, { migrationsFolder: join(import.meta.dirname, 'migrations') })
  return db
}

export { schema }
