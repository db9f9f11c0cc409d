/**
 * The one configuration module. Every knob is an environment variable with a
 * default; docs/configuration.md is generated from this list (npm run codegen).
 */
import { join, resolve } from 'node:path'
import { TrustedProxies } from './net/client-address.ts'

type Parse<T> = (raw: string) => T

interface Knob<T> {
  env: string
  default: T
  parse: Parse<T>
  doc: string
}

const str: Parse<string> = (s) => s
const int: Parse<number> = (s) => {
  const n = Number(s)
  if (!Number.isSafeInteger(n) || n < 0) throw new ConfigError(`expected a non-negative integer, got "${s}"`)
  return n
}
const list: Parse<string[]> = (s) =>
  s
    .split(',')
    .map((x) => x.trim())
    .filter(Boolean)
/** Comma-separated CIDRs, each checked here so a typo stops the start. */
const cidrs: Parse<string[]> = (s) => {
  const out = list(s)
  new TrustedProxies(out)
  return out
}
const mode: Parse<'dev' | 'production'> = (s) => {
  if (s !== 'dev' && s !== 'production') throw new ConfigError(`COCORE_MODE must be dev or production, got "${s}"`)
  return s
}

/** The network's brokerage (its advisor, ADR 0004), trusted by default as the network's verifiers do. */
export const NETWORK_BROKERAGE = 'did:web:advisor.cocore.dev'

/** The did:web naming a URL's host (`%3A` before a port), as did:web spells it. */
export const didWebOf = (url: string): string => `did:web:${encodeURIComponent(new URL(url).host)}`

export class ConfigError extends Error {
  override name = 'ConfigError'
}

const knob = <T>(env: string, def: T, parse: Parse<T>, doc: string): Knob<T> => ({ env, default: def, parse, doc })

