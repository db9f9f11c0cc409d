/**
 * The exchange's own repo: policy, attestation, settlements, grants and
 * patronage records are written here, signed in with the exchange account's
 * (app) password. Writes use `putRecord` at an rkey chosen before the first
 * attempt, so a retry after a lost response rewrites the same record (same
 * CID) instead of adding a second one.
 */
import { AtpAgent } from '@atproto/api'
import { validateRecord } from '../../src/lexicon/validate.ts'

export class ExchangeRepoError extends Error {
  override name = 'ExchangeRepoError'
}

export interface ExchangeRepoOpts {
  pdsUrl: string
  identifier: string
  password: string
}

export class ExchangeRepo {
  private readonly opts: ExchangeRepoOpts
  private agent: AtpAgent | null = null
  private did$: string | null = null

  constructor(opts: ExchangeRepoOpts) {
    this.opts = opts
  }

  get did(): string {
    if (!this.did$) throw new ExchangeRepoError('the exchange repo is not signed in')
    return this.did$
  }

  /** Signs in (again, when the session is gone). */
  async session(): Promise<AtpAgent> {
    if (this.agent?.session) return this.agent
    const agent = new AtpAgent({ service: this.opts.pdsUrl })
    await agent.login({ identifier: this.opts.identifier, password: this.opts.password })
    this.agent = agent
    this.did$ = agent.session!.did
    return agent
  }

  async put(collection: string, rkey: string, record: Record<string, unknown>): Promise<{ uri: string; cid: string }> {
    const v = validateRecord(collection, { ...record, $type: collection })
    if (!v.success) throw new ExchangeRepoError(`refusing to publish an invalid ${collection}: ${v.message}`)
    const agent = await this.session()
    const res = await agent.com.atproto.repo.putRecord({ repo: this.did, collection, rkey, record: { ...record, $type: collection } })
    return { uri: res.data.uri, cid: res.data.cid }
  }

  /** The newest record of a collection (by rkey, a TID), or null. */
  async newest<T>(collection: string): Promise<{ uri: string; cid: string; value: T } | null> {
    const agent = await this.session()
    const res = await agent.com.atproto.repo.listRecords({ repo: this.did, collection, limit: 1 })
    const r = res.data.records[0]
    return r ? { uri: r.uri, cid: r.cid, value: r.value as T } : null
  }
}
