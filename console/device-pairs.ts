/**
 * Device pairing (dev.cocore.devicePair.*), in the manner of the OAuth device
 * authorization grant (RFC 8628): a device starts a pairing and shows its
 * user code; a signed-in account approves that code, which mints an API key
 * of the account; the device, polling with its device id, collects the key
 * once. The wire (code alphabet and length, lifetime, poll answers, the
 * session's fields) is the network's: graze-social/cocore
 * packages/appview/src/devicepair/.
 *
 * Both secrets are held only as keyed hashes. The device id is 256 random
 * bits: whoever holds it collects the key. The user code is typed by a
 * person, so it is short: 8 characters of 31, about 40 bits (RFC 8628 §6.1
 * counts 8 characters of 20 as enough with rate limits). Guessing one takes an
 * authenticated call, limited per address and per account, within the code's
 * 10 minutes. The key's secret is sealed at rest until the one poll that
 * hands it out. Codes and device ids are never logged.
 */
import { createHmac, randomBytes } from 'node:crypto'
import type { Statement } from 'better-sqlite3'
import type { Db } from '../src/db/index.ts'
import type { SecretBox } from '../src/crypto/secretbox.ts'
import { limitedAddress, RateLimiter, type KeyGate } from './api-keys.ts'

/** How long a pairing may wait for its approval and its collection (the network's 10 minutes). */
export const PAIR_TTL_MS = 10 * 60_000
/** The wait between polls the device is told (the network's 3 s). */
export const POLL_INTERVAL_SEC = 3
/** Rows stay this long after they expire, so a late poll reads `expired` or `consumed` rather than `unknown`. */
const KEEP_AFTER_EXPIRY_MS = 3600_000
/** The network's alphabet: no I, L, O, 0 or 1, which people misread. */
const CODE_ALPHABET = 'ABCDEFGHJKMNPQRSTUVWXYZ23456789'
const CODE_LENGTH = 8
const CODE_RE = new RegExp(`^[${CODE_ALPHABET}]{${CODE_LENGTH}}$`)
/** Wrong codes per minute one account may try (besides its address's refused-credential limit). */
const WRONG_CODES_PER_ACCOUNT_PER_MIN = 10

/** What the device receives once approved (the network's `ProviderSession`). */
export interface DeviceSession {
  did: string
  handle: string
  /** An API key of `did`. */
  apiKey: string
  /** Where the device sends its calls: this console. */
  apiBase: string
}

export type PollStatus = 'unknown' | 'pending' | 'denied' | 'expired' | 'consumed'
export type PollAnswer = { status: PollStatus } | { status: 'session'; session: DeviceSession }

export interface PairingStart {
  deviceId: string
  userCode: string
  verificationUri: string
  pollIntervalSecs: number
  expiresInSecs: number
}

export class PairingError extends Error {
  override name = 'PairingError'
  /** not-found: no pairing in progress uses the code; conflict: its pairing is past approval. */
  readonly kind: 'not-found' | 'conflict'
  constructor(kind: 'not-found' | 'conflict', message: string) {
    super(message)
    this.kind = kind
  }
}

/** `ABCD-efgh` and `abcdefgh` name the same code: people type what they see, in either case, with or without its dash. */
const normalizeCode = (code: string) => code.toUpperCase().replace(/[\s-]/g, '')

/** Eight characters of the alphabet, each uniform: bytes of 248 and above (8 × 31) are drawn again. */
function userCode(): string {
  let out = ''
  while (out.length < CODE_LENGTH) {
    for (const b of randomBytes(CODE_LENGTH * 2)) {
      if (b < 248 && out.length < CODE_LENGTH) out += CODE_ALPHABET[b % 31]
    }
  }
  return out
}

type InProgress = 'pending' | 'approved' | 'denied'
/** Pending, or decided while the device has not collected its answer: its code still names it. */
const isInProgress = (status: string | null): status is InProgress => status === 'pending' || status === 'approved' || status === 'denied'

interface Row {
  device_hash: string
  status: string
  did: string | null
  key_id: string | null
  expires_at: string
}

export interface DevicePairsOpts {
  db: Db
  box: SecretBox
  /** The console's public URL: the verification page is there. */
  consoleUrl: string
  /** Revokes a minted key whose pairing was denied after its approval or expired uncollected. */
  revokeKey: (did: string, keyId: string, why: 'device-pair-denied' | 'device-pair-expired') => void
  ttlMs?: number
}

export class DevicePairs {
  private readonly db: Db
  private readonly box: SecretBox
  /** Derived from the current secret key: after a rotation, pairings in flight (10 minutes at most) are forgotten. */
  private readonly hashKey: Buffer
  private readonly verificationBase: string
  private readonly revokeKey: DevicePairsOpts['revokeKey']
  readonly ttlMs: number
  private readonly byCode: Statement
  private readonly byDevice: Statement
  private readonly take: (deviceHash: string, now: string) => string | undefined

