/**
 * The one schema file. AppView tables: indexed records and the per-repo and
 * per-source sync state that makes the indexer exactly-once.
 * Migrations in `src/db/migrations/` are generated from this file by
 * `npm run db:generate` and applied at start.
 */
import { sql } from 'drizzle-orm'
import { check, index, integer, primaryKey, sqliteTable, text, uniqueIndex } from 'drizzle-orm/sqlite-core'

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
  /**
   * The rev and MST root (data CID) of the newest commit seen for the repo, of
   * any collection: the next commit's `since` and `prevData` must match them,
   * or events were missed (a gap). Unlike `rev` (the last commit applied, signed
   * and verified), commits of other collections move it unverified: `since` is
   * not signed either, so the gap check only guards against loss, not forgery.
   */
  head: text('head'),
  headData: text('head_data'),
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
// Aggregates of the read API, kept by triggers on `records` and `accounts`
// (migration 0007) in the transaction that changes the rows they summarise,
// so a read costs a few index lookups whatever the size of the index. Each is
// a function of the rows (and, for the trailing windows, of where the windows
// start), whatever order they were written in: a backfill or resync rebuilds
// exactly what live indexing built. Times are records' own (`sort_at`).

/**
 * A counter every change of `records` and `accounts` moves (triggers of
 * migration 0010): the same value means the same index, so an answer
 * computed at it may be served again (the read API's cache of answers).
 */
export const indexVersion = sqliteTable('index_version', {
  id: integer('id').primaryKey(),
  n: integer('n').notNull(),
})

/** Where each trailing window of receipts starts now: receipts at or after `at` are counted in it. Moved forward by the indexer (appview/indexer/windows.ts). */
export const activityWindows = sqliteTable('activity_windows', {
  /** hour | day | week | month */
  name: text('name').primaryKey(),
  at: text('at').notNull(),
})

/** Per account and collection: its records, the oldest dated and the newest `sort_at` ('' when none). */
export const accountCollections = sqliteTable(
  'account_collections',
  {
    did: text('did').notNull(),
    collection: text('collection').notNull(),
    n: integer('n').notNull(),
    firstAt: text('first_at').notNull(),
    lastAt: text('last_at').notNull(),
  },
  (t) => [primaryKey({ columns: [t.did, t.collection] })],
)

/**
 * One row per account with at least one record: the directory (listAccounts)
 * and getProfile's counts. `hidden` copies the account's status so the
 * directory walks only visible accounts; `handle` is the one the directory
 * shows and searches (the DID document's, else the profile's).
 */
export const accountStats = sqliteTable(
  'account_stats',
  {
    did: text('did').primaryKey(),
    records: integer('records').notNull(),
    jobs: integer('jobs').notNull(),
    receipts: integer('receipts').notNull(),
    machines: integer('machines').notNull(),
    /** Tokens (in + out) of its receipts, all time. */
    tokens: integer('tokens').notNull(),
    /** Oldest dated record; '' when none is dated. */
    joinedAt: text('joined_at').notNull(),
    /** Newest record; '' when none is dated. */
    lastAt: text('last_at').notNull(),
    hidden: integer('hidden').notNull(),
    handle: text('handle'),
  },
  (t) => [
    index('account_stats_recent').on(sql`${t.lastAt} DESC`, t.did).where(sql`${t.hidden} = 0`),
    index('account_stats_newest').on(sql`${t.joinedAt} DESC`, t.did).where(sql`${t.hidden} = 0`),
    index('account_stats_providers').on(sql`${t.lastAt} DESC`, t.did).where(sql`${t.hidden} = 0 AND ${t.machines} > 0`),
  ],
)

/**
 * Per account and week (the Monday, 'YYYY-MM-DD'; '' for undated records):
 * getProfile's series. `trusted`: accounts (visible) whose first friend record
 * naming this one falls in the week.
 */
export const accountWeeks = sqliteTable(
  'account_weeks',
  {
    did: text('did').notNull(),
    week: text('week').notNull(),
    jobs: integer('jobs').notNull().default(0),
    receipts: integer('receipts').notNull().default(0),
    tokens: integer('tokens').notNull().default(0),
    machines: integer('machines').notNull().default(0),
    trusted: integer('trusted').notNull().default(0),
  },
  (t) => [primaryKey({ columns: [t.did, t.week] })],
)