/** Every setting, its environment variable, default and meaning. */
export const knobs = {
  mode: knob('COCORE_MODE', 'dev' as 'dev' | 'production', mode, '`dev` boots the embedded local network; `production` uses the relay/PDS URLs below'),
  host: knob('COCORE_HOST', '127.0.0.1', str, 'Address the HTTP services listen on'),
  dataDir: knob('COCORE_DATA_DIR', 'data', str, 'Directory for local state (SQLite databases, keys)'),
  appviewPort: knob('COCORE_APPVIEW_PORT', 2584, int, 'AppView XRPC port'),
  consolePort: knob('COCORE_CONSOLE_PORT', 2585, int, 'Console port'),
  plcPort: knob('COCORE_PLC_PORT', 2582, int, 'dev only: port of the embedded PLC directory'),
  pdsPort: knob('COCORE_PDS_PORT', 2583, int, 'dev only: port of the embedded PDS'),
  appviewDb: knob('COCORE_APPVIEW_DB', '', str, 'AppView SQLite file (default `<dataDir>/appview.sqlite`; dev: `<dataDir>/dev/appview.sqlite`, recreated by each `npm start`)'),
  appviewPublicUrl: knob('COCORE_APPVIEW_PUBLIC_URL', '', str, 'Public https URL of the AppView, used for its did:web (default `http://<host>:<appviewPort>`)'),
  consoleDb: knob('COCORE_CONSOLE_DB', '', str, 'Console SQLite file: OAuth sessions (sealed), console sessions, audit log (default `<dataDir>/console.sqlite`; dev: `<dataDir>/dev/console.sqlite`)'),
  consolePublicUrl: knob('COCORE_CONSOLE_PUBLIC_URL', '', str, 'production: public https URL of the console; its OAuth client metadata and JWKS are served there (default `http://<host>:<consolePort>`)'),
  secretKey: knob('COCORE_SECRET_KEY', '', str, 'Keys sealing OAuth state and sessions at rest: `kid:base64(32 bytes)[,older...]`, current first; rows sealed under an older key are re-sealed under the current one at start. Default: the key file'),
  secretKeyFile: knob('COCORE_SECRET_KEY_FILE', '', str, 'File holding the keys, in the same format (default `<dataDir>/secret.key`, which dev mode creates with mode 0600). Refused if group or others have any access; production mode refuses a key file inside the data directory and never creates one: set this or `COCORE_SECRET_KEY`'),
  exchangeDid: knob('COCORE_EXCHANGE_DID', '', str, "The exchange's own DID: enables the provider gateway at /v1/agent (dev: the demo exchange account)"),
  exchangeIdentifier: knob('COCORE_EXCHANGE_IDENTIFIER', '', str, "The exchange account's handle or DID: with the password, enables the ledger and settlements, published on its repo (dev: the demo exchange account)"),
  exchangePassword: knob('COCORE_EXCHANGE_PASSWORD', '', str, "An app password of the exchange account"),
  exchangePdsUrl: knob('COCORE_EXCHANGE_PDS_URL', '', str, "The exchange account's PDS (dev: the embedded one)"),
  exchangeSigningKey: knob('COCORE_EXCHANGE_SIGNING_KEY', '', str, 'The settlement signing key, a P-256 private JWK. Default: a key file `<dataDir>/exchange-signing-key.json` created on first start with mode 0600'),
  brokerageDid: knob('COCORE_BROKERAGE_DID', '', str, "The exchange's brokerage DID: it countersigns each job at dispatch with the brokerage key (the network's ADR 0004). Default: the did:web of the console's public URL (`did:web:<host>`, `%3A<port>` when it has one), whose document the console serves at `/.well-known/did.json`; another DID must publish the key (logged at start) itself. `none`: no countersignatures"),
  brokerageSigningKey: knob('COCORE_BROKERAGE_SIGNING_KEY', '', str, 'The brokerage key, a P-256 private JWK. Default: a key file `<dataDir>/brokerage-signing-key.json` created on first start with mode 0600'),
  trustedBrokerages: knob('COCORE_TRUSTED_BROKERAGES', [] as string[], list, `Comma-separated brokerage DIDs whose countersignature verifyReceipt reports as \`confidential\`. Default: the network's (\`${NETWORK_BROKERAGE}\`) and this console's brokerage DID`),
  feeBps: knob('COCORE_FEE_BPS', 500, int, 'Exchange fee in basis points of each charge, paid to the treasury (waived on self-loop jobs)'),
  tokenGrant: knob('COCORE_TOKEN_GRANT', 1_000_000, int, "Welcome grant, in tokens, on an account's first sign-in"),
  tokenFloor: knob('COCORE_TOKEN_FLOOR', 1_000, int, 'Admission floor: the balance an account needs to start a job'),
  tokenRateIn: knob('COCORE_TOKEN_RATE_IN', 1_000, int, 'Most a provider may charge per million input tokens'),
  tokenRateOut: knob('COCORE_TOKEN_RATE_OUT', 2_000, int, 'Most a provider may charge per million output tokens'),
  refreshAmount: knob('COCORE_REFRESH_AMOUNT', 100_000, int, 'Tokens credited to an active account once per refresh window'),
  refreshMinutes: knob('COCORE_REFRESH_MINUTES', 10_080, int, 'Refresh window in minutes (a week)'),
  patronageBps: knob('COCORE_PATRONAGE_BPS', 1_000, int, 'Share of the treasury distributed as patronage each window, in basis points'),
  patronageDays: knob('COCORE_PATRONAGE_DAYS', 30, int, 'Patronage window in days'),
  treasuryDid: knob('COCORE_TREASURY_DID', '', str, "Account that receives fees (default: the exchange's DID)"),
  apiKeyRatePerMinute: knob('COCORE_API_KEY_RATE_PER_MIN', 600, int, 'Requests per minute one API key may make (429 with Retry-After beyond)'),
  apiKeyIpRatePerMinute: knob('COCORE_API_KEY_IP_RATE_PER_MIN', 1200, int, 'API-key requests per minute from one client address (an IPv6 client by its /64), whatever keys it sends (429 with Retry-After beyond)'),
  apiKeyIpFailuresPerMinute: knob('COCORE_API_KEY_IP_FAILURES_PER_MIN', 30, int, 'Refused API keys (unknown, malformed, revoked, expired) per minute from one client address; beyond, its API-key requests get 429 with Retry-After before any key is looked up'),
  devicePairStartsPerMinute: knob('COCORE_DEVICE_PAIR_STARTS_PER_MIN', 10, int, 'Device pairings (dev.cocore.devicePair.start) one client address may start per minute (429 with Retry-After beyond)'),
  devicePairPollsPerMinute: knob('COCORE_DEVICE_PAIR_POLLS_PER_MIN', 60, int, "dev.cocore.devicePair.poll calls per minute from one client address (the network's agent polls every 2 s; 429 with Retry-After beyond)"),
  trustedProxies: knob('COCORE_TRUSTED_PROXIES', [] as string[], cidrs, 'Comma-separated CIDRs (IPv4 or IPv6) of reverse proxies in front of the console and the AppView: from a peer inside them, the client address is read from `X-Forwarded-For` (rightmost address that is not a trusted proxy); from any other peer the header is ignored. Empty: every limit per client address uses the TCP peer'),
  dailyTokenLimit: knob('COCORE_DAILY_TOKEN_LIMIT', 5_000_000, int, 'Tokens (prompt + completion) one account may use per UTC day on the inference API (429 insufficient_quota beyond)'),
  relayUrl: knob('COCORE_RELAY_URL', '', str, 'production: firehose relay, e.g. `wss://bsky.network`'),
  pdsUrls: knob('COCORE_PDS_URLS', [] as string[], list, 'Comma-separated PDS URLs to subscribe to directly (instead of, or besides, a relay)'),
  plcUrl: knob('COCORE_PLC_URL', 'https://plc.directory', str, 'PLC directory (dev: the embedded one)'),
  didCacheSize: knob('COCORE_DID_CACHE_SIZE', 50_000, int, 'Maximum DID documents kept in the identity cache'),
  didCacheTtlSec: knob('COCORE_DID_CACHE_TTL_SEC', 3600, int, 'Seconds before a cached DID document is refreshed'),
  logLevel: knob('COCORE_LOG_LEVEL', 'info', str, 'debug, info, warn, error or silent'),
} as const

