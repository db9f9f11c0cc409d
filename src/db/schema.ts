/**
 * The one schema file. AppView tables: indexed records and the per-repo and
 * per-source sync state that makes the indexer exactly-once.
 * Migrations in `src/db/migrations/` are generated from this file by
 * `npm run db:generate` and applied at start.
 */
import { sql } from 'drizzle-orm'
import { index, integer, primaryKey, sqliteTable, text } from 'drizzle-orm/sqlite-core'

/**
 * Every indexed `dev.cocore.*` record, keyed by AT URI. `body` is the record
 * JSON as published. The typed columns are copies of the fields queries filter
 * on, so every list is an indexed range scan on (filter, sortAt, uri).
 */
export const records = sqliteTable(
  'records',
  {
    uri: text('uri').primaryKey(),
    did: text('did').notNull(),
    collection: text('collection').notNull(),
    rkey: text('rkey').notNull(),
    cid: text('cid').notNull(),
    body: text('body').notNull(),
    /** The record's own timestamp (createdAt, completedAt, settledAt...), normalized ISO; the list order. */
    sortAt: text('sort_at').notNull(),
    /** When this AppView indexed it: local, so excluded when two AppViews compare state. */
    indexedAt: text('indexed_at').notNull(),
    providerDid: text('provider_did'),
    requesterDid: text('requester_did'),
    exchangeDid: text('exchange_did'),
    subjectDid: text('subject_did'),
    jobUri: text('job_uri'),
    receiptUri: text('receipt_uri'),
    attestationUri: text('attestation_uri'),
    authorizationUri: text('authorization_uri'),
    model: text('model'),
  },
  (t) => [
    index('records_collection_sort').on(t.collection, t.sortAt, t.uri),
    index('records_did_collection').on(t.did, t.collection, t.sortAt, t.uri),
    index('records_requester').on(t.collection, t.requesterDid, t.sortAt, t.uri),
    index('records_provider').on(t.collection, t.providerDid, t.sortAt, t.uri),
    index('records_subject').on(t.collection, t.subjectDid, t.sortAt, t.uri),
    index('records_exchange').on(t.collection, t.exchangeDid, t.sortAt, t.uri),
    index('records_job').on(t.jobUri),
    index('records_receipt').on(t.receiptUri),
    index('records_attestation').on(t.attestationUri),
    index('records_model').on(t.collection, t.model),
    // listFriendEdges: distinct (friender, subject) pairs in key order.
    index('records_edges').on(t.collection, t.did, t.subjectDid),
  ],
)

/** Accounts seen on the network: handle and hosting status (replicated state). */
export const accounts = sqliteTable(
  'accounts',
  {
    did: text('did').primaryKey(),
    handle: text('handle'),
    /** false while the account is deactivated/suspended: its rows stay but are hidden from reads. */
    active: integer('active', { mode: 'boolean' }).notNull().default(true),
    status: text('status'),
  },
  // Every read excludes hidden accounts: keep that set an index lookup, not a table scan.
  (t) => [index('accounts_hidden').on(t.did).where(sql`${t.active} = 0`)],
)

/** Per-repo sync state: the last applied commit rev (stale revs are ignored). Local. */
export const repos = sqliteTable('repos', {
  did: text('did').primaryKey(),
  rev: text('rev').notNull(),
  /** Set when a #sync, a gap or a failed commit calls for a full resync from getRepo. */
  needsResync: integer('needs_resync', { mode: 'boolean' }).notNull().default(false),
})

/** Firehose cursor per source, written in the same transaction as the rows it covers. */
export const cursors = sqliteTable('cursors', {
  source: text('source').primaryKey(),
  seq: integer('seq').notNull(),
})

/** Records and events refused by the indexer, counted by reason. */
export const rejections = sqliteTable(
  'rejections',
  {
    reason: text('reason').notNull(),
    collection: text('collection').notNull().default(''),
    count: integer('count').notNull().default(0),
    lastUri: text('last_uri'),
    lastAt: text('last_at').notNull().default(sql`CURRENT_TIMESTAMP`),
  },
  (t) => [primaryKey({ columns: [t.reason, t.collection] })],
)

