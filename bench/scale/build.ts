/**
 * The index of `npm run bench:scale`: a realistic network of `records`
 * records over a fixed population, written through the indexer's own store
 * (IndexStore.applyCommit, so every aggregate trigger runs as in production),
 * seeded, so a size always gives the same index.
 *
 * The population is the same at every size (default 20,000 accounts, 1,000 of
 * them providers, 8 models): a bigger index is the same network with more
 * history, which is what a read must not pay for. Per 1,000,000 records: one
 * payment authorization per account, two machines (provider records) and an
 * attestation per provider, 10,000 profiles, 50,000 friend records, and the
 * rest chats (a job, a signed receipt, a settlement on the exchange's repo),
 * ~300,000 of each. Each provider serves the models its machines offer (one
 * to three). Requesters, providers, models and friends' subjects are picked
 * with a Zipf skew (a few busy ones, a long tail); every record is
 * dated uniformly over the last `days` days (default 90), so each trailing
 * window holds its share.
 */
import { randomBytes } from 'node:crypto'
import { TID } from '@atproto/common-web'
import { IndexStore, type RecordWrite } from '../../appview/indexer/store.ts'
import { P256Signer, sha256Hex } from '../../src/crypto/p256.ts'
import type { Db } from '../../src/db/index.ts'
import { attestationRecord, providerRecord, receiptRecord, settlementRecord } from '../../src/dev/records.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import { validateRecord } from '../../src/lexicon/validate.ts'

export interface MixOpts {
  records: number
  accounts: number
  providers: number
  days: number
  seed: number
}

/** What the reads of the benchmark ask for: accounts, records and the like, picked from the index built. */
export interface Targets {
  builtAt: number
  records: number
  counts: Record<string, number>
  exchange: string
  /** Busiest first. */
  providers: string[]
  requesters: string[]
  /** The most friended accounts first. */
  subjects: string[]
  receipts: string[]
  settlements: string[]
}

const CID = 'bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm'
const B32 = 'abcdefghijklmnopqrstuvwxyz234567'
/** A valid did:plc, one per number. */
export const plc = (n: number) => `did:plc:${[...n.toString(32).padStart(24, '0')].map((d) => B32[parseInt(d, 32)]).join('')}`
const MODELS = ['llama-3.1-8b-instruct', 'qwen-2.5-7b-instruct', 'mistral-7b-instruct', 'gemma-2-9b-it', 'phi-3-mini', 'llama-3.1-70b-instruct', 'deepseek-r1-distill-8b', 'qwen-2.5-coder-7b']

