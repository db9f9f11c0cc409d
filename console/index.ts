/**
 * The console service: its database (sealed OAuth state and sessions,
 * console sessions, audit log), its OAuth client, and the HTTP server.
 */
import type { Server } from 'node:http'
import { join } from 'node:path'
import { serveHttp, type Refusal } from '../src/net/http-server.ts'
import type { NodeOAuthClient } from '@atproto/oauth-client-node'
import { openDb, type Db } from '../src/db/index.ts'
import { loadKeyring, SecretBox } from '../src/crypto/secretbox.ts'
import { consoleLogger as log } from '../src/logger.ts'
import { createConsoleApp, HSTS, isBearerApi } from './app.ts'
import { clientAddress, contextClientAddress, TrustedProxies } from '../src/net/client-address.ts'
import { createOAuthClient } from './oauth/client.ts'
import { oauthSessionInfo, resealStale, stateStore, type ResealReport } from './oauth/stores.ts'
import { exportAccount } from './export.ts'
import { AuditLog, ConsoleSessions } from './sessions.ts'
import { ApiKeys, KeyGate, RateLimiter, UsageCounters } from './api-keys.ts'
import { DevicePairs, PairingGate, type PairingLimits } from './device-pairs.ts'
import { forwardedFrom } from './api/index.ts'
import { Publisher } from './publisher.ts'
import { Wiper } from './wipe.ts'
import { ProviderGateway } from './exchange/gateway.ts'
import { Exchange } from './exchange/exchange.ts'
import { OpenAiError, openAiRoutes } from './exchange/openai.ts'
import { directoryRoutes } from './exchange/directory.ts'
import { profileChip } from './exchange/openai-models.ts'
import { IMAGE_FETCH_TIMEOUT_MS, MAX_REMOTE_IMAGE_BYTES } from './exchange/openai-request.ts'
import { outboundFetch } from '../src/net/safe-fetch.ts'
import { Hono } from 'hono'
import type { InferenceDeps } from './exchange/admission.ts'
import type { ApiDeps } from './api/context.ts'
import { Economy } from './exchange/economy.ts'
import { DEFAULT_POLICY, type EconomyPolicy } from './exchange/policy.ts'
import { DispatchBook } from './exchange/dispatch-book.ts'
import { Brokerage } from './exchange/brokerage.ts'
import { loadSigningKey } from './exchange/signing-key.ts'
import { AuthorityResolver } from '../src/identity/authority.ts'
import { Ledger } from './exchange/ledger.ts'
import pkg from '../package.json' with { type: 'json' }

const SOFTWARE_VERSION = `cocore-appview/${pkg.version}`
import { createIdResolver } from '../src/identity/index.ts'
import { ServiceAuth } from './service-auth.ts'
import { XrpcError } from '../src/xrpc/errors.ts'
import { didWebOf, knobs } from '../src/config.ts'
import type { ConsoleIndex } from '../appview/index.ts'
import type { ConsoleLink } from '../appview/console-link.ts'

export interface ConsoleOpts {
  port: number
  host: string
  dbPath: string
  dataDir: string
  mode: 'dev' | 'production'
  appviewUrl: string
  /** Public URL; defaults to http://<host>:<port>. */
  publicUrl?: string
  /** COCORE_SECRET_KEY, else the key file. */
  secretKey?: string
  /** COCORE_SECRET_KEY_FILE; default `<dataDir>/secret.key` (refused in production). */
  secretKeyFile?: string
  /** dev: the embedded network. */
  plcUrl?: string
  pdsUrl?: string
  /** The AppView index, when it runs in this process: wipe removes the account's rows, export lists them. */
  index?: ConsoleIndex
  /** The exchange's DID: enables the provider gateway (`/v1/agent`), whose tokens must name it. */
  exchangeDid?: string
  /** The exchange account's credentials (an app password): enables the ledger and settlements, published on its repo. */
  exchangeAccount?: { pdsUrl: string; identifier: string; password: string }
  /** The economy; defaults from DEFAULT_POLICY. */
  policy?: Partial<EconomyPolicy>
  /** A private JWK (COCORE_EXCHANGE_SIGNING_KEY); default a key file in dataDir. */
  signingKey?: string
  /** The brokerage's DID (COCORE_BROKERAGE_DID); default the did:web of the public URL, served here; `none`: no countersignatures. */
  brokerageDid?: string
  /** Its key, a private JWK (COCORE_BROKERAGE_SIGNING_KEY); default a key file in dataDir. */
  brokerageSigningKey?: string
  /** Settlement tuning (tests shorten it). */
  settleEveryMs?: number
  outboxRetry?: { firstMs: number; maxMs: number }
  /** Test hooks of the settlement pipeline (crash tests). */
  settlementHooks?: { afterDecide?: (receiptUri: string) => void; afterPublish?: (ref: string) => void }
  /** Wipe retry timing (tests shorten it). */
  wipeRetry?: { firstMs: number; maxMs: number; giveUpAfterMs: number; attemptMs?: number }
  /** CIDRs of reverse proxies whose X-Forwarded-For names the client (COCORE_TRUSTED_PROXIES). */
  trustedProxies?: string[]
  /** Sign-in attempts per minute from one client address. */
  loginRatePerMinute?: number
  /** Requests per minute one API key may make (token bucket). */
  apiKeyRatePerMinute?: number
  /** API-key requests per minute from one client address, whatever keys it sends. */
  apiKeyIpRatePerMinute?: number
  /** Refused API keys per minute from one client address; beyond, its key requests are refused before any lookup. */
  apiKeyIpFailuresPerMinute?: number
  /** Tokens (in + out) one account may use per UTC day on the inference API. */
  dailyTokenLimit?: number
  /** Device pairing: starts and polls per minute from one client address; a pairing's lifetime (tests shorten it). */
  devicePair?: Partial<PairingLimits> & { ttlMs?: number }
  /** Exchange tuning (tests shorten it): a provider silent this long after a job is sent is passed over. */
  firstChunkTimeoutMs?: number
  /** Gateway heartbeat interval (tests shorten it). */
  pingIntervalMs?: number
  /** dev: shown on the sign-in page. */
  demoAccounts?: { handle: string; password: string; role: string }[]
}

