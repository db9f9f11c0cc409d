/**
 * API keys: `cocore_` + 43 base62 characters (256 random bits) + a 6-character
 * base62 CRC32 of the body, so secret scanners can recognise a key and typos
 * are caught without a lookup. Only the SHA-256 of a key is stored; the key is
 * shown once, at creation. Unknown, revoked, expired and malformed keys are
 * refused the same way.
 */
import { createHash, randomBytes } from 'node:crypto'
import type { Statement } from 'better-sqlite3'
import type { Db } from '../src/db/index.ts'
import { limitedAddress, RateLimiter } from '../src/net/rate-limit.ts'

export { limitedAddress, RateLimiter }

export const KEY_PREFIX = 'cocore_'
export const SCOPES = ['read', 'inference', 'records:write', 'keys:manage'] as const
export type Scope = (typeof SCOPES)[number]

const B62 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'

function base62(bytes: Uint8Array, width: number): string {
  let n = BigInt('0x' + (Buffer.from(bytes).toString('hex') || '0'))
  let out = ''
  while (n > 0n) {
    out = B62[Number(n % 62n)] + out
    n /= 62n
  }
  return out.padStart(width, '0')
}

const CRC_TABLE = Array.from({ length: 256 }, (_, i) => {
  let c = i
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1
  return c >>> 0
})
function crc32(s: string): number {
  let c = 0xffffffff
  for (const b of Buffer.from(s)) c = CRC_TABLE[(c ^ b) & 0xff]! ^ (c >>> 8)
  return (c ^ 0xffffffff) >>> 0
}
const checksum = (body: string) => base62(Buffer.from(crc32(body).toString(16).padStart(8, '0'), 'hex'), 6)

const BODY_LEN = 43
const KEY_RE = new RegExp(`^${KEY_PREFIX}([0-9A-Za-z]{${BODY_LEN}})([0-9A-Za-z]{6})$`)

export function generateKey(): string {
  return withChecksum(base62(randomBytes(32), BODY_LEN))
}

/** A key of the right shape for a 43-character base62 body (tests forge well-formed keys with it). */
export const withChecksum = (body: string): string => `${KEY_PREFIX}${body}${checksum(body)}`

/** Format and checksum only: a key that fails this is refused without touching the database. */
export function wellFormed(key: string): boolean {
  const m = KEY_RE.exec(key)
  return !!m && checksum(m[1]!) === m[2]
}

export const hashKey = (key: string) => createHash('sha256').update(key).digest('hex')

export interface ApiKey {
  id: string
  did: string
  name: string
  prefix: string
  scopes: Scope[]
  createdAt: string
  expiresAt?: string
  revokedAt?: string
  lastUsedAt?: string
}

interface Row {
  id: string
  did: string
  name: string
  prefix: string
  scopes: string
  created_at: string
  expires_at: string | null
  revoked_at: string | null
  last_used_at: string | null
}

const toKey = (r: Row): ApiKey => ({
  id: r.id,
  did: r.did,
  name: r.name,
  prefix: r.prefix,
  scopes: JSON.parse(r.scopes) as Scope[],
  createdAt: r.created_at,
  ...(r.expires_at ? { expiresAt: r.expires_at } : {}),
  ...(r.revoked_at ? { revokedAt: r.revoked_at } : {}),
  ...(r.last_used_at ? { lastUsedAt: r.last_used_at } : {}),
})

export class ApiKeys {
  private readonly db: Db
  /** Every API call looks its key up: prepared once. */
  private readonly byHash: Statement
  private readonly touch: Statement
  constructor(db: Db) {
    this.db = db
    this.byHash = db.$client.prepare('SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)')
    this.touch = db.$client.prepare('UPDATE api_keys SET last_used_at = ? WHERE id = ?')
  }

