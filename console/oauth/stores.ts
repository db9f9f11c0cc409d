/**
 * The OAuth client's state and session stores, in SQLite and only sealed
 * (AES-256-GCM, src/crypto/secretbox.ts). The row key is bound into the
 * ciphertext as associated data, so a sealed session cannot be moved to
 * another DID's row. After a key rotation, `resealStale` moves every row to
 * the current key, so the older key can leave the ring.
 */
import type { NodeSavedSession, NodeSavedSessionStore, NodeSavedState, NodeSavedStateStore } from '@atproto/oauth-client-node'
import type { Statement } from 'better-sqlite3'
import { calculateJwkThumbprint, type JWK } from 'jose'
import type { Db } from '../../src/db/index.ts'
import { SecretBoxError, type SecretBox } from '../../src/crypto/secretbox.ts'

type SealedTable = 'oauth_states' | 'oauth_sessions'
/** The tables holding sealed values, with their row key column. */
const SEALED: readonly [SealedTable, 'key' | 'did'][] = [
  ['oauth_sessions', 'did'],
  ['oauth_states', 'key'],
]
/** Associated data: binds a ciphertext to its row. */
const aad = (table: SealedTable, key: string) => `${table}:${key}`

class SealedStore<V> {
  private readonly get$: Statement
  private readonly set$: Statement
  private readonly del$: Statement
  private readonly box: SecretBox
  private readonly table: SealedTable

  constructor(db: Db, box: SecretBox, table: SealedTable, keyCol: 'key' | 'did', timeCol: 'created_at' | 'updated_at') {
    this.box = box
    this.table = table
    this.get$ = db.$client.prepare(`SELECT sealed FROM ${table} WHERE ${keyCol} = ?`).pluck()
    this.set$ = db.$client.prepare(
      `INSERT INTO ${table} (${keyCol}, sealed, ${timeCol}) VALUES (?, ?, ?) ON CONFLICT (${keyCol}) DO UPDATE SET sealed = excluded.sealed, ${timeCol} = excluded.${timeCol}`,
    )
    this.del$ = db.$client.prepare(`DELETE FROM ${table} WHERE ${keyCol} = ?`)
  }

  async get(key: string): Promise<V | undefined> {
    const sealed = this.get$.get(key) as string | undefined
    return sealed === undefined ? undefined : (JSON.parse(this.box.open(sealed, aad(this.table, key))) as V)
  }
  async set(key: string, value: V): Promise<void> {
    this.set$.run(key, this.box.seal(JSON.stringify(value), aad(this.table, key)), new Date().toISOString())
  }
  async del(key: string): Promise<void> {
    this.del$.run(key)
  }
}

export const stateStore = (db: Db, box: SecretBox): NodeSavedStateStore & { get(key: string): Promise<NodeSavedState | undefined> } =>
  new SealedStore<NodeSavedState>(db, box, 'oauth_states', 'key', 'created_at')

export const sessionStore = (db: Db, box: SecretBox): NodeSavedSessionStore => new SealedStore<NodeSavedSession>(db, box, 'oauth_sessions', 'did', 'updated_at')

export interface ResealReport {
  resealed: number
  /** Rows no key of the ring opens (sealed under a key already removed): left as they are. */
  unreadable: number
}

/**
 * Re-seals, under the current key, every row sealed under an older one: in
 * batches of `batch` rows, one transaction each, yielding between them so
 * requests are served meanwhile. A row written since it was read (a token
 * refresh) is left to its writer, which sealed it under the current key.
 */
export async function resealStale(db: Db, box: SecretBox, batch = 200): Promise<ResealReport> {
  const report: ResealReport = { resealed: 0, unreadable: 0 }
  const prefix = box.currentPrefix
  for (const [table, keyCol] of SEALED) {
    const page = db.$client.prepare(`SELECT ${keyCol} AS k, sealed FROM ${table} WHERE substr(sealed, 1, ?) != ? AND ${keyCol} > ? ORDER BY ${keyCol} LIMIT ?`)
    const swap = db.$client.prepare(`UPDATE ${table} SET sealed = ? WHERE ${keyCol} = ? AND sealed = ?`)
    const reseal = db.$client.transaction((rows: { k: string; sealed: string }[]) => {
      for (const r of rows) {
        let plain: string
        try {
          plain = box.open(r.sealed, aad(table, r.k))
        } catch (err) {
          if (!(err instanceof SecretBoxError)) throw err
          report.unreadable++
          continue
        }
        report.resealed += swap.run(box.seal(plain, aad(table, r.k)), r.k, r.sealed).changes
      }
    })
    for (let after = ''; ; ) {
      const rows = page.all(prefix.length, prefix, after, batch) as { k: string; sealed: string }[]
      if (rows.length === 0) break
      reseal(rows)
      after = rows.at(-1)!.k
      await new Promise((r) => setImmediate(r))
    }
  }
  return report
}

/** What the account's export shows of its OAuth session: no token, no private key. */
export interface OAuthSessionInfo {
  scope: string
  /** The authorization server that issued the tokens, and the PDS they are for. */
  issuer: string
  pds: string
  authMethod: string
  accessTokenExpiresAt: string | null
  /** RFC 7638 thumbprint of the DPoP public key the tokens are bound to. */
  dpopKeyThumbprint: string | null
  updatedAt: string
}

export async function oauthSessionInfo(db: Db, box: SecretBox, did: string): Promise<OAuthSessionInfo | null> {
  const updatedAt = db.$client.prepare('SELECT updated_at FROM oauth_sessions WHERE did = ?').pluck().get(did) as string | undefined
  const session = await sessionStore(db, box).get(did)
  if (!session || !updatedAt) return null
  const t = session.tokenSet
  return {
    scope: t.scope,
    issuer: t.iss,
    pds: t.aud,
    authMethod: session.authMethod?.method ?? 'unknown',
    accessTokenExpiresAt: t.expires_at ?? null,
    dpopKeyThumbprint: await calculateJwkThumbprint(session.dpopJwk as JWK, 'sha256').catch(() => null),
    updatedAt,
  }
}
