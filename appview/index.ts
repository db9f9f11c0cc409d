/**
 * The AppView service: the index database, the firehose indexer and the XRPC
 * read API, started and stopped together.
 */
import type { Server } from 'node:http'
import type { IdResolver } from '@atproto/identity'
import { openDb, type Db } from '../src/db/index.ts'
import { createIdResolver } from '../src/identity/index.ts'
import { AuthorityResolver } from '../src/identity/authority.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { statement } from './api/util.ts'
import { NETWORK_BROKERAGE } from '../src/config.ts'
import { serveHttp, type Refusal } from '../src/net/http-server.ts'
import { TrustedProxies } from '../src/net/client-address.ts'
import { XrpcError } from '../src/xrpc/errors.ts'
import { appviewLogger as log } from '../src/logger.ts'
import type { ComputeModelActivityOutput } from '../src/lexicon/generated/types.ts'
import modelActivity from './api/dev/cocore/compute/modelActivity.ts'
import { modelsDirectory, providerLeaderboard, type LeaderboardEntry, type ModelDirectoryEntry } from './api/aggregates.ts'
import type { PublicReadOpts } from './api/public-reads.ts'
import { startUpkeep } from './indexer/aggregates.ts'
import { Indexer } from './indexer/indexer.ts'
import { IndexStore } from './indexer/store.ts'
import type { ConsoleLink } from './console-link.ts'
import { didWebOf } from '../src/config.ts'

/** What the console needs of the index when both run in one process. */
export interface IndexedProvider {
  uri: string
  cid: string
  body: Record<string, unknown>
}

export interface ConsoleIndex {
  purge(did: string): number
  records(did: string): unknown[]
  /** The account's index rows besides its records (status, sync state), for its export. */
  accountRows(did: string): { account: unknown; repo: unknown }
  /** The account's indexed (validated, signed) provider records, newest first. */
  providerRecords(did: string): IndexedProvider[]
  /** Whether `owner` lists `subject` as a friend (the private tier). */
  isFriend(owner: string, subject: string): boolean
  /** Indexed receipts after an index position, in index order (the settlement feed). */
  receiptsAfter(rowid: number, limit: number): (IndexedProvider & { rowid: number; did: string })[]
  /** Indexed receipts that name a job (settlement looks for them once the job is ready). */
  receiptsForJob(jobUri: string): (IndexedProvider & { did: string })[]
  /** One indexed record, or undefined. */
  record(uri: string): (IndexedProvider & { did: string; collection: string }) | undefined
  /** The newest indexed attestation of `did` whose publicKey is `publicKey` (base64, as published): what that machine's receipts cite now. */
  attestationFor(did: string, publicKey: string): IndexedProvider | undefined
  /** Receipt activity per model and provider, as dev.cocore.compute.modelActivity answers it (the model directory). */
  modelActivity(): ComputeModelActivityOutput
  /** Every model visible machines offer or receipts name, with its machines and activity, busiest first. */
  modelsDirectory(): ModelDirectoryEntry[]
  /** The providers that served the most requests in the last 30 days. */
  providerLeaderboard(limit?: number): LeaderboardEntry[]
}

export interface AppViewOpts {
  dbPath: string
  /** ws(s):// firehose sources (relay and/or PDSes). */
  sources: string[]
  plcUrl: string
  /** Local network only. */
  allowHttp?: boolean
  handlesViaPds?: string
  didCacheSize?: number
  didCacheTtlSec?: number
  /** HTTP listener; no server when port is undefined. */
  port?: number
  host?: string
  /** Public URL, for the service's did:web. */
  publicUrl?: string
  /** Start the firehose consumer (false: serve reads only). */
  index?: boolean
  /**
   * Sources with no saved cursor start at seq 0 instead of the live head.
   * Right for a PDS (it keeps its whole log); a relay's history is short, so
   * there a new AppView starts at the head and `npm run backfill` fills the past.
   */
  replayFromStart?: boolean
  /** Pause before resubscribing to a source after its stream broke; default 3 s. */
  reconnectDelayMs?: number
  /** See IndexerOpts.rawCommitFilter (default true). */
  rawCommitFilter?: boolean
  /** CIDRs of reverse proxies whose X-Forwarded-For names the client (COCORE_TRUSTED_PROXIES): the address forwarded calls are limited by. */
  trustedProxies?: string[]
  /** The XRPC reads' limit per client address and cache of answers (appview/api/public-reads.ts; its defaults otherwise). */
  publicReads?: Partial<PublicReadOpts>
  /** Brokerages whose countersignature verifyReceipt calls confidential (COCORE_TRUSTED_BROKERAGES; default: the network's). */
  trustedBrokerages?: string[]
}

export class AppView implements AsyncDisposable {
  readonly db: Db
  readonly store: IndexStore
  readonly idResolver: IdResolver
  readonly indexer: Indexer
  /** verifyReceipt's trust set: callers may add to it (the console's own brokerage, once it knows its DID). */
  readonly trustedBrokerages: Set<string>
  /** Brokerages' DID documents, for their countersignatures. */
  readonly authorities: AuthorityResolver
  private server: Server | null = null
  private upkeep: { stop(): void } | null = null
  private consoleLink: { link: ConsoleLink; did: string } | null = null
  private readonly opts: AppViewOpts
  url = ''

