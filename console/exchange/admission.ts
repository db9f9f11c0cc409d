/**
 * What a requester must have before a job is sent, the same for every way
 * in (the OpenAI-compatible API and `dev.cocore.inference.dispatch`): a
 * console sign-in through which its job records are published on its own
 * PDS, checked here first; then, binding and in one transaction with the
 * job's hold, tokens left today and an available balance at the admission
 * floor and the job's ceiling (DispatchBook.admit).
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
  hasPdsSession: (did: string) => boolean
  /** The ledger, when settlements run here: the admission floor applies. */
  economy?: Economy | null
}

/** The checks that need no job yet (quota and funds again, early: nothing is prepared for an account that has none). @throws AdmissionError */
export function admit(deps: InferenceDeps, did: string): void {
  deps.exchange.book.checkQuota(did, 1)
  deps.economy?.refresh(did)
  deps.exchange.book.checkFunds(did, 0)
  if (!deps.hasPdsSession(did)) {
    throw new AdmissionError('pds_session_required', 'jobs are published on your PDS through your console sign-in: sign in to the console again, then retry')
  }
}