/**
 * Each (friender, subject) pair of friend records, with its oldest record (by
 * sort_at, then uri) and whether either end is hidden: listFriendEdges and
 * listIncomingFriends page through it.
 */
export const friendEdges = sqliteTable(
  'friend_edges',
  {
    friender: text('friender').notNull(),
    subject: text('subject').notNull(),
    n: integer('n').notNull(),
    firstAt: text('first_at').notNull(),
    firstUri: text('first_uri').notNull(),
    /** The oldest record's createdAt as written, when it is a string. */
    createdAt: text('created_at'),
    frienderHidden: integer('friender_hidden').notNull(),
    subjectHidden: integer('subject_hidden').notNull(),
  },
  (t) => [
    primaryKey({ columns: [t.friender, t.subject] }),
    index('friend_edges_listed').on(t.friender, t.subject).where(sql`${t.frienderHidden} = 0 AND ${t.subjectHidden} = 0 AND ${t.friender} <> ${t.subject}`),
    index('friend_edges_incoming').on(t.subject, t.frienderHidden, sql`${t.firstAt} DESC`, t.friender),
  ],
)

/** Visible accounts with a friend record naming `subject`. */
export const friendCounts = sqliteTable('friend_counts', {
  subject: text('subject').primaryKey(),
  n: integer('n').notNull(),
})

/** Network-wide counts: `friend_edges`, the pairs listFriendEdges lists. */
export const indexCounts = sqliteTable('index_counts', {
  name: text('name').primaryKey(),
  n: integer('n').notNull(),
})

/**
 * Receipts naming a model, per model and provider: all time and in each
 * trailing window (see activity_windows). Rows of hidden providers are kept;
 * reads leave them out.
 */
export const modelActivity = sqliteTable(
  'model_activity',
  {
    model: text('model').notNull(),
    provider: text('provider').notNull(),
    requests: integer('requests').notNull(),
    tokens: integer('tokens').notNull(),
    hourRequests: integer('hour_requests').notNull(),
    hourTokens: integer('hour_tokens').notNull(),
    dayRequests: integer('day_requests').notNull(),
    dayTokens: integer('day_tokens').notNull(),
    weekRequests: integer('week_requests').notNull(),
    weekTokens: integer('week_tokens').notNull(),
    monthRequests: integer('month_requests').notNull(),
    monthTokens: integer('month_tokens').notNull(),
  },
  (t) => [primaryKey({ columns: [t.model, t.provider] })],
)

/** Provider records (machines) listing a model in supportedModels, per model and account. */
export const modelMachines = sqliteTable(
  'model_machines',
  {
    model: text('model').notNull(),
    did: text('did').notNull(),
    machines: integer('machines').notNull(),
  },
  (t) => [primaryKey({ columns: [t.model, t.did] })],
)

/**
 * The latency samples of the trailing week: receipts of visible accounts with
 * completedAt >= startedAt, their milliseconds and histogram bucket (the value
 * to three significant digits).
 */
export const latencySamples = sqliteTable(
  'latency_samples',
  {
    uri: text('uri').primaryKey(),
    provider: text('provider').notNull(),
    model: text('model'),
    sortAt: text('sort_at').notNull(),
    ms: integer('ms').notNull(),
    bucket: integer('bucket').notNull(),
  },
  (t) => [
    index('latency_samples_time').on(t.sortAt, t.uri),
    index('latency_samples_provider').on(t.provider, t.sortAt, t.uri),
    index('latency_samples_model').on(t.model, t.sortAt, t.uri),
  ],
)

/** Per scope (kind 'all' with key '', 'provider' with its DID, 'model' with its id): samples per bucket. */
export const latencyHist = sqliteTable(
  'latency_hist',
  {
    kind: text('kind').notNull(),
    key: text('key').notNull(),
    bucket: integer('bucket').notNull(),
    n: integer('n').notNull(),
  },
  (t) => [primaryKey({ columns: [t.kind, t.key, t.bucket] })],
)

/**
 * Per scope: sample count and sum, and for p50 and p95 the bucket holding the
 * nearest-rank sample with the count of samples below it (moved by at most
 * one bucket per sample added or removed), and the newest sample.
 */