  constructor(opts: AppViewOpts) {
    this.opts = opts
    this.db = openDb(opts.dbPath)
    this.store = new IndexStore(this.db)
    this.idResolver = createIdResolver({
      plcUrl: opts.plcUrl,
      cacheSize: opts.didCacheSize ?? 50_000,
      cacheTtlSec: opts.didCacheTtlSec ?? 3600,
      allowHttp: opts.allowHttp ?? false,
      handlesViaPds: opts.handlesViaPds,
      // The operator's own sources: repo fetches may reach them on a private network.
      trusted: opts.sources,
    })
    this.trustedBrokerages = new Set(opts.trustedBrokerages ?? [NETWORK_BROKERAGE])
    this.authorities = new AuthorityResolver({ idResolver: this.idResolver })
    this.indexer = new Indexer({ store: this.store, idResolver: this.idResolver, sources: opts.sources, replayFromStart: opts.replayFromStart, reconnectDelayMs: opts.reconnectDelayMs, rawCommitFilter: opts.rawCommitFilter })
  }

  async start(): Promise<this> {
    // The aggregates' trailing windows and the planner's statistics, in a reader as in an indexer (both keep the index).
    this.upkeep = startUpkeep(this.db, { onError: (err) => log.warn('aggregate upkeep failed', { err }) })
    if (this.opts.index !== false) this.indexer.start()
    if (this.opts.port !== undefined) {
      // Loaded only when serving: an indexer-only process never loads the read API.
      const { createApp } = await import('./server.ts')
      const app = createApp({ db: this.db, store: this.store, indexer: this.indexer, idResolver: this.idResolver, brokerage: { trusted: this.trustedBrokerages, authorities: this.authorities }, publicUrl: this.opts.publicUrl, console: () => this.consoleLink, trustedProxies: new TrustedProxies(this.opts.trustedProxies ?? []), publicReads: this.opts.publicReads })
      const host = this.opts.host ?? '127.0.0.1'
      await new Promise<void>((resolve) => {
        const refusalBody = (r: Refusal) => new XrpcError(r.status, r.code, r.message).toJSON()
        this.server = serveHttp({ fetch: app.fetch, port: this.opts.port!, hostname: host, refusalBody }, (port) => {
          this.url = `http://${host}:${port}`
          resolve()
        })
      })
      log.info('appview listening', { url: this.url })
    }
    return this
  }

  /**
   * Hands the console's methods (appview/console-link.ts) to the console in
   * this process, once both have started. Service-auth tokens of those calls
   * must name this AppView's DID: the did:web of its public URL, else of the
   * address it listens on.
   */
  linkConsole(link: ConsoleLink): void {
    const url = this.opts.publicUrl ?? this.url
    if (!url) throw new Error('the AppView serves no HTTP: nothing to link the console to')
    this.consoleLink = { link, did: didWebOf(url) }
  }

  consoleIndex(): ConsoleIndex {
    return {
      purge: (did) => this.store.tx(() => this.store.purge(did)),
      records: (did) => this.store.recordsOf(did),
      accountRows: (did) => this.store.accountRows(did),
      providerRecords: (did) => this.store.providerRecords(did),
      isFriend: (owner, subject) => this.store.isFriend(owner, subject),
      receiptsAfter: (rowid, limit) => this.store.receiptsAfter(rowid, limit),
      receiptsForJob: (jobUri) => this.store.receiptsForJob(jobUri),
      record: (uri) => this.store.record(uri),
      attestationFor: (did, publicKey) => this.attestationFor(did, publicKey),
      modelActivity: () => modelActivity({ db: this.db }, {}),
      modelsDirectory: () => modelsDirectory(this.db, Date.now()),
      providerLeaderboard: (limit) => providerLeaderboard(this.db, Date.now(), limit),
    }
  }

  private attestationFor(did: string, publicKey: string): IndexedProvider | undefined {
    const row = statement(
      this.db,
      `SELECT uri, cid, body FROM records WHERE did = ? AND collection = ? AND json_extract(body, '$.publicKey') = ?
         AND did NOT IN (SELECT did FROM accounts WHERE active = 0) ORDER BY julianday(json_extract(body, '$.attestedAt')) DESC, uri DESC LIMIT 1`,
    ).get(did, ids.ComputeAttestation, publicKey) as { uri: string; cid: string; body: string } | undefined
    return row ? { uri: row.uri, cid: row.cid, body: JSON.parse(row.body) as Record<string, unknown> } : undefined
  }

  async stop(): Promise<void> {
    this.upkeep?.stop()
    this.upkeep = null
    await this.indexer.stop()
    if (this.server) {
      const server = this.server
      this.server = null
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
    this.db.$client.close()
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop()
  }
}
