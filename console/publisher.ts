/**
 * The one module that holds users' OAuth sessions and writes to their PDSes;
 * nothing else in the system talks to a PDS on a user's behalf. Every record
 * is validated against our lexicons before it is written, and refused with
 * the offending field named.
 */
import { Agent } from '@atproto/api'
import { TID } from '@atproto/common-web'
import { cidForLex, type LexValue } from '@atproto/lex-cbor'
import { randomBytes } from 'node:crypto'
import { OAuthSession, type NodeOAuthClient, type SessionGetter } from '@atproto/oauth-client-node'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { AccountFriend, AccountProfile, ComputeProvider } from '../src/lexicon/generated/types.ts'
import type { JobConstraints } from '../src/protocol/job-constraints.ts'
import { validateRecord } from '../src/lexicon/validate.ts'

/** The most records a console page lists from a PDS (friends, machines). */
const MAX_LIST = 2_000

export class PublishError extends Error {
  override name = 'PublishError'
}

export class InvalidRecordError extends PublishError {
  override name = 'InvalidRecordError'
}

/** The account signed in again (a new OAuth session and DPoP key) after this session was restored. */
export class StaleSessionError extends PublishError {
  override name = 'StaleSessionError'
}

/** Whether two DPoP keys are the same key: the same public parameters (EC x, y; RSA n, e). */
const sameKey = (a: { jwk?: unknown }, b: { jwk?: unknown }) => {
  const pub = (k: { jwk?: unknown }) => {
    const j = (k.jwk ?? {}) as Record<string, unknown>
    return JSON.stringify([j.kty, j.crv, j.x, j.y, j.n, j.e])
  }
  return pub(a) === pub(b)
}

/**
 * An account's OAuth session that stays valid across the account's sign-ins.
 * The OAuth client's session reads the account's tokens from the store on
 * each request but signs with the DPoP key of the sign-in it was restored
 * from. After a new sign-in (a new key and tokens in the store) an older
 * session still held (a job in flight, a cached agent) would present the new
 * token with the old key: refused by the PDS (invalid DPoP key binding), then
 * refused again after a refresh, upon which the client deletes the stored
 * session, the new one, and the account can publish nothing until it signs in
 * again. Here each token read checks, in the same read, that the stored key
 * is this session's: if not, nothing is sent, and the request is made with
 * the account's current session instead. A request that read its tokens
 * before the sign-in and was refused after it is made again the same way.
 */
function keyCheckedSession(oauth: NodeOAuthClient, did: string, first: OAuthSession): { did: string; fetchHandler(url: string, init: RequestInit): Promise<Response> } {
  // The client's own session getter (a protected member: its store reads, refreshes and lock).
  const getter = (oauth as unknown as { sessionGetter: SessionGetter }).sessionGetter
  const checked = (session: OAuthSession): OAuthSession => {
    const key = session.server.dpopKey
    const check = {
      getSession: async (sub: Parameters<SessionGetter['getSession']>[0], refresh?: boolean | 'auto') => {
        const stored = await getter.getSession(sub, refresh)
        if (!sameKey(stored.dpopKey, key)) throw new StaleSessionError(`the OAuth session of ${did} was replaced by a new sign-in`)
        return stored
      },
      delStored: (sub: Parameters<SessionGetter['delStored']>[0], cause?: unknown) => getter.delStored(sub, cause),
    }
    return new OAuthSession(session.server, session.sub, check as unknown as SessionGetter)
  }
  let current = Promise.resolve(checked(first))
  /** Restores the account's current session in place of `stale` (once, however many requests found it stale). */
  const renew = async (stale: OAuthSession) => {
    if ((await current) !== stale) return
    const next = oauth.restore(did).then(checked)
    current = next
    // No session to restore (yet): the next request tries again.
    next.catch(() => {
      if (current === next) current = Promise.resolve(stale)
    })
  }
  /** Whether a sign-in has replaced `session`'s key in the store. */
  const replaced = async (session: OAuthSession) => {
    try {
      return !sameKey((await getter.getSession(session.sub, false)).dpopKey, session.server.dpopKey)
    } catch {
      return false
    }
  }
  return {
    did,
    fetchHandler: async (url, init) => {
      for (let attempt = 0; ; attempt++) {
        const session = await current
        let res: Response
        try {
          res = await session.fetchHandler(url, init)
        } catch (err) {
          if (!(err instanceof StaleSessionError) || attempt > 0) throw err
          // Nothing was sent: the same request with the current session.
          await renew(session)
          continue
        }
        // Sent with the tokens of a session that a sign-in replaced meanwhile, and refused (the PDS wrote
        // nothing): the same request, once, with the current session.
        if (res.status === 401 && attempt === 0 && !(init.body instanceof ReadableStream) && (await replaced(session))) {
          await renew(session)
          continue
        }
        return res
      }
    },
  }
}

/** The fields of a provider record its owner decides; the provider agent owns all the others. */
export const OWNER_INTENT_FIELDS = ['desiredModels', 'active', 'proBono', 'shareLocation'] as const
export type OwnerIntent = Partial<Pick<ComputeProvider, (typeof OWNER_INTENT_FIELDS)[number]>>

/** A job as the requester's records describe it (the reference's format). */
export interface JobSpec {
  exchangeDid: string
  model: string
  inputCommitment: string
  inputFormat: 'messages-v1' | 'text'
  maxTokensOut: number
  /** Most the requester pays for this job, in minor units of `currency`. */
  ceiling: { amount: number; currency: string }
  acceptedTrustLevel: 'self-attested' | 'hardware-attested'
  /** How long the authorization and the job stay valid. */
  ttlMs: number
  /** Public constraints the record carries (structured output, tools). */
  constraints?: JobConstraints
}

