/**
 * The exchange's economy, running: its published policy, the ledger, the
 * outbox of records it publishes, the settlement pipeline, and the grants:
 *  - welcome grant on an account's first sign-in (never on a read);
 *  - refresh: `amountPerDid` once per cadence window, credited when the
 *    account is next active (use it to keep it), idempotent per window;
 *  - patronage: each completed window, `fractionBps` of the treasury shared
 *    pro rata among the accounts by the tokens they moved in settlements
 *    (as requester or provider), idempotent per window.
 * Every credit is a ledger transaction and a record (`account.tokenGrant`,
 * `account.tokenPatronage`) queued in the same SQLite transaction.
 */
import { TID } from '@atproto/common-web'
import type { ConsoleIndex } from '../../appview/index.ts'
import type { DispatchBook } from './dispatch-book.ts'
import type { Db } from '../../src/db/index.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import { consoleLogger as log } from '../../src/logger.ts'
import { ISSUANCE, Ledger } from './ledger.ts'
import { Outbox, type OutboxOpts } from './outbox.ts'
import { publishPolicy, type EconomyPolicy, type PublishedPolicy } from './policy.ts'
import { ExchangeRepo, type ExchangeRepoOpts } from './repo.ts'
import { Settler, type SettlerOpts } from './settlement.ts'
import { loadSigningKey, type SigningKey } from './signing-key.ts'

export interface EconomyOpts {
  db: Db
  index: Pick<ConsoleIndex, 'receiptsAfter' | 'receiptsForJob' | 'record'>
  /** The exchange's dispatch book (its ledger is this economy's): settlement is judged against it. */
  book: DispatchBook
  repo: ExchangeRepoOpts
  policy: EconomyPolicy
  /** COCORE_EXCHANGE_SIGNING_KEY, else this key file. */
  signingKey: { env?: string; file: string }
  softwareVersion: string
  /** How often the settlement pipeline looks for new receipts. */
  settleEveryMs?: number
  outbox?: OutboxOpts & { everyMs?: number }
  /** Brokerage countersignatures on receipts: this exchange's own brokerage and other brokerages' documents, see Settler. */
  brokerage?: SettlerOpts['brokerage']
  authorities?: SettlerOpts['authorities']
  /** Test hook, see Settler. */
  afterDecide?: (receiptUri: string) => void
}

const windowStart = (now: number, lengthMs: number) => Math.floor(now / lengthMs) * lengthMs

export class Economy {
  readonly ledger: Ledger
  readonly outbox: Outbox
  readonly repo: ExchangeRepo
  readonly policy: EconomyPolicy
  readonly key: SigningKey
  readonly refs: PublishedPolicy
  readonly settler: Settler
  /** What the settler was built with (a second pipeline on the same books is built the same way). */
  readonly settlerOpts: SettlerOpts
  private readonly db: Db
  private readonly book: DispatchBook
  private timer: NodeJS.Timeout | null = null
  private passing = false

  private constructor(opts: EconomyOpts, repo: ExchangeRepo, key: SigningKey, refs: PublishedPolicy) {
    this.db = opts.db
    this.book = opts.book
    this.policy = opts.policy
    this.repo = repo
    this.key = key
    this.refs = refs
    this.ledger = opts.book.ledger ?? new Ledger(opts.db)
    this.outbox = new Outbox(opts.db, repo, opts.outbox)
    this.settlerOpts = {
      db: opts.db,
      index: opts.index,
      book: opts.book,
      ledger: this.ledger,
      outbox: this.outbox,
      exchangeDid: repo.did,
      policy: opts.policy,
      refs: { policy: { uri: refs.policy.uri, cid: refs.policy.cid }, attestation: { uri: refs.attestation.uri, cid: refs.attestation.cid } },
      key,
      brokerage: opts.brokerage,
      authorities: opts.authorities,
      afterDecide: opts.afterDecide,
    }
    this.settler = new Settler(this.settlerOpts)
  }