export interface ConsoleService {
  /** The public URL (in dev, the address it listens on). */
  url: string
  /** Where it listens. */
  localUrl: string
  oauth: NodeOAuthClient
  publisher: Publisher
  /** The provider gateway and the exchange, when this console is an exchange. */
  gateway: ProviderGateway | null
  exchange: Exchange | null
  /** The exchange's brokerage, which countersigns its dispatches. */
  brokerage: Brokerage | null
  /** The ledger and settlements, when the exchange account's credentials are configured. */
  economy: Economy | null
  db: Db
  wiper: Wiper
  /** Rows sealed under an older key, re-sealed under the current one after the start. */
  resealed: Promise<ResealReport | null>
  /** What the AppView in this process hands the console's methods to (AppView.linkConsole). */
  appviewLink: ConsoleLink
  close(): Promise<void>
}

export async function startConsole(opts: ConsoleOpts): Promise<ConsoleService> {
  const trusted = new TrustedProxies(opts.trustedProxies ?? [])
  // A call the AppView forwarded comes with the address the AppView saw.
  const clientIp = (c: { env: unknown }) => {
    const forwarded = forwardedFrom(c)
    return forwarded ? forwarded.clientAddress : contextClientAddress(c, trusted)
  }
  const box = new SecretBox(
    loadKeyring({ env: opts.secretKey, file: opts.secretKeyFile ?? join(opts.dataDir, 'secret.key'), production: opts.mode === 'production' ? { dataDir: opts.dataDir } : undefined }),
  )
  const db = openDb(opts.dbPath)
  // After a key rotation: the older key can leave the ring once this is done.
  const resealed = resealStale(db, box).then(
    (r) => {
      if (r.resealed || r.unreadable) log.info('re-sealed rows under the current secret key', { ...r })
      return r
    },
    (err) => {
      log.error('re-sealing under the current secret key failed; it runs again at the next start', { err: err as Error })
      return null
    },
  )
  // The loopback client id must name the exact port, so bind first when the port is 0. Until the app
  // is built (the exchange policy may wait for its PDS), requests are answered 503.
  let app: ReturnType<typeof createConsoleApp> | null = null
  let server: Server
  const port = await new Promise<number>((resolve) => {
    server = serveHttp({ fetch: (req, env) => (app ? app.fetch(req, env) : starting(req, opts.mode === 'production')), port: opts.port, hostname: opts.host, refusalBody }, resolve)
  })
  const url = opts.publicUrl ?? `http://${opts.host}:${port}`
  const oauth = await createOAuthClient({
    db,
    box,
    consoleUrl: url,
    mode: opts.mode,
    plcUrl: opts.plcUrl,
    handleResolverUrl: opts.pdsUrl,
    clientKeyFile: join(opts.dataDir, 'oauth-client-key.json'),
  })
  const sessions = new ConsoleSessions(db, box.deriveKey('ip-hash'))
  const audit = new AuditLog(db)
  const publisher = new Publisher(oauth)
  const wiper = new Wiper({
    db,
    publisher,
    purgeIndex: opts.index ? (did) => opts.index!.purge(did) : null,
    revokeOAuth: (did) => {
      publisher.forget(did)
      return oauth.revoke(did)
    },
    retry: opts.wipeRetry,
  })
  const usage = new UsageCounters(db)
  const policy = { ...DEFAULT_POLICY, ...opts.policy }
  // Holds and the admission floor apply where the ledger runs (the exchange account is configured).
  const book = new DispatchBook({ db, policy, ledger: opts.exchangeAccount ? new Ledger(db) : null, usage, dailyTokenLimit: opts.dailyTokenLimit ?? 5_000_000 })
  const interrupted = book.recoverInterrupted()
  if (interrupted) log.info('jobs interrupted by the last stop ended as failed', { jobs: interrupted })
  let gateway: ProviderGateway | null = null
  let exchange: Exchange | null = null
  let economy: Economy | null = null
  let brokerage: Brokerage | null = null
  const idResolver = createIdResolver({ plcUrl: opts.plcUrl ?? 'https://plc.directory', cacheSize: 10_000, cacheTtlSec: 600, allowHttp: opts.mode === 'dev' })
  if (opts.exchangeDid && opts.index) {
    const index = opts.index
    const brokerageDid = opts.brokerageDid || didWebOf(url)
    if (brokerageDid !== 'none') {
      const key = loadSigningKey(opts.brokerageSigningKey, join(opts.dataDir, 'brokerage-signing-key.json'), 'COCORE_BROKERAGE_SIGNING_KEY')
      brokerage = new Brokerage({ did: brokerageDid, key, attestationFor: (did, publicKey) => index.attestationFor(did, publicKey) })
    }
    gateway = new ProviderGateway({
      exchangeDid: opts.exchangeDid,
      idResolver,
      providerRecords: (did) => index.providerRecords(did),
      pingIntervalMs: opts.pingIntervalMs,
      // The per-address connection cap counts clients, not the reverse proxy in front of them.
      clientAddress: (req) => clientAddress(req, trusted),
    })
    gateway.attach(server!)
    exchange = new Exchange({
      gateway,
      exchangeDid: opts.exchangeDid,
      book,
      brokerage,
      beforeAdmit: (did) => void economy?.refresh(did),
      prepareJob: (did, spec) => publisher.prepareJob(did, spec),
      isFriend: (owner, subject) => index.isFriend(owner, subject),
      firstChunkTimeoutMs: opts.firstChunkTimeoutMs,
    })
  }
  if (opts.exchangeDid && opts.index && opts.exchangeAccount) {
    economy = await Economy.start({
      db,
      index: opts.index,
      book,
      repo: opts.exchangeAccount,
      policy,
      signingKey: { env: opts.signingKey, file: join(opts.dataDir, 'exchange-signing-key.json') },
      softwareVersion: SOFTWARE_VERSION,
      settleEveryMs: opts.settleEveryMs,
      outbox: { retry: opts.outboxRetry, afterPublish: opts.settlementHooks?.afterPublish },
      afterDecide: opts.settlementHooks?.afterDecide,
      brokerage,
      authorities: new AuthorityResolver({ idResolver }),
    })
    if (economy.repo.did !== opts.exchangeDid) throw new Error(`the exchange account signs in as ${economy.repo.did}, not the configured exchange DID ${opts.exchangeDid}`)
  }
  const hasPdsSession$ = db.$client.prepare('SELECT 1 FROM oauth_sessions WHERE did = ?').pluck()
  const inference: InferenceDeps | undefined = exchange
    ? { exchange, usage, hasPdsSession: (did) => hasPdsSession$.get(did) !== undefined, economy }
    : undefined
  // Service-auth tokens made to the console must name the exchange's DID, the one DID it answers for (none: it
  // takes only the AppView's forwarded calls, whose tokens name the AppView's).
  const serviceAuth = new ServiceAuth({ audience: opts.exchangeDid, idResolver })
  const keys = new ApiKeys(db)
  // One gate for XRPC and /v1: a client address guessing keys is slowed on both.
  const gate = new KeyGate(
    keys,
    {
      perKeyPerMinute: opts.apiKeyRatePerMinute ?? knobs.apiKeyRatePerMinute.default,
      perAddressPerMinute: opts.apiKeyIpRatePerMinute ?? knobs.apiKeyIpRatePerMinute.default,
      failuresPerAddressPerMinute: opts.apiKeyIpFailuresPerMinute ?? knobs.apiKeyIpFailuresPerMinute.default,
    },
    (ip) => sessions.hashIp(ip),
  )
  const pairs = new DevicePairs({
    db,
    box,
    consoleUrl: url,
    ttlMs: opts.devicePair?.ttlMs,
    revokeKey: (did, keyId, why) => {
      if (keys.revoke(did, keyId)) audit.record(did, 'api-key-revoke', null, { key: keyId, via: why })
    },
  })
  const pairingLimits: PairingLimits = {
    startsPerMinute: opts.devicePair?.startsPerMinute ?? knobs.devicePairStartsPerMinute.default,
    pollsPerMinute: opts.devicePair?.pollsPerMinute ?? knobs.devicePairPollsPerMinute.default,
  }
  const pairing = {
    pairs,
    gate: new PairingGate(gate, pairingLimits, (ip) => sessions.hashIp(ip)),
    // The DID document's handle, unverified: the device only shows it.
    handleOf: (did: string) => idResolver.did.resolveAtprotoData(did).then((d) => (d.handle && d.handle !== 'handle.invalid' ? d.handle : did), () => did),
    apiBase: url,
  }
  const api: ApiDeps = { keys, usage, audit, sessions, inference, serviceAuth, pairing }
  app = createConsoleApp({
    oauth,
    states: stateStore(db, box),
    sessions,
    audit,
    api,
    gate,
    onSignIn: economy ? (did) => void economy!.welcome(did) : undefined,
    inference: inference
      ? new Hono()
          .route(
            '/',
            openAiRoutes({
              ...inference,
              gate,
              clientIp,
              serviceAuth,
              // Image URLs from requests are user data: SSRF-safe outside the local network (https, public addresses).
              fetchImage: outboundFetch({ local: opts.mode === 'dev', maxBytes: MAX_REMOTE_IMAGE_BYTES, timeoutMs: IMAGE_FETCH_TIMEOUT_MS }),
              profileOf: (did) => profileChip(opts.index, did),
              modelActivity: opts.index ? () => opts.index!.modelActivity() : undefined,
            }),
          )
          .route('/', directoryRoutes(inference.exchange))
          .route('/', brokerage ? brokerage.routes(url) : new Hono())
      : undefined,
    loginLimiter: new RateLimiter(opts.loginRatePerMinute ?? 30),
    oauthStateGc: () => void db.$client.prepare('DELETE FROM oauth_states WHERE created_at < ?').run(new Date(Date.now() - 3600_000).toISOString()),
    publisher,
    wiper,
    exportData: (did, handle) => exportAccount({ api, sessions, audit, index: opts.index, oauthSession: (d) => oauthSessionInfo(db, box, d) }, did, handle),
    appviewUrl: opts.appviewUrl,
    consoleUrl: url,
    secureCookies: opts.mode === 'production',
    demoAccounts: opts.demoAccounts,
    clientIp,
  })
  // Wipes a previous process left running continue now.
  wiper.resumeAll()
  // Hourly: expired console sessions and old wipe reports go.
  const housekeeping = setInterval(() => {
    db.$client.prepare('DELETE FROM console_sessions WHERE expires_at < ?').run(new Date().toISOString())
    wiper.purgeExpired()
  }, 3600_000)
  housekeeping.unref()
  log.info('console listening', { url })
  return {
    url,
    localUrl: `http://${opts.host}:${port}`,
    oauth,
    publisher,
    db,
    wiper,
    resealed,
    appviewLink: { fetch: async (req, forwarded) => (app ? app.fetch(req, { forwarded }) : starting(req, opts.mode === 'production')) },
    gateway,
    exchange,
    brokerage,
    economy,
    close: async () => {
      clearInterval(housekeeping)
      await economy?.stop()
      await gateway?.close()
      await wiper.stop()
      await resealed
      await new Promise<void>((resolve) => {
        server.closeAllConnections()
        server.close(() => {
          db.$client.close()
          resolve()
        })
      })
    },
  }
}