export interface JobRecords {
  auth: { uri: string; cid: string }
  job: { uri: string; cid: string }
  /** The records as they are published (the exchange keeps them: settlement never depends on the requester keeping them). */
  authRecord: Record<string, unknown>
  jobRecord: Record<string, unknown>
  /**
   * Writes both records on the requester's PDS (one commit), once however
   * often it is called; rejects if they could not be written. The exchange
   * calls it once a provider answers, so the write does not delay the job.
   */
  publish: () => Promise<void>
}

export interface RepoRecord<T> {
  uri: string
  cid: string
  value: T
}

/** Agents kept per account: building one costs milliseconds (every API schema), too much per job. */
const AGENT_CACHE_SIZE = 1_000
const AGENT_TTL_MS = 10 * 60_000

export class Publisher {
  private readonly oauth: NodeOAuthClient
  private readonly agents = new Map<string, { agent: Promise<Agent>; at: number }>()

  constructor(oauth: NodeOAuthClient) {
    this.oauth = oauth
  }

  /**
   * An agent acting as `did`, from its stored OAuth session. Kept for a few
   * minutes: the session behind it reads its tokens from the store on every
   * request (refreshing them under the client's lock). Its DPoP key is the
   * one of the sign-in it was made from, so a new sign-in or a revocation
   * drops it (`forget`).
   */
  async agent(did: string): Promise<Agent> {
    const hit = this.agents.get(did)
    if (hit && Date.now() - hit.at < AGENT_TTL_MS) return hit.agent
    const agent = this.oauth.restore(did).then((session) => new Agent(keyCheckedSession(this.oauth, did, session)))
    this.agents.delete(did)
    this.agents.set(did, { agent, at: Date.now() })
    if (this.agents.size > AGENT_CACHE_SIZE) this.agents.delete(this.agents.keys().next().value!)
    // A failed restore is not remembered.
    agent.catch(() => this.agents.get(did)?.agent === agent && this.agents.delete(did))
    return agent
  }

  /** Drops the account's agent (its OAuth session was replaced or revoked). */
  forget(did: string): void {
    this.agents.delete(did)
  }

  private check(collection: string, record: Record<string, unknown>): void {
    const v = validateRecord(collection, { ...record, $type: collection })
    if (!v.success) throw new InvalidRecordError(v.message.replace(/^Record\//, ''))
  }

  /**
   * The requester's `paymentAuthorization` and `job` for one job. Their rkeys
   * and CIDs are computed here, so the job can be sent to a provider (whose
   * receipt names it by URI and CID) before the one `applyWrites` commit that
   * publishes both is made.
   */
  async prepareJob(did: string, spec: JobSpec): Promise<JobRecords> {
    const now = new Date()
    const createdAt = now.toISOString()
    const expiresAt = new Date(now.getTime() + spec.ttlMs).toISOString()
    const authorization = {
      $type: ids.ComputePaymentAuthorization,
      exchange: spec.exchangeDid,
      ceiling: spec.ceiling,
      scope: 'singleJob',
      nonce: randomBytes(16).toString('hex'),
      expiresAt,
      createdAt,
    }
    const authRkey = TID.nextStr()
    const auth = { uri: `at://${did}/${ids.ComputePaymentAuthorization}/${authRkey}`, cid: (await cidForLex(authorization as LexValue)).toString() }
    const jobRecord = {
      $type: ids.ComputeJob,
      model: spec.model,
      inputCommitment: spec.inputCommitment,
      inputFormat: spec.inputFormat,
      maxTokensOut: spec.maxTokensOut,
      priceCeiling: spec.ceiling,
      acceptedTrustLevel: spec.acceptedTrustLevel,
      acceptedExchanges: [spec.exchangeDid],
      paymentAuthorization: auth,
      nonce: randomBytes(16).toString('hex'),
      expiresAt,
      createdAt,
      ...spec.constraints,
    }
    const jobRkey = TID.nextStr()
    const job = { uri: `at://${did}/${ids.ComputeJob}/${jobRkey}`, cid: (await cidForLex(jobRecord as LexValue)).toString() }
    this.check(ids.ComputePaymentAuthorization, authorization)
    this.check(ids.ComputeJob, jobRecord)
    let written: Promise<void> | null = null
    const write = async () => {
      const agent = await this.agent(did)
      const res = await agent.com.atproto.repo.applyWrites({
        repo: did,
        writes: [
          { $type: 'com.atproto.repo.applyWrites#create', collection: ids.ComputePaymentAuthorization, rkey: authRkey, value: authorization },
          { $type: 'com.atproto.repo.applyWrites#create', collection: ids.ComputeJob, rkey: jobRkey, value: jobRecord },
        ],
      })
      const cids = (res.data.results ?? []).map((r) => (r as { cid?: string }).cid)
      if (cids[0] !== auth.cid || cids[1] !== job.cid) throw new PublishError(`the PDS stored the job records under other CIDs than computed (${cids.join(', ')})`)
    }
    const publish = () => {
      if (!written) {
        written = write()
        // The caller awaits it when it needs to; an unobserved failure must not crash the process.
        written.catch(() => undefined)
      }
      return written
    }
    return { auth, job, authRecord: authorization, jobRecord, publish }
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