// ---------------------------------------------------------------------------
// Console tables. The console keeps its own SQLite file (data/console.sqlite);
// the migrations are shared, so each file simply leaves the other's tables empty.

/** OAuth authorizations in flight. `sealed`: AES-256-GCM (src/crypto/secretbox.ts), never plaintext. */
export const oauthStates = sqliteTable('oauth_states', {
  key: text('key').primaryKey(),
  sealed: text('sealed').notNull(),
  createdAt: text('created_at').notNull(),
})

/** OAuth sessions per DID: tokens and the DPoP private key, sealed. */
export const oauthSessions = sqliteTable('oauth_sessions', {
  did: text('did').primaryKey(),
  sealed: text('sealed').notNull(),
  updatedAt: text('updated_at').notNull(),
})

/**
 * Console sign-in sessions. The cookie carries a random 256-bit token; only
 * its SHA-256 is stored. `id` is a separate public handle used to list and
 * revoke sessions. The IP is kept only as a keyed SHA-256.
 */
export const consoleSessions = sqliteTable(
  'console_sessions',
  {
    id: text('id').primaryKey(),
    tokenHash: text('token_hash').notNull().unique(),
    did: text('did').notNull(),
    userAgent: text('user_agent'),
    ipHash: text('ip_hash'),
    createdAt: text('created_at').notNull(),
    lastSeenAt: text('last_seen_at').notNull(),
    expiresAt: text('expires_at').notNull(),
  },
  (t) => [index('console_sessions_did').on(t.did)],
)

/** Security-relevant actions of an account: who, what, when, hashed IP. */
export const auditLog = sqliteTable(
  'audit_log',
  {
    id: integer('id').primaryKey({ autoIncrement: true }),
    did: text('did').notNull(),
    action: text('action').notNull(),
    detail: text('detail'),
    ipHash: text('ip_hash'),
    at: text('at').notNull(),
  },
  (t) => [index('audit_log_did').on(t.did, t.id)],
)

/** API keys: only the SHA-256 of a key is stored. Revoked keys keep their row; deleted ones do not. */
export const apiKeys = sqliteTable(
  'api_keys',
  {
    id: text('id').primaryKey(),
    did: text('did').notNull(),
    name: text('name').notNull(),
    /** The first characters of the key, to recognise it in a list. */
    prefix: text('prefix').notNull(),
    keyHash: text('key_hash').notNull().unique(),
    /** JSON array of scopes: read, inference, records:write, keys:manage. */
    scopes: text('scopes').notNull(),
    createdAt: text('created_at').notNull(),
    expiresAt: text('expires_at'),
    revokedAt: text('revoked_at'),
    lastUsedAt: text('last_used_at'),
  },
  (t) => [index('api_keys_did').on(t.did)],
)

/** Daily usage per account (`key_id` '') and per key: counts and cost only, never content. */
export const usageDaily = sqliteTable(
  'usage_daily',
  {
    did: text('did').notNull(),
    keyId: text('key_id').notNull(),
    day: text('day').notNull(),
    requests: integer('requests').notNull().default(0),
    tokensIn: integer('tokens_in').notNull().default(0),
    tokensOut: integer('tokens_out').notNull().default(0),
    cost: integer('cost').notNull().default(0),
  },
  (t) => [primaryKey({ columns: [t.did, t.keyId, t.day] })],
)

/**
 * "Wipe all my data" jobs: durable, resumed after a restart. The row keeps
 * only the account's DID and counts, for the report; it is removed 7 days
 * after the job ends.
 */
export const wipeJobs = sqliteTable(
  'wipe_jobs',
  {
    id: text('id').primaryKey(),
    did: text('did').notNull(),
    /** running | done | incomplete */
    status: text('status').notNull(),
    /** pds | verify | local | finished */
    phase: text('phase').notNull(),
    /** JSON: removed per collection, failures, what is kept and why. */
    report: text('report').notNull(),
    createdAt: text('created_at').notNull(),
    updatedAt: text('updated_at').notNull(),
  },
  (t) => [index('wipe_jobs_did').on(t.did)],
)
