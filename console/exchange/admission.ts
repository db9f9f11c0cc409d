/**
 * What a requester must have before a job is sent, the same for every way
 * in (the OpenAI-compatible API and `dev.cocore.inference.dispatch`): tokens
 * left today, a balance at the exchange's admission floor (when the ledger
 * runs here), and a console sign-in through which its job records are
 * published on its own PDS.
 */
import type { UsageCounters } from '../api-keys.ts'
import type { Economy } from './economy.ts'
import type { Exchange } from './exchange.ts'

export type AdmissionCode = 'insufficient_quota' | 'pds_session_required'

export class AdmissionError extends Error {
  override name = 'AdmissionError'
  readonly code: AdmissionCode
  constructor(code: AdmissionCode, message: string) {
    super(message)
    this.code = code
  }
}

export interface InferenceDeps {
  exchange: Exchange
  usage: UsageCounters
  /** Tokens (in + out) one account may use per UTC day. */
  dailyTokenLimit: number
  hasPdsSession: (did: string) => boolean
  /** The ledger, when settlements run here: the admission floor applies. */
  economy?: Economy | null
}

/** @throws AdmissionError */
export function admit(deps: InferenceDeps, did: string): void {
  const used = deps.usage.today(did)
  if (used.tokensIn + used.tokensOut >= deps.dailyTokenLimit) {
    throw new AdmissionError('insufficient_quota', `this account used its ${deps.dailyTokenLimit} tokens for today (UTC)`)
  }
  if (deps.economy) {
    const { ok, balance } = deps.economy.admissible(did)
    if (!ok) throw new AdmissionError('insufficient_quota', `your balance (${balance} tokens) is under this exchange's admission floor of ${deps.economy.policy.floor}`)
  }
  if (!deps.hasPdsSession(did)) {
    throw new AdmissionError('pds_session_required', 'jobs are published on your PDS through your console sign-in: sign in to the console again, then retry')
  }
}