  constructor(opts: DevicePairsOpts) {
    this.db = opts.db
    this.box = opts.box
    this.hashKey = opts.box.deriveKey('device-pair')
    this.verificationBase = opts.consoleUrl.replace(/\/+$/, '')
    this.revokeKey = opts.revokeKey
    this.ttlMs = opts.ttlMs ?? PAIR_TTL_MS
    const c = opts.db.$client
    this.byCode = c.prepare('SELECT device_hash, status, did, key_id, expires_at FROM device_pairs WHERE code_hash = ?')
    this.byDevice = c.prepare('SELECT device_hash, status, did, key_id, expires_at FROM device_pairs WHERE device_hash = ?')
    const approved = c.prepare("SELECT sealed_session FROM device_pairs WHERE device_hash = ? AND status = 'approved' AND expires_at > ?").pluck()
    const consume = c.prepare("UPDATE device_pairs SET status = 'consumed', sealed_session = NULL, code_hash = NULL WHERE device_hash = ? AND status = 'approved'")
    // Single use: the session is read and dropped in one transaction, and only the poll whose update took it gets it.
    const take = c.transaction((deviceHash: string, now: string) => {
      const sealed = approved.get(deviceHash, now) as string | undefined
      return sealed !== undefined && consume.run(deviceHash).changes === 1 ? sealed : undefined
    })
    this.take = (deviceHash, now) => take.immediate(deviceHash, now)
  }

  private hash(kind: 'device' | 'code', value: string): string {
    return createHmac('sha256', this.hashKey).update(`${kind}:${value}`).digest('hex')
  }

  start(now = Date.now()): PairingStart {
    this.gc(now)
    const deviceId = randomBytes(32).toString('base64url')
    const insert = this.db.$client.prepare("INSERT OR IGNORE INTO device_pairs (device_hash, code_hash, status, created_at, expires_at) VALUES (?, ?, 'pending', ?, ?)")
    // A code still in use is drawn again (each draw collides with a chance of one in 850 billion per live code).
    for (let i = 0; i < 8; i++) {
      const code = userCode()
      const inserted = insert.run(this.hash('device', deviceId), this.hash('code', code), new Date(now).toISOString(), new Date(now + this.ttlMs).toISOString()).changes > 0
      if (inserted) {
        return {
          deviceId,
          userCode: code,
          verificationUri: `${this.verificationBase}/devices/new?code=${code}`,
          pollIntervalSecs: POLL_INTERVAL_SEC,
          expiresInSecs: Math.floor(this.ttlMs / 1000),
        }
      }
    }
    throw new Error('no free user code after 8 draws')
  }

  /** The pairing a device id names, as the device is told; an approved one hands out its session here, once. */
  poll(deviceId: string, now = Date.now()): PollAnswer {
    this.gc(now)
    if (deviceId.length > 100) return { status: 'unknown' }
    const deviceHash = this.hash('device', deviceId)
    const taken = this.take(deviceHash, new Date(now).toISOString())
    if (taken) return { status: 'session', session: JSON.parse(this.box.open(taken, `device-pair:${deviceHash}`)) as DeviceSession }
    const row = this.byDevice.get(deviceHash) as Row | undefined
    if (!row) return { status: 'unknown' }
    return { status: this.statusOf(row, now) as PollStatus }
  }

  /** Where the pairing a code names stands, while it is in progress (checked before anything costlier is done for a caller). */
  stateOf(code: string, now = Date.now()): InProgress | null {
    this.gc(now)
    const row = this.rowOfCode(code)
    const status = row ? this.statusOf(row, now) : null
    return isInProgress(status) ? status : null
  }

  /**
   * Approves the pairing `code` names for `did`: `mint` creates the device's
   * key (in the same transaction, so a refused approval leaves none).
   * @throws PairingError not-found (no pairing in progress uses the code) or conflict (not pending)
   */
  approve(code: string, did: string, mint: () => { keyId: string; session: DeviceSession }, now = Date.now()): void {
    this.db.$client.transaction(() => {
      const row = this.liveRow(code, now)
      if (row.status !== 'pending') throw new PairingError('conflict', `this pairing is already ${this.statusOf(row, now)}`)
      const { keyId, session } = mint()
      const sealed = this.box.seal(JSON.stringify(session), `device-pair:${row.device_hash}`)
      this.db.$client.prepare("UPDATE device_pairs SET status = 'approved', did = ?, key_id = ?, sealed_session = ? WHERE device_hash = ?").run(did, keyId, sealed, row.device_hash)
    })()
  }