/** A request refused before any route: OpenAI's error object under `/v1/` and `/api/v1/`, XRPC's everywhere else. */
function refusalBody(r: Refusal): object {
  if (r.path && isBearerApi(r.path)) {
    const type = r.status >= 500 ? 'server_error' : 'invalid_request_error'
    return new OpenAiError(r.status, type, r.code.replace(/(?<=[a-z])(?=[A-Z])/g, '_').toLowerCase(), r.message).toJSON()
  }
  return new XrpcError(r.status, r.code, r.message).toJSON()
}

/** The answer while the console starts: 503 with Retry-After, as an XRPC or OpenAI error where one is expected. */
function starting(req: Request, production: boolean): Response {
  const path = new URL(req.url).pathname
  const message = 'the console is starting; retry in a moment'
  const body = path.startsWith('/xrpc/') ? new XrpcError(503, 'ServiceUnavailable', message).toJSON() : isBearerApi(path) ? new OpenAiError(503, 'service_unavailable_error', 'service_starting', message).toJSON() : null
  const headers = { 'retry-after': '1', 'cache-control': 'no-store', ...(production ? { 'strict-transport-security': HSTS } : {}) }
  return body ? Response.json(body, { status: 503, headers }) : new Response(message, { status: 503, headers: { ...headers, 'content-type': 'text/plain; charset=utf-8' } })
}