  /** Creates a key; the secret is returned here and nowhere else. */
  create(did: string, name: string, scopes: Scope[], expiresAt?: string): { key: ApiKey; secret: string } {
    const secret = generateKey()
    const row: Row = {
      id: `key_${randomBytes(9).toString('base64url')}`,
      did,
      name,
      // Enough to recognise a key in a list, far too little to use it.
      prefix: secret.slice(0, KEY_PREFIX.length + 6),
      scopes: JSON.stringify([...new Set(scopes)].sort()),
      created_at: new Date().toISOString(),
      expires_at: expiresAt ?? null,
      revoked_at: null,
      last_used_at: null,
    }
    this.db.$client
      .prepare('INSERT INTO api_keys (id, did, name, prefix, key_hash, scopes, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)')
      .run(row.id, did, name, row.prefix, hashKey(secret), row.scopes, row.created_at, row.expires_at)
    return { key: toKey(row), secret }
  }

  list(did: string): ApiKey[] {
    return (this.db.$client.prepare('SELECT * FROM api_keys WHERE did = ? ORDER BY created_at DESC, id').all(did) as Row[]).map(toKey)
  }

  /**
   * Revoking keeps the row (the account sees what existed); true only when an
   * active key of this account was revoked, so another account's key id and
   * an unknown one answer alike.
   */
  revoke(did: string, id: string): boolean {
    return this.db.$client.prepare('UPDATE api_keys SET revoked_at = ? WHERE id = ? AND did = ? AND revoked_at IS NULL').run(new Date().toISOString(), id, did).changes > 0
  }

  delete(did: string, id: string): boolean {
    return this.db.$client.prepare('DELETE FROM api_keys WHERE id = ? AND did = ?').run(id, did).changes > 0
  }

  deleteAll(did: string): number {
    return this.db.$client.prepare('DELETE FROM api_keys WHERE did = ?').run(did).changes
  }

  /** The live key a secret names, looked up by its hash; null for anything else. */
  authenticate(secret: string): ApiKey | null {
    if (!wellFormed(secret)) return null
    const now = new Date().toISOString()
    const row = this.byHash.get(hashKey(secret), now) as Row | undefined
    if (!row) return null
    // lastUsedAt at minute resolution: no write per request.
    if (row.last_used_at?.slice(0, 16) !== now.slice(0, 16)) this.touch.run(now, row.id)
    return toKey({ ...row, last_used_at: now })
  }
}

/** Daily usage counters per account and per key: metadata only (counts and cost, never content). */
export class UsageCounters {
  private readonly db: Db
  /** Written on every call and read before every job: prepared once (the transaction too). */
  private readonly todayRow: Statement
  private readonly addRows: (did: string, keyId: string | null, day: string, v: number[]) => void
  constructor(db: Db) {
    this.db = db
    const upsert = db.$client.prepare(`INSERT INTO usage_daily (did, key_id, day, requests, tokens_in, tokens_out, cost) VALUES (?, ?, ?, ?, ?, ?, ?)
      ON CONFLICT (did, key_id, day) DO UPDATE SET requests = requests + excluded.requests, tokens_in = tokens_in + excluded.tokens_in,
        tokens_out = tokens_out + excluded.tokens_out, cost = cost + excluded.cost`)
    this.todayRow = db.$client.prepare("SELECT requests, tokens_in AS tokensIn, tokens_out AS tokensOut, cost FROM usage_daily WHERE did = ? AND key_id = '' AND day = ?")
    this.addRows = db.$client.transaction((did: string, keyId: string | null, day: string, v: number[]) => {
      // '' is the account-wide row.
      upsert.run(did, '', day, ...v)
      if (keyId) upsert.run(did, keyId, day, ...v)
    })
  }
  add(did: string, keyId: string | null, u: { requests?: number; tokensIn?: number; tokensOut?: number; cost?: number }): void {
    const day = new Date().toISOString().slice(0, 10)
    this.addRows(did, keyId, day, [u.requests ?? 0, u.tokensIn ?? 0, u.tokensOut ?? 0, u.cost ?? 0])
  }
  /** The account's totals for today (UTC). */
  today(did: string): { requests: number; tokensIn: number; tokensOut: number; cost: number } {
    const row = this.todayRow.get(did, new Date().toISOString().slice(0, 10)) as { requests: number; tokensIn: number; tokensOut: number; cost: number } | undefined
    return row ?? { requests: 0, tokensIn: 0, tokensOut: 0, cost: 0 }
  }
  list(did: string): { keyId: string; day: string; requests: number; tokensIn: number; tokensOut: number; cost: number }[] {
    return this.db.$client
      .prepare('SELECT key_id AS keyId, day, requests, tokens_in AS tokensIn, tokens_out AS tokensOut, cost FROM usage_daily WHERE did = ? ORDER BY day DESC, key_id')
      .all(did) as never
  }
}