  /** Signs in to the exchange's repo, publishes the policy and attestation if they changed, and starts the pipeline. */
  static async start(opts: EconomyOpts): Promise<Economy> {
    const repo = new ExchangeRepo(opts.repo)
    const key = loadSigningKey(opts.signingKey.env, opts.signingKey.file)
    // Settlements cite the policy in force, so they wait for it: an unreachable or failing PDS is
    // waited out (backing off), refused credentials are not.
    const refs = await untilReachable('publishing the exchange policy', async () => {
      await repo.session()
      return publishPolicy(repo, opts.policy, key, opts.softwareVersion)
    })
    log.info('exchange policy in force', { policy: refs.policy.uri, published: refs.policy.published, attestation: refs.attestation.uri })
    const economy = new Economy(opts, repo, key, refs)
    opts.book.onReady = (jobUri) => economy.settler.jobReady(jobUri)
    economy.outbox.start(opts.outbox?.everyMs)
    economy.timer = setInterval(() => economy.tick(), opts.settleEveryMs ?? 1_000)
    economy.timer.unref()
    return economy
  }

  get treasury(): string {
    return this.policy.treasuryDid ?? this.repo.did
  }

  /** One pass: settle new receipts, then distribute patronage if a window closed. */
  tick(now = Date.now()): void {
    if (this.passing) return
    this.passing = true
    try {
      this.settler.pass()
      this.patronage(now)
    } catch (err) {
      log.error('settlement pass failed', { err: err as Error })
    } finally {
      this.passing = false
    }
  }

  /** Credits `amount` from issuance to `did` and queues its `tokenGrant` record, once per `ref`. */
  private grant(kind: 'grant' | 'refresh', ref: string, did: string, amount: number): boolean {
    if (amount <= 0) return false
    const record = { $type: ids.AccountTokenGrant, exchange: this.repo.did, recipient: did, amount, policy: { uri: this.refs.policy.uri, cid: this.refs.policy.cid }, createdAt: new Date().toISOString() }
    const done = this.db.$client.transaction(() => {
      if (!this.ledger.post(kind, ref, [{ account: did, amount }, { account: ISSUANCE, amount: -amount }], { amount })) return false
      this.outbox.enqueue(ref, ids.AccountTokenGrant, TID.nextStr(), record)
      return true
    })()
    if (done) this.outbox.kick()
    return done
  }

  /** The welcome grant, on an account's first sign-in only. */
  welcome(did: string): boolean {
    return this.grant('grant', `grant:welcome:${did}`, did, this.policy.grant)
  }

  /** The refresh of the current window, if the account has not had it (accounts that never signed in get none). */
  refresh(did: string, now = Date.now()): boolean {
    if (!this.ledger.has(`grant:welcome:${did}`)) return false
    const start = windowStart(now, this.policy.refresh.cadenceMinutes * 60_000)
    // The window the account joined in is covered by its welcome grant.
    const welcomed = this.db.$client.prepare('SELECT created_at FROM ledger_txns WHERE ref = ?').pluck().get(`grant:welcome:${did}`) as string
    if (Date.parse(welcomed) >= start) return false
    return this.grant('refresh', `refresh:${did}:${new Date(start).toISOString()}`, did, this.policy.refresh.amountPerDid)
  }

  /** Whether the account may start a job now: its available tokens (balance less holds) at the admission floor or above, after any refresh due. */
  admissible(did: string): { ok: boolean; balance: number; held: number; available: number } {
    this.refresh(did)
    const balance = this.ledger.balance(did)
    const held = this.ledger.held(did)
    return { ok: balance - held >= this.policy.floor, balance, held, available: balance - held }
  }