export const latencyStats = sqliteTable(
  'latency_stats',
  {
    kind: text('kind').notNull(),
    key: text('key').notNull(),
    n: integer('n').notNull(),
    sum: integer('sum').notNull(),
    p50: integer('p50').notNull(),
    below50: integer('below50').notNull(),
    p95: integer('p95').notNull(),
    below95: integer('below95').notNull(),
    lastAt: text('last_at').notNull(),
    lastUri: text('last_uri').notNull(),
    lastMs: integer('last_ms').notNull(),
  },
  (t) => [primaryKey({ columns: [t.kind, t.key] })],
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

/**
 * Device pairings in flight (dev.cocore.devicePair.*): a device shows a user
 * code, a signed-in account approves it, the device collects its API key
 * once. Only keyed hashes of the device id and the user code are stored; the
 * session (with the key's secret) only sealed, and only until it is
 * collected. Rows go an hour after they expire.
 */
export const devicePairs = sqliteTable(
  'device_pairs',
  {
    deviceHash: text('device_hash').primaryKey(),
    /** Cleared once the pairing is over, so the code names nothing any more. */
    codeHash: text('code_hash').unique(),
    /** pending | approved | denied | consumed | expired (a pending or approved row past expires_at reads as expired before it is written so) */
    status: text('status').notNull(),
    /** The approving account, and the key minted for the device. */
    did: text('did'),
    keyId: text('key_id'),
    /** The session handed to the device, sealed (src/crypto/secretbox.ts). */
    sealedSession: text('sealed_session'),
    createdAt: text('created_at').notNull(),
    expiresAt: text('expires_at').notNull(),
  },
  (t) => [index('device_pairs_expires').on(t.expiresAt)],
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

/**
 * The exchange's token ledger, double entry: a transaction's entries sum to
 * zero, and a balance is the sum of an account's entries. Accounts are DIDs
 * plus `@issuance` (the counterpart of every grant, the only place tokens
 * come from) and `@treasury` when the policy names no treasury DID.
 */
export const ledgerTxns = sqliteTable('ledger_txns', {
  id: integer('id').primaryKey({ autoIncrement: true }),
  /** grant | refresh | settlement | patronage */
  kind: text('kind').notNull(),
  /** What the movement is for (`settlement:<receipt uri>`, `grant:<did>`...): a retry finds it and moves nothing twice. */
  ref: text('ref').notNull().unique(),
  /** JSON: amounts and the records concerned, never content. */
  meta: text('meta'),
  createdAt: text('created_at').notNull(),
})

export const ledgerEntries = sqliteTable(
  'ledger_entries',
  {
    id: integer('id').primaryKey({ autoIncrement: true }),
    txnId: integer('txn_id')
      .notNull()
      .references(() => ledgerTxns.id),
    account: text('account').notNull(),
    /** Signed integer tokens: + credit, - debit. */
    amount: integer('amount').notNull(),
  },
  (t) => [index('ledger_entries_account').on(t.account, t.id), index('ledger_entries_txn').on(t.txnId)],
)

/**
 * Each account's balance (the sum of its entries, kept by a trigger on
 * `ledger_entries`) and the tokens held for its jobs in flight. The CHECK is
 * the rule, not a convention: no movement or hold can take an account's
 * available tokens (balance - held) below zero; only system accounts (`@...`,
 * such as `@issuance`) may be negative.
 */
export const ledgerBalances = sqliteTable(
  'ledger_balances',
  {
    account: text('account').primaryKey(),
    balance: integer('balance').notNull().default(0),
    held: integer('held').notNull().default(0),
  },
  (t) => [check('ledger_balances_held', sql`${t.held} >= 0`), check('ledger_balances_available', sql`substr(${t.account}, 1, 1) = '@' OR ${t.balance} - ${t.held} >= 0`)],
)

/**
 * The exchange's record of each job it admitted: the contract settlement is
 * judged against. The job and authorization as published, who asked, which
 * machine it was sent to and the attestation key that answered that
 * connection's challenge, the ceiling and the hold placed for it, the daily
 * tokens reserved, and what the exchange itself relayed.
 */
export const exchangeJobs = sqliteTable(
  'exchange_jobs',
  {
    jobUri: text('job_uri').primaryKey(),
    jobCid: text('job_cid').notNull(),
    authUri: text('auth_uri').notNull(),
    authCid: text('auth_cid').notNull(),
    /** The records' JSON as published on the requester's PDS. */
    jobRecord: text('job_record').notNull(),
    authRecord: text('auth_record').notNull(),
    requesterDid: text('requester_did').notNull(),
    model: text('model').notNull(),
    /** The machine it was sent to (the last one, after failovers), and the key that answered its challenge. */
    providerDid: text('provider_did'),
    machine: text('machine'),
    providerRecordUri: text('provider_record_uri'),
    attestationKey: text('attestation_key'),
    /** JSON: the brokerage countersignature's witness for that machine (authority, machineId, attestation, nonce); null when none was signed. */
    witness: text('witness'),
    proBono: integer('pro_bono').notNull(),
    inputBytes: integer('input_bytes').notNull(),
    maxTokensOut: integer('max_tokens_out').notNull(),
    ceiling: integer('ceiling').notNull(),
    /** Tokens held on the requester's balance now (0 once released). */
    hold: integer('hold').notNull(),
    /** Daily-limit tokens reserved now (0 once reconciled). */
    reserved: integer('reserved').notNull(),
    /** admitted | running | completed | cancelled | failed | unstarted | settled | refused | expired */
    state: text('state').notNull(),
    /** 1 once the job records are on the requester's PDS. */
    recorded: integer('recorded').notNull().default(0),
    /** The provider's counts in `inference_complete`, as relayed. */
    reportedIn: integer('reported_in'),
    reportedOut: integer('reported_out'),
    /** Reply chunks relayed, and their plaintext bytes (ciphertext less the box's overhead). */
    relayedChunks: integer('relayed_chunks').notNull().default(0),
    relayedBytes: integer('relayed_bytes').notNull().default(0),
    /** After this the hold is released and a receipt is too late. */
    deadline: text('deadline').notNull(),
    createdAt: text('created_at').notNull(),
    updatedAt: text('updated_at').notNull(),
  },
  (t) => [index('exchange_jobs_state').on(t.state, t.deadline), index('exchange_jobs_requester').on(t.requesterDid, t.createdAt)],
)

/**
 * Records the exchange publishes on its own repo (settlements, grants,
 * patronage, policy): written here first, in the transaction that decides
 * them, then published with retries; a crash between the two resumes here.
 */
export const exchangeOutbox = sqliteTable(
  'exchange_outbox',
  {
    ref: text('ref').primaryKey(),
    collection: text('collection').notNull(),
    rkey: text('rkey').notNull(),
    /** The record JSON, signed where it carries a signature. */
    record: text('record').notNull(),
    /** pending | published */
    status: text('status').notNull(),
    attempts: integer('attempts').notNull().default(0),
    nextAttemptAt: text('next_attempt_at').notNull(),
    lastError: text('last_error'),
    uri: text('uri'),
    cid: text('cid'),
    createdAt: text('created_at').notNull(),
    publishedAt: text('published_at'),
  },
  (t) => [index('exchange_outbox_pending').on(t.status, t.nextAttemptAt)],
)

/**
 * One row per receipt the exchange has decided on: settled (with its outbox
 * ref) or refused (with the finding). The authorization key (requester DID
 * and nonce) is unique: an authorization pays for one job, once.
 */
export const settlements = sqliteTable(
  'settlements',
  {
    receiptUri: text('receipt_uri').primaryKey(),
    receiptCid: text('receipt_cid').notNull(),
    requesterDid: text('requester_did').notNull(),
    providerDid: text('provider_did').notNull(),
    /** `<requester DID> <authorization nonce>`, unique among settled rows. */
    authorizationKey: text('authorization_key'),
    /** The dispatched job the receipt claims (null for a job this exchange never dispatched); paid once. */
    jobUri: text('job_uri'),
    /** settled | refused */
    outcome: text('outcome').notNull(),
    amount: integer('amount').notNull().default(0),
    fee: integer('fee').notNull().default(0),
    findingCode: text('finding_code'),
    findingMessage: text('finding_message'),
    outboxRef: text('outbox_ref'),
    decidedAt: text('decided_at').notNull(),
  },
  (t) => [
    uniqueIndex('settlements_authorization').on(t.authorizationKey).where(sql`outcome = 'settled'`),
    uniqueIndex('settlements_job').on(t.jobUri).where(sql`outcome = 'settled'`),
    index('settlements_requester').on(t.requesterDid),
    index('settlements_provider').on(t.providerDid),
  ],
)

/** Small durable state of the exchange: the receipt scan position, the policy and attestation in force. */
export const exchangeState = sqliteTable('exchange_state', {
  key: text('key').primaryKey(),
  value: text('value').notNull(),
})