export interface KeyLimits {
  /** Requests per minute one key may make. */
  perKeyPerMinute: number
  /** API-key requests per minute from one client address, whatever keys it sends. */
  perAddressPerMinute: number
  /** Refused keys (unknown, malformed, revoked, expired, none) per minute from one client address. */
  failuresPerAddressPerMinute: number
}

/** Why a request's key was not admitted; each API answers it in its own error shape. */
export type KeyRefusal =
  /** Unusable key: one answer for every kind, so nothing tells whether a key exists, was revoked or expired. */
  | { refused: 'invalid' }
  /** The client address is over its limit: decided before the key is looked up, so the answer says nothing about the key. */
  | { refused: 'address'; retryAfterSec: number }
  /** This (live) key is over its own limit. */
  | { refused: 'key'; retryAfterSec: number }

/**
 * The door every API-key request goes through, on XRPC and on `/v1`: limits
 * per client address first (all calls, and refused keys, so guessing keys
 * from one address is slow), then the key, then the key's own limit.
 * Addresses are keyed by an HMAC (ConsoleSessions.hashIp) of their limited
 * part: none is held in the clear, and the buckets live in memory only.
 */
export class KeyGate {
  private readonly keys: ApiKeys
  private readonly hashIp: (ip: string | undefined) => string | null
  private readonly perKey: RateLimiter
  private readonly perAddress: RateLimiter
  private readonly failures: RateLimiter
  constructor(keys: ApiKeys, limits: KeyLimits, hashIp: (ip: string | undefined) => string | null) {
    this.keys = keys
    this.hashIp = hashIp
    this.perKey = new RateLimiter(limits.perKeyPerMinute)
    this.perAddress = new RateLimiter(limits.perAddressPerMinute)
    this.failures = new RateLimiter(limits.failuresPerAddressPerMinute)
  }

  /**
   * `authorization`: the request's Authorization header, which must be
   * `Bearer <key>` (anything else, or none, is a refused key). `ip`: the
   * client address as the console takes it; unknown addresses share one bucket.
   */
  admit(authorization: string | undefined, ip: string | undefined, now = Date.now()): ApiKey | KeyRefusal {
    // @NOTE Order matters here: both address limits answer before the key is
    // looked up, so a blocked address gets the same answer for a live key as
    // for a guessed one.
    const blocked = this.admitAddress(ip, now)
    if (blocked > 0) return { refused: 'address', retryAfterSec: blocked }
    const secret = /^Bearer (\S+)$/.exec(authorization ?? '')?.[1]
    const key = secret === undefined ? null : this.keys.authenticate(secret)
    if (!key) {
      this.refused(ip, now)
      return { refused: 'invalid' }
    }
    const wait = this.perKey.take(key.id, now)
    return wait > 0 ? { refused: 'key', retryAfterSec: wait } : key
  }

  /**
   * The address limits alone, for bearer credentials that are not API keys
   * (service-auth tokens, whose checking may fetch a DID document): 0 when
   * the request may go on (it is counted), else the seconds to wait.
   */
  admitAddress(ip: string | undefined, now = Date.now()): number {
    const address = this.addressOf(ip)
    return this.failures.peek(address, now) || this.perAddress.take(address, now)
  }

  /** Counts a refused credential against its address. */
  refused(ip: string | undefined, now = Date.now()): void {
    this.failures.take(this.addressOf(ip), now)
  }

  private addressOf(ip: string | undefined): string {
    return this.hashIp(limitedAddress(ip)) ?? 'unknown'
  }
}