  /** Distributes the patronage of the last completed window, once. */
  patronage(now = Date.now()): number {
    const length = this.policy.patronage.cadenceDays * 86_400_000
    const end = windowStart(now, length)
    const start = end - length
    const ref = `patronage:${new Date(start).toISOString()}`
    if (this.ledger.has(ref)) return 0
    const [from, to] = [new Date(start).toISOString(), new Date(end).toISOString()]
    // Patronage score: tokens moved through settlements in the window, as requester and as provider.
    const scores = this.db.$client
      .prepare(
        `SELECT did, SUM(amount) AS score FROM (
           SELECT requester_did AS did, amount FROM settlements WHERE outcome = 'settled' AND decided_at >= ? AND decided_at < ? AND requester_did != provider_did
           UNION ALL
           SELECT provider_did AS did, amount FROM settlements WHERE outcome = 'settled' AND decided_at >= ? AND decided_at < ? AND requester_did != provider_did
         ) WHERE did != ? GROUP BY did HAVING score > 0 ORDER BY did`,
      )
      .all(from, to, from, to, this.treasury) as { did: string; score: number }[]
    const total = scores.reduce((s, x) => s + x.score, 0)
    const treasuryBefore = this.ledger.balance(this.treasury)
    const pot = Math.floor((Math.max(0, treasuryBefore) * this.policy.patronage.fractionBps) / 10_000)
    const credits = scores.map((x) => ({ did: x.did, score: x.score, tokens: total > 0 ? Math.floor((pot * x.score) / total) : 0 })).filter((x) => x.tokens >= 1)
    const paid = credits.reduce((s, x) => s + x.tokens, 0)
    const policy = { uri: this.refs.policy.uri, cid: this.refs.policy.cid }
    const done = this.db.$client.transaction(() => {
      // Posted even when nothing is paid, so the window is closed once.
      if (!this.ledger.post('patronage', ref, [{ account: this.treasury, amount: -paid }, ...credits.map((x) => ({ account: x.did, amount: x.tokens }))], { start: from, end: to, pot, paid })) return false
      for (const x of credits) {
        this.outbox.enqueue(`${ref}:${x.did}`, ids.AccountTokenPatronage, TID.nextStr(), {
          $type: ids.AccountTokenPatronage,
          exchange: this.repo.did,
          recipient: x.did,
          period: { start: from, end: to },
          patronageScore: x.score,
          totalPatronage: total,
          tokensCredited: x.tokens,
          treasuryBefore: Math.max(0, treasuryBefore),
          policy,
          createdAt: new Date().toISOString(),
        })
      }
      return true
    })()
    if (done && credits.length) this.outbox.kick()
    return done ? paid : 0
  }

  /** The settlement decisions an account took part in (as requester or provider), for its export. */
  settlementsOf(did: string): Record<string, unknown>[] {
    return this.db.$client
      .prepare(
        'SELECT receipt_uri AS receipt, requester_did AS requester, provider_did AS provider, outcome, amount, fee, finding_code AS finding, decided_at AS decidedAt FROM settlements WHERE requester_did = ? OR provider_did = ? ORDER BY decided_at',
      )
      .all(did, did) as Record<string, unknown>[]
  }

  /** Public aggregates: no account's balance but the treasury's. */
  figures(): { treasury: string; balance: number; issued: number; held: number; settlements: number; refused: number; charged: number; fees: number; booksBalanced: boolean } {
    const c = this.db.$client
    const s = c.prepare("SELECT COUNT(*) AS n, COALESCE(SUM(amount), 0) AS charged, COALESCE(SUM(fee), 0) AS fees FROM settlements WHERE outcome = 'settled'").get() as { n: number; charged: number; fees: number }
    const refused = c.prepare("SELECT COUNT(*) FROM settlements WHERE outcome = 'refused'").pluck().get() as number
    return {
      treasury: this.treasury,
      balance: this.ledger.balance(this.treasury),
      issued: this.ledger.issued(),
      held: this.ledger.heldTotal(),
      settlements: s.n,
      refused,
      charged: s.charged,
      fees: s.fees,
      booksBalanced: this.ledger.total() === 0 && this.ledger.unbalanced().length === 0 && this.ledger.heldTotal() === this.book.holdsTotal(),
    }
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer)
    await this.outbox.stop()
  }
}

/** Runs `f` until it succeeds, backing off from 250 ms to 10 s, unless the PDS refused the request itself (4xx). */
async function untilReachable<T>(what: string, f: () => Promise<T>): Promise<T> {
  for (let delay = 250; ; delay = Math.min(delay * 2, 10_000)) {
    try {
      return await f()
    } catch (err) {
      const status = (err as { status?: unknown }).status
      if (typeof status === 'number' && status >= 400 && status < 500) throw err
      log.warn(`${what} failed; retrying`, { err: err as Error, inMs: delay })
      await new Promise((resolve) => setTimeout(resolve, delay))
    }
  }
}