/** mulberry32. */
function prng(seed: number) {
  let s = seed >>> 0
  return () => {
    s = (s + 0x6d2b79f5) >>> 0
    let t = s
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** Picks 0..n-1 with probability proportional to 1/(i+1)^s. */
function zipf(n: number, s: number, random: () => number): () => number {
  const cdf = new Float64Array(n)
  let sum = 0
  for (let i = 0; i < n; i++) cdf[i] = sum += 1 / (i + 1) ** s
  return () => {
    const x = random() * sum
    let lo = 0
    let hi = n - 1
    while (lo < hi) {
      const mid = (lo + hi) >> 1
      if (cdf[mid]! < x) lo = mid + 1
      else hi = mid
    }
    return lo
  }
}

/** How many records of each kind `records` holds. */
export function mixCounts(o: Pick<MixOpts, 'records' | 'accounts' | 'providers'>): Record<string, number> {
  const machines = Math.max(o.providers, Math.round(0.002 * o.records))
  const profiles = Math.min(o.accounts, Math.round(0.01 * o.records))
  const friends = Math.round(0.05 * o.records)
  const chats = Math.max(0, Math.floor((o.records - o.accounts - machines - o.providers - profiles - friends) / 3))
  return { authorizations: o.accounts, machines, attestations: o.providers, profiles, friends, jobs: chats, receipts: chats, settlements: chats }
}

/** Builds the index into `db` (empty); `log` hears progress. */
export function buildIndex(db: Db, o: MixOpts, log: (msg: string) => void): Targets {
  const store = new IndexStore(db)
  const random = prng(o.seed)
  const counts = mixCounts(o)
  const now = Date.now()
  const span = o.days * 86400_000
  const at = () => now - Math.floor(random() * span)
  const iso = (t: number) => new Date(t).toISOString()
  const signer = P256Signer.generate()
  const exchange = plc(1)
  const accounts = Array.from({ length: o.accounts }, (_, i) => plc(1000 + i))
  const providers = accounts.slice(0, o.providers)
  const pickAccount = zipf(o.accounts, 0.9, random)
  const pickProvider = zipf(o.providers, 0.9, random)
  const pickModel = zipf(MODELS.length, 1.1, random)
  const validated = new Set<string>()

  let written = 0
  const pending = new Map<string, RecordWrite[]>()
  let pendingCount = 0
  const flush = () => {
    store.tx(() => {
      for (const [did, ops] of pending) store.applyCommit(did, TID.nextStr(), ops)
    })
    pending.clear()
    pendingCount = 0
  }
  const t0 = performance.now()
  let lastLog = t0
  const put = (did: string, record: Record<string, unknown>, rkey = TID.nextStr()) => {
    const collection = record.$type as string
    // The first record of each kind is checked against its lexicon: the mix is made of valid records.
    if (!validated.has(collection)) {
      const v = validateRecord(collection, record)
      if (!v.success) throw new Error(`invalid ${collection}: ${v.message}`)
      validated.add(collection)
    }
    const uri = `at://${did}/${collection}/${rkey}`
    const list = pending.get(did) ?? pending.set(did, []).get(did)!
    list.push({ action: 'create', uri, did, collection, rkey, cid: CID, record })
    written++
    if (++pendingCount >= 2000) flush()
    if (performance.now() - lastLog > 10_000) {
      lastLog = performance.now()
      log(`${written} records (${Math.round(written / ((lastLog - t0) / 1000))}/s)`)
    }
    return { uri, cid: CID }
  }

  // Accounts: each authorizes payments once; some have a profile; friends, mostly of busy accounts.
  const auths = accounts.map((did) => put(did, { $type: ids.ComputePaymentAuthorization, exchange, ceiling: { amount: 1_000_000, currency: 'CC' }, scope: 'singleJob', nonce: randomBytes(16).toString('hex'), expiresAt: iso(now + 86400_000), createdAt: iso(at()) }))
  for (let i = 0; i < counts.profiles!; i++) {
    const did = accounts[(i * 7919) % o.accounts]!
    put(did, { $type: ids.AccountProfile, displayName: `Account ${i}`, ...(i % 3 === 0 ? { handle: `account-${i}.example.com` } : {}), createdAt: iso(at()) }, 'self')
  }
  const friendsOf = new Map<string, number>()
  for (let i = 0; i < counts.friends!; i++) {
    const subject = accounts[pickAccount()]!
    put(accounts[Math.floor(random() * o.accounts)]!, { $type: ids.AccountFriend, subject, createdAt: iso(at()) })
    friendsOf.set(subject, (friendsOf.get(subject) ?? 0) + 1)
  }
  // Providers: an attestation and their machines, each offering the provider's models (one to three).
  const attestations = providers.map((did) => put(did, attestationRecord(signer)))
  const offered = providers.map(() => [...new Set(Array.from({ length: 1 + Math.floor(random() * 3) }, () => MODELS[pickModel()]!))])
  for (let i = 0; i < counts.machines!; i++) {
    const p = i % o.providers
    put(providers[p]!, { ...providerRecord(signer, undefined, offered[p]![0]), supportedModels: offered[p], createdAt: iso(at()) })
  }
  flush()

  // Chats: a job, its receipt (signed, on the provider's repo), its settlement (on the exchange's).
  const receipts: string[] = []
  const settlements: string[] = []
  const jobsOf = new Map<string, number>()
  const servedBy = new Map<string, number>()
  for (let i = 0; i < counts.jobs!; i++) {
    const r = pickAccount()
    const requester = accounts[r]!
    const p = pickProvider()
    const provider = providers[p]!
    const model = offered[p]![Math.floor(random() * offered[p]!.length)]!
    const created = at()
    const job = put(requester, {
      $type: ids.ComputeJob,
      model,
      inputCommitment: sha256Hex(`input ${i}`),
      maxTokensOut: 512,
      priceCeiling: { amount: 1_000_000, currency: 'CC' },
      acceptedTrustLevel: 'self-attested',
      paymentAuthorization: auths[r]!,
      nonce: randomBytes(16).toString('hex'),
      expiresAt: iso(created + 3600_000),
      createdAt: iso(created),
    })
    // Latency: a log-normal around a second and a half.
    const ms = Math.round(1500 * Math.exp(0.6 * Math.sqrt(-2 * Math.log(1 - random())) * Math.cos(2 * Math.PI * random())))
    const receipt = put(
      provider,
      receiptRecord(signer, {
        job,
        requester,
        model,
        inputCommitment: sha256Hex(`input ${i}`),
        outputCommitment: sha256Hex(`reply ${i}`),
        tokens: { in: 20 + Math.floor(random() * 500), out: 50 + Math.floor(random() * 800) },
        startedAt: iso(created + 200),
        completedAt: iso(created + 200 + ms),
        attestation: attestations[p]!,
      }),
    )
    const settlement = put(exchange, settlementRecord({ receipt, authorization: auths[r]!, amount: 42, fee: 2, reference: `ledger ${i}`, settledAt: iso(created + 1000 + ms) }))
    if (receipts.length < 1000 && random() < 0.05) {
      receipts.push(receipt.uri)
      settlements.push(settlement.uri)
    }
    jobsOf.set(requester, (jobsOf.get(requester) ?? 0) + 1)
    servedBy.set(provider, (servedBy.get(provider) ?? 0) + 1)
  }
  flush()
  log(`${written} records in ${((performance.now() - t0) / 1000).toFixed(1)} s (${Math.round(written / ((performance.now() - t0) / 1000))}/s)`)
  const busiest = (m: Map<string, number>) => [...m.entries()].sort((a, b) => b[1] - a[1]).map(([did]) => did)
  return {
    builtAt: now,
    records: written,
    counts,
    exchange,
    providers: busiest(servedBy),
    requesters: busiest(jobsOf),
    subjects: busiest(friendsOf),
    receipts,
    settlements,
  }
}