  /**
   * Denies the pairing `code` names. Its approver may still deny it until the
   * device has collected its key, which is then revoked.
   * @throws PairingError not-found or conflict (approved by another account)
   */
  deny(code: string, did: string, now = Date.now()): void {
    this.db.$client.transaction(() => {
      const row = this.liveRow(code, now)
      if (row.status === 'denied') return
      if (row.status === 'approved' && row.did !== did) throw new PairingError('conflict', 'this pairing was approved by another account')
      if (row.status === 'approved') this.revokeKey(row.did!, row.key_id!, 'device-pair-denied')
      this.db.$client.prepare("UPDATE device_pairs SET status = 'denied', sealed_session = NULL WHERE device_hash = ?").run(row.device_hash)
    })()
  }

  /** The row a code names while its pairing is in progress (pending, approved or denied, unexpired). */
  private liveRow(code: string, now: number): Row {
    const row = this.rowOfCode(code)
    if (!row || !isInProgress(this.statusOf(row, now))) throw new PairingError('not-found', 'no pairing in progress uses this code')
    return row
  }

  private rowOfCode(code: string): Row | undefined {
    const normalized = normalizeCode(code)
    // Not a code at all: nothing to look up.
    if (!CODE_RE.test(normalized)) return undefined
    return this.byCode.get(this.hash('code', normalized)) as Row | undefined
  }

  private statusOf(row: Row, now: number): string {
    return (row.status === 'pending' || row.status === 'approved') && row.expires_at <= new Date(now).toISOString() ? 'expired' : row.status
  }

  /**
   * Pairings past their time: an approved one's key, never collected, is
   * revoked and its session dropped; rows go an hour after they expire. Runs
   * on every start, poll and confirm (one range of an index), so nothing
   * outlives its time by more than the next of them.
   */
  private gc(now: number): void {
    const at = new Date(now).toISOString()
    const c = this.db.$client
    const ended = c.prepare("SELECT device_hash, status, did, key_id, expires_at FROM device_pairs WHERE expires_at <= ? AND status IN ('pending', 'approved')").all(at) as Row[]
    if (ended.length === 0 && !c.prepare('SELECT 1 FROM device_pairs WHERE expires_at <= ? LIMIT 1').get(new Date(now - KEEP_AFTER_EXPIRY_MS).toISOString())) return
    c.transaction(() => {
      for (const row of ended) {
        if (row.status === 'approved') this.revokeKey(row.did!, row.key_id!, 'device-pair-expired')
        c.prepare("UPDATE device_pairs SET status = 'expired', sealed_session = NULL, code_hash = NULL WHERE device_hash = ?").run(row.device_hash)
      }
      c.prepare('DELETE FROM device_pairs WHERE expires_at <= ?').run(new Date(now - KEEP_AFTER_EXPIRY_MS).toISOString())
    })()
  }
}

export interface PairingLimits {
  /** Pairings one client address may start per minute. */
  startsPerMinute: number
  /** Polls per minute from one client address (the network's agent polls every 2 s). */
  pollsPerMinute: number
}

/**
 * The limits of the pairing methods. Every call passes the API keys' address
 * limits first (KeyGate.admitAddress), so an address refused for guessing keys
 * is refused here too and the other way round: a device id or code that names
 * nothing counts as a refused credential. Starts and polls have their own
 * limit per address (start and poll need no credentials), wrong codes one per
 * account.
 */
export class PairingGate {
  private readonly gate: KeyGate
  private readonly hashIp: (ip: string | undefined) => string | null
  private readonly starts: RateLimiter
  private readonly polls: RateLimiter
  private readonly wrongCodes = new RateLimiter(WRONG_CODES_PER_ACCOUNT_PER_MIN)

  constructor(gate: KeyGate, limits: PairingLimits, hashIp: (ip: string | undefined) => string | null) {
    this.gate = gate
    this.hashIp = hashIp
    this.starts = new RateLimiter(limits.startsPerMinute)
    this.polls = new RateLimiter(limits.pollsPerMinute)
  }

  /** 0 when the call may go on (it is counted), else the seconds to wait. `did`: the confirming account. */
  admit(method: 'start' | 'poll' | 'confirm', ip: string | undefined, did?: string, now = Date.now()): number {
    const blocked = this.gate.admitAddress(ip, now)
    if (blocked > 0) return blocked
    if (method === 'confirm') return did ? this.wrongCodes.peek(did, now) : 0
    return (method === 'start' ? this.starts : this.polls).take(this.hashIp(limitedAddress(ip)) ?? 'unknown', now)
  }

  /** A device id or code that names no pairing: a refused credential of the address, and for a code, a wrong one of the account. */
  missed(ip: string | undefined, did?: string, now = Date.now()): void {
    this.gate.refused(ip, now)
    if (did) this.wrongCodes.take(did, now)
  }
}

/** What the pairing methods need. */
export interface DevicePairing {
  pairs: DevicePairs
  gate: PairingGate
  /** The handle the device is told: the DID document's, else the DID. */
  handleOf(did: string): Promise<string>
  /** Where the device sends its calls: the console's public URL. */
  apiBase: string
}
