/**
 * The exchange's economy, as published in its `exchangePolicy` record and
 * enforced by the ledger and the settlement pipeline: fee (basis points, to
 * the treasury), token rate (the most a provider may charge per million
 * tokens), welcome grant, admission floor, weekly refresh, monthly patronage.
 *
 * At start the policy and an `exchangeAttestation` (naming the settlement
 * signing key's fingerprint, and carrying the public key) are published only
 * when they differ from the newest ones on the repo, so restarts add nothing.
 */
import { TID } from '@atproto/common-web'
import { canonicalJson, without } from '../../src/crypto/canonical-json.ts'
import { loadConfig, type Config } from '../../src/config.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import type { ExchangeRepo } from './repo.ts'
import type { SigningKey } from './signing-key.ts'

export const CURRENCY = 'CC'

export interface EconomyPolicy {
  feeBps: number
  /** Smallest fee of a non-zero, non-self-loop charge. */
  feeMinMinor: number
  /** Most a provider may charge, per million tokens. */
  tokenRate: { inputPerMTok: number; outputPerMTok: number }
  grant: number
  floor: number
  refresh: { amountPerDid: number; cadenceMinutes: number }
  patronage: { fractionBps: number; cadenceDays: number }
  /** Where fees go; the exchange's own DID when unset. */
  treasuryDid?: string
  termsUri?: string
  termsVersion?: string
}

/** The policy the configuration describes (src/config.ts: COCORE_FEE_BPS, COCORE_TOKEN_*...). */
export function policyFromConfig(c: Pick<Config, 'feeBps' | 'tokenGrant' | 'tokenFloor' | 'tokenRateIn' | 'tokenRateOut' | 'refreshAmount' | 'refreshMinutes' | 'patronageBps' | 'patronageDays' | 'treasuryDid'>): EconomyPolicy {
  return {
    feeBps: c.feeBps,
    feeMinMinor: 0,
    tokenRate: { inputPerMTok: c.tokenRateIn, outputPerMTok: c.tokenRateOut },
    grant: c.tokenGrant,
    floor: c.tokenFloor,
    refresh: { amountPerDid: c.refreshAmount, cadenceMinutes: c.refreshMinutes },
    patronage: { fractionBps: c.patronageBps, cadenceDays: c.patronageDays },
    ...(c.treasuryDid ? { treasuryDid: c.treasuryDid } : {}),
  }
}

export const DEFAULT_POLICY: EconomyPolicy = policyFromConfig(loadConfig({}))

export interface StrongRef {
  uri: string
  cid: string
}

export function policyRecord(p: EconomyPolicy, exchangeDid: string): Record<string, unknown> {
  return {
    exchange: exchangeDid,
    fee: { bps: p.feeBps, minMinor: p.feeMinMinor, currency: CURRENCY },
    tokenRate: { inputPricePerMTok: p.tokenRate.inputPerMTok, outputPricePerMTok: p.tokenRate.outputPerMTok, currency: CURRENCY },
    supportedCurrencies: [CURRENCY],
    selfLoop: { feeWaived: true },
    processor: 'ledger',
    tokenGrant: p.grant,
    tokenFloor: p.floor,
    treasuryDid: p.treasuryDid ?? exchangeDid,
    weeklyRefresh: { amountPerDid: p.refresh.amountPerDid, cadenceMinutes: p.refresh.cadenceMinutes },
    patronageDistribution: { fractionBps: p.patronage.fractionBps, cadenceDays: p.patronage.cadenceDays },
    active: true,
    ...(p.termsUri ? { termsUri: p.termsUri } : {}),
    ...(p.termsVersion ? { termsVersion: p.termsVersion } : {}),
  }
}

/** Equal apart from the creation time (and `$type`). */
const same = (a: Record<string, unknown>, b: Record<string, unknown>) => canonicalJson(without(a, 'createdAt', '$type')) === canonicalJson(without(b, 'createdAt', '$type'))

/** Publishes `record` unless the newest record of the collection already says the same; returns the one in force. */
async function ensure(repo: ExchangeRepo, collection: string, record: Record<string, unknown>): Promise<StrongRef & { published: boolean }> {
  const newest = await repo.newest<Record<string, unknown>>(collection)
  if (newest && same(newest.value, record)) return { uri: newest.uri, cid: newest.cid, published: false }
  const ref = await repo.put(collection, TID.nextStr(), { ...record, createdAt: new Date().toISOString() })
  return { ...ref, published: true }
}

export interface PublishedPolicy {
  policy: StrongRef & { published: boolean }
  attestation: StrongRef & { published: boolean }
}

export async function publishPolicy(repo: ExchangeRepo, p: EconomyPolicy, key: SigningKey, softwareVersion: string): Promise<PublishedPolicy> {
  const policy = await ensure(repo, ids.ComputeExchangePolicy, policyRecord(p, repo.did))
  const attestation = await ensure(repo, ids.ComputeExchangeAttestation, {
    exchange: repo.did,
    policy: { uri: policy.uri, cid: policy.cid },
    softwareVersion,
    signingKeyFingerprint: key.fingerprint,
    signingKeyJwk: key.publicJwk,
  })
  return { policy, attestation }
}

/** Fee of a charge: the policy's basis points (at least its minimum, at most the charge); none on a self-loop or a zero charge. */
export function feeOf(p: EconomyPolicy, amount: number, selfLoop: boolean): number {
  if (selfLoop || amount === 0) return 0
  return Math.min(amount, Math.max(p.feeMinMinor, Math.floor((amount * p.feeBps) / 10_000)))
}

/** The most a receipt may charge for its tokens under the policy's rate. */
export const maxPrice = (p: EconomyPolicy, tokens: { in: number; out: number }) => Math.ceil((tokens.in * p.tokenRate.inputPerMTok + tokens.out * p.tokenRate.outputPerMTok) / 1_000_000)
