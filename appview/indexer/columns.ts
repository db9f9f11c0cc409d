import { ids } from '../../src/lexicon/generated/ids.ts'

/** The typed, indexed copies of the record fields that queries filter on. */
export interface RecordColumns {
  sortAt: string
  providerDid: string | null
  requesterDid: string | null
  exchangeDid: string | null
  subjectDid: string | null
  jobUri: string | null
  receiptUri: string | null
  attestationUri: string | null
  authorizationUri: string | null
  model: string | null
}

const s = (v: unknown): string | null => (typeof v === 'string' && v.length > 0 ? v : null)
const refUri = (v: unknown): string | null => s((v as { uri?: unknown } | undefined)?.uri)
/** The repo DID of an at:// URI. */
export const uriDid = (uri: string | null): string | null => (uri?.startsWith('at://') ? (uri.slice(5).split('/')[0] ?? null) : null)

/**
 * Normalizes a record timestamp so string order is time order across time
 * zones; an unparseable one sorts first ('').
 */
export function normalizeTime(v: unknown): string {
  if (typeof v !== 'string') return ''
  const t = Date.parse(v)
  return Number.isNaN(t) ? '' : new Date(t).toISOString()
}

export function columnsFor(collection: string, did: string, body: Record<string, unknown>): RecordColumns {
  const c: RecordColumns = {
    sortAt: normalizeTime(body.createdAt ?? body.completedAt ?? body.settledAt ?? body.acceptedAt ?? body.raisedAt),
    providerDid: null,
    requesterDid: null,
    exchangeDid: null,
    subjectDid: null,
    jobUri: null,
    receiptUri: null,
    attestationUri: null,
    authorizationUri: null,
    model: null,
  }
  switch (collection) {
    case ids.ComputeProvider:
    case ids.ComputeAttestation:
      c.providerDid = did
      break
    case ids.ComputeJob:
      c.requesterDid = did
      c.model = s(body.model)
      c.authorizationUri = refUri(body.paymentAuthorization)
      break
    case ids.ComputeReceipt:
      // Receipts carry no provider field: the provider is the repo.
      c.providerDid = did
      c.requesterDid = s(body.requester)
      c.jobUri = refUri(body.job)
      c.attestationUri = refUri(body.attestation)
      c.model = s(body.model)
      break
    case ids.ComputeSettlement:
      c.exchangeDid = did
      c.receiptUri = refUri(body.receipt)
      c.authorizationUri = refUri(body.requesterAuthorization)
      // The authorization lives on the requester's repo.
      c.requesterDid = uriDid(c.authorizationUri)
      break
    case ids.ComputePaymentAuthorization:
      c.requesterDid = did
      c.exchangeDid = s(body.exchange)
      break
    case ids.ComputeExchangePolicy:
    case ids.ComputeExchangeAttestation:
    case ids.ComputeTermsAcceptance:
    case ids.ComputeDispute:
      c.exchangeDid = s(body.exchange)
      break
    case ids.AccountFriend:
      c.subjectDid = s(body.subject)
      break
    case ids.AccountTokenGrant:
    case ids.AccountTokenPatronage:
      c.exchangeDid = s(body.exchange)
      c.subjectDid = s(body.recipient)
      break
  }
  return c
}