type Knobs = typeof knobs
export type Config = { -readonly [K in keyof Knobs]: Knobs[K]['default'] } & {
  /** Resolved absolute paths and URLs derived from the knobs. */
  appviewDbPath: string
  appviewUrl: string
  consoleDbPath: string
  consoleUrl: string
  /** Firehose sources: relay and/or PDS URLs, as ws(s) URLs. */
  firehoseSources: string[]
}

export function loadConfig(env: Record<string, string | undefined> = process.env): Config {
  const out: Record<string, unknown> = {}
  for (const [key, k] of Object.entries(knobs) as [string, Knob<unknown>][]) {
    const raw = env[k.env]
    try {
      out[key] = raw === undefined || raw === '' ? k.default : k.parse(raw)
    } catch (err) {
      throw new ConfigError(`${k.env}: ${(err as Error).message}`)
    }
  }
  const c = out as Config
  c.dataDir = resolve(c.dataDir)
  c.appviewDbPath = c.appviewDb ? resolve(c.appviewDb) : join(c.dataDir, ...(c.mode === 'dev' ? ['dev'] : []), 'appview.sqlite')
  c.appviewUrl = c.appviewPublicUrl || `http://${c.host}:${c.appviewPort}`
  c.consoleDbPath = c.consoleDb ? resolve(c.consoleDb) : join(c.dataDir, ...(c.mode === 'dev' ? ['dev'] : []), 'console.sqlite')
  c.consoleUrl = c.consolePublicUrl || `http://${c.host}:${c.consolePort}`
  c.secretKeyFile = c.secretKeyFile ? resolve(c.secretKeyFile) : join(c.dataDir, 'secret.key')
  c.brokerageDid ||= didWebOf(c.consoleUrl)
  if (c.trustedBrokerages.length === 0) c.trustedBrokerages = [NETWORK_BROKERAGE, ...(c.brokerageDid === 'none' ? [] : [c.brokerageDid])]
  c.firehoseSources = [...(c.relayUrl ? [c.relayUrl] : []), ...c.pdsUrls].map(toWs)
  if (c.mode === 'production' && c.firehoseSources.length === 0) {
    throw new ConfigError('production mode needs COCORE_RELAY_URL or COCORE_PDS_URLS')
  }
  return c
}

/** https://pds.example -> wss://pds.example (the firehose endpoint is on the same host). */
export function toWs(url: string): string {
  return url.replace(/^http(s?):\/\//, 'ws$1://').replace(/\/+$/, '')
}

export function toHttp(url: string): string {
  return url.replace(/^ws(s?):\/\//, 'http$1://').replace(/\/+$/, '')
}
