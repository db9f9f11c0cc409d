/**
 * The one module that holds users' OAuth sessions and writes to their PDSes;
 * nothing else in the system talks to a PDS on a user's behalf. Every record
 * is validated against our lexicons before it is written, and refused with
 * the offending field named.
 */
import { Agent } from '@atproto/api'
import { TID } from '@atproto/common-web'
import type { NodeOAuthClient } from '@atproto/oauth-client-node'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { AccountFriend, AccountProfile, ComputeProvider } from '../src/lexicon/generated/types.ts'
import { validateRecord } from '../src/lexicon/validate.ts'

/** The most records a console page lists from a PDS (friends, machines). */
const MAX_LIST = 2_000

export class PublishError extends Error {
  override name = 'PublishError'
}

export class InvalidRecordError extends PublishError {
  override name = 'InvalidRecordError'
}

/** The fields of a provider record its owner decides; the provider agent owns all the others. */
export const OWNER_INTENT_FIELDS = ['desiredModels', 'active', 'proBono', 'shareLocation'] as const
export type OwnerIntent = Partial<Pick<ComputeProvider, (typeof OWNER_INTENT_FIELDS)[number]>>

export interface RepoRecord<T> {
  uri: string
  cid: string
  value: T
}

export class Publisher {
  private readonly oauth: NodeOAuthClient

  constructor(oauth: NodeOAuthClient) {
    this.oauth = oauth
  }

  /** An agent acting as `did`, from its stored OAuth session (refreshed under the client's lock). */
  async agent(did: string): Promise<Agent> {
    return new Agent(await this.oauth.restore(did))
  }

  private check(collection: string, record: Record<string, unknown>): void {
    const v = validateRecord(collection, { ...record, $type: collection })
    if (!v.success) throw new InvalidRecordError(v.message.replace(/^Record\//, ''))
  }

  async getProfile(did: string): Promise<RepoRecord<AccountProfile> | null> {
    const agent = await this.agent(did)
    try {
      const res = await agent.com.atproto.repo.getRecord({ repo: did, collection: ids.AccountProfile, rkey: 'self' })
      return { uri: res.data.uri, cid: res.data.cid!, value: res.data.value as unknown as AccountProfile }
    } catch (err) {
      if ((err as { error?: string }).error === 'RecordNotFound') return null
      throw err
    }
  }

  /** Creates or updates the profile, keeping its createdAt and the fields the form does not edit. */
  async putProfile(did: string, edit: { displayName?: string; bio?: string }): Promise<RepoRecord<AccountProfile>> {
    const current = await this.getProfile(did)
    const now = new Date().toISOString()
    const record: Record<string, unknown> = { ...(current?.value ?? {}), $type: ids.AccountProfile, createdAt: current?.value.createdAt ?? now, updatedAt: now }
    for (const [k, v] of Object.entries(edit)) {
      if (v === undefined) continue
      if (v === '') delete record[k]
      else record[k] = v
    }
    this.check(ids.AccountProfile, record)
    const agent = await this.agent(did)
    const res = await agent.com.atproto.repo.putRecord({ repo: did, collection: ids.AccountProfile, rkey: 'self', record, swapRecord: current?.cid ?? null })
    return { uri: res.data.uri, cid: res.data.cid, value: record as unknown as AccountProfile }
  }

  async listFriends(did: string): Promise<RepoRecord<AccountFriend>[]> {
    return this.listAll<AccountFriend>(did, ids.AccountFriend)
  }

  async addFriend(did: string, subject: string, note?: string): Promise<RepoRecord<AccountFriend>> {
    const record: Record<string, unknown> = { $type: ids.AccountFriend, subject, createdAt: new Date().toISOString(), ...(note ? { note } : {}) }
    this.check(ids.AccountFriend, record)
    const agent = await this.agent(did)
    const res = await agent.com.atproto.repo.createRecord({ repo: did, collection: ids.AccountFriend, rkey: TID.nextStr(), record })
    return { uri: res.data.uri, cid: res.data.cid, value: record as unknown as AccountFriend }
  }

  async removeFriend(did: string, rkey: string): Promise<void> {
    const agent = await this.agent(did)
    await agent.com.atproto.repo.deleteRecord({ repo: did, collection: ids.AccountFriend, rkey })
  }

  async listProviders(did: string): Promise<RepoRecord<ComputeProvider>[]> {
    return this.listAll<ComputeProvider>(did, ids.ComputeProvider)
  }

  /**
   * Sets the owner's intent on one of their provider machines. Every other
   * field is kept exactly as the provider agent wrote it, and the write is
   * conditional on the version read (`swapRecord`), so a concurrent update by
   * the agent is never overwritten.
   */
  async setProviderIntent(did: string, rkey: string, intent: OwnerIntent): Promise<RepoRecord<ComputeProvider>> {
    const agent = await this.agent(did)
    const current = await agent.com.atproto.repo.getRecord({ repo: did, collection: ids.ComputeProvider, rkey })
    const record: Record<string, unknown> = { ...(current.data.value as Record<string, unknown>) }
    for (const f of OWNER_INTENT_FIELDS) {
      if (!(f in intent)) continue
      const v = intent[f]
      if (v === undefined) delete record[f]
      else record[f] = v
    }
    this.check(ids.ComputeProvider, record)
    const res = await agent.com.atproto.repo.putRecord({ repo: did, collection: ids.ComputeProvider, rkey, record, swapRecord: current.data.cid })
    return { uri: res.data.uri, cid: res.data.cid, value: record as unknown as ComputeProvider }
  }

  /** Up to MAX_LIST records: a page of the console never pulls an unbounded list from a PDS. */
  private async listAll<T>(did: string, collection: string): Promise<RepoRecord<T>[]> {
    const agent = await this.agent(did)
    const out: RepoRecord<T>[] = []
    let cursor: string | undefined
    do {
      if (out.length >= MAX_LIST) break
      const page = await agent.com.atproto.repo.listRecords({ repo: did, collection, limit: 100, cursor })
      for (const r of page.data.records) out.push({ uri: r.uri, cid: r.cid, value: r.value as T })
      cursor = page.data.records.length === 100 ? page.data.cursor : undefined
    } while (cursor)
    return out
  }
}
