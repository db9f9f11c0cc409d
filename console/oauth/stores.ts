/**
 * The OAuth client's state and session stores, in SQLite and only sealed
 * (AES-256-GCM, src/crypto/secretbox.ts). The row key is bound into the
 * ciphertext as associated data, so a sealed session cannot be moved to
 * another DID's row.
 */
import type { NodeSavedSession, NodeSavedSessionStore, NodeSavedState, NodeSavedStateStore } from '@atproto/oauth-client-node'
import type { Statement } from 'better-sqlite3'
import type { Db } from '../../src/db/index.ts'
import type { SecretBox } from '../../src/crypto/secretbox.ts'

class SealedStore<V> {
  private readonly get$: Statement
  private readonly set$: Statement
  private readonly del$: Statement
  private readonly box: SecretBox
  private readonly table: string

  constructor(db: Db, box: SecretBox, table: 'oauth_states' | 'oauth_sessions', keyCol: 'key' | 'did', timeCol: 'created_at' | 'updated_at') {
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
    return sealed === undefined ? undefined : (JSON.parse(this.box.open(sealed, `${this.table}:${key}`)) as V)
  }
  async set(key: string, value: V): Promise<void> {
    this.set$.run(key, this.box.seal(JSON.stringify(value), `${this.table}:${key}`), new Date().toISOString())
  }
  async del(key: string): Promise<void> {
    this.del$.run(key)
  }
}

export const stateStore = (db: Db, box: SecretBox): NodeSavedStateStore & { get(key: string): Promise<NodeSavedState | undefined> } =>
  new SealedStore<NodeSavedState>(db, box, 'oauth_states', 'key', 'created_at')

export const sessionStore = (db: Db, box: SecretBox): NodeSavedSessionStore => new SealedStore<NodeSavedSession>(db, box, 'oauth_sessions', 'did', 'updated_at')
