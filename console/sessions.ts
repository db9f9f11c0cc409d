/**
 * Console sign-in sessions. The browser holds an opaque 256-bit token; the
 * database holds only its SHA-256, the user agent, and a keyed SHA-256 of the
 * IP (never the IP itself). Sessions last 7 days.
 */
import { createHash, createHmac, randomBytes } from 'node:crypto'
import type { Db } from '../src/db/index.ts'

export const SESSION_TTL_MS = 7 * 24 * 3600 * 1000

export interface ConsoleSession {
  id: string
  did: string
  userAgent: string | null
  ipHash: string | null
  createdAt: string
  lastSeenAt: string
  expiresAt: string
}

const sha256 = (s: string) => createHash('sha256').update(s).digest('hex')

export class ConsoleSessions {
  private readonly db: Db
  private readonly ipKey: Buffer

  constructor(db: Db, ipKey: Buffer) {
    this.db = db
    this.ipKey = ipKey
  }

  /** Keyed hash of an IP: lets us tell sessions apart without keeping where anyone connects from. */
  hashIp(ip: string | undefined): string | null {
    return ip ? createHmac('sha256', this.ipKey).update(ip).digest('hex') : null
  }

  /** Creates a session; returns the token for the cookie (shown nowhere else, stored nowhere). */
  create(did: string, userAgent: string | undefined, ip: string | undefined): { token: string; session: ConsoleSession } {
    const token = randomBytes(32).toString('base64url')
    const now = new Date()
    const session: ConsoleSession = {
      id: randomBytes(12).toString('base64url'),
      did,
      userAgent: userAgent?.slice(0, 512) ?? null,
      ipHash: this.hashIp(ip),
      createdAt: now.toISOString(),
      lastSeenAt: now.toISOString(),
      expiresAt: new Date(now.getTime() + SESSION_TTL_MS).toISOString(),
    }
    this.db.$client
      .prepare('INSERT INTO console_sessions (id, token_hash, did, user_agent, ip_hash, created_at, last_seen_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)')
      .run(session.id, sha256(token), did, session.userAgent, session.ipHash, session.createdAt, session.lastSeenAt, session.expiresAt)
    return { token, session }
  }

  /** The live session a cookie token belongs to, if any. */
  lookup(token: string | undefined): ConsoleSession | null {
    if (!token || token.length > 100) return null
    const now = new Date().toISOString()
    const row = this.db.$client
      .prepare('SELECT id, did, user_agent AS userAgent, ip_hash AS ipHash, created_at AS createdAt, last_seen_at AS lastSeenAt, expires_at AS expiresAt FROM console_sessions WHERE token_hash = ? AND expires_at > ?')
      .get(sha256(token), now) as ConsoleSession | undefined
    if (!row) return null
    // last-seen at minute resolution: no write per request.
    if (now.slice(0, 16) !== row.lastSeenAt.slice(0, 16)) this.db.$client.prepare('UPDATE console_sessions SET last_seen_at = ? WHERE id = ?').run(now, row.id)
    return row
  }

  list(did: string): ConsoleSession[] {
    return this.db.$client
      .prepare('SELECT id, did, user_agent AS userAgent, ip_hash AS ipHash, created_at AS createdAt, last_seen_at AS lastSeenAt, expires_at AS expiresAt FROM console_sessions WHERE did = ? AND expires_at > ? ORDER BY created_at DESC')
      .all(did, new Date().toISOString()) as ConsoleSession[]
  }

  /** Revokes one of the account's own sessions; false when it is not theirs (or gone). */
  revoke(did: string, id: string): boolean {
    return this.db.$client.prepare('DELETE FROM console_sessions WHERE id = ? AND did = ?').run(id, did).changes > 0
  }

  revokeAll(did: string): number {
    return this.db.$client.prepare('DELETE FROM console_sessions WHERE did = ?').run(did).changes
  }
}

export class AuditLog {
  private readonly db: Db
  constructor(db: Db) {
    this.db = db
  }
  record(did: string, action: string, ipHash: string | null, detail?: Record<string, unknown>): void {
    this.db.$client
      .prepare('INSERT INTO audit_log (did, action, detail, ip_hash, at) VALUES (?, ?, ?, ?, ?)')
      .run(did, action, detail ? JSON.stringify(detail) : null, ipHash, new Date().toISOString())
  }
  /** Newest first, `limit` per page; `before`: the id of the last entry of the previous page. */
  list(did: string, limit = 200, before?: number): { id: number; action: string; detail: string | null; ipHash: string | null; at: string }[] {
    return this.db.$client
      .prepare('SELECT id, action, detail, ip_hash AS ipHash, at FROM audit_log WHERE did = ? AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?')
      .all(did, before ?? null, before ?? null, limit) as never
  }
}
