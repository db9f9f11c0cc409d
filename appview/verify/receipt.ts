/**
 * Offline receipt verification: everything is checked against indexed,
 * signed records and, for a brokerage countersignature, the DID document of
 * its authority, which the caller resolves; nothing is fetched here. Each
 * failed check is one finding with a stable code (the reference's codes where
 * it has one).
 */
import type { DidDocument } from '@atproto/identity'
import { countersignatureVerifies } from '../../src/crypto/brokerage.ts'
import { canonicalBytes, without } from '../../src/crypto/canonical-json.ts'
import { p256PublicKey, toBytes } from '../../src/crypto/p256.ts'
import { verifyAttestationSignature, verifyReceiptSignature } from '../../src/crypto/signing.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import type { ComputeAttestation, ComputeJob, ComputeReceipt, DefsVerifyFinding } from '../../src/lexicon/generated/types.ts'
import { validateRecord } from '../../src/lexicon/validate.ts'
import { uriDid } from '../indexer/columns.ts'
import { p256KeysOf } from './settlement.ts'

export interface IndexedBody<T> {
  uri: string
  cid: string
  did: string
  body: T
}

export interface ReceiptVerdict {
  ok: boolean
  trustLevel: 'self-attested' | 'hardware-attested'
  /** A brokerage the verifier trusts countersigned the dispatch (the network's ADR 0004). */
  confidential: boolean
  /** That brokerage, when `confidential`. */
  brokerageAuthority?: string
  findings: DefsVerifyFinding[]
}

/** What the countersignature of a receipt is checked against. */
export interface BrokerageTrust {
  /** Brokerage DIDs whose countersignature makes a receipt confidential. */
  trusted: ReadonlySet<string>
  /** The DID document of the countersignature's authority; null when it could not be resolved. */
  authorityDoc: DidDocument | null
}

const HEX64 = /^[0-9a-f]{64}$/
const time = (v: unknown) => (typeof v === 'string' ? Date.parse(v) : NaN)

export function verifyReceipt(
  receipt: IndexedBody<ComputeReceipt>,
  job: IndexedBody<ComputeJob> | undefined,
  attestation: IndexedBody<ComputeAttestation> | undefined,
  brokerage?: BrokerageTrust,
): ReceiptVerdict {
  const findings: DefsVerifyFinding[] = []
  const fail = (code: string, message: string) => findings.push({ severity: 'error', code, message })
  const r = receipt.body

  const valid = validateRecord(ids.ComputeReceipt, r)
  if (!valid.success) fail('lexicon-invalid', valid.message)

  if (!HEX64.test(String(r.inputCommitment))) fail('input-commitment-shape', 'inputCommitment is not 64 lowercase hex characters')
  if (!HEX64.test(String(r.outputCommitment))) fail('output-commitment-shape', 'outputCommitment is not 64 lowercase hex characters')
  try {
    canonicalBytes(without(r as unknown as Record<string, unknown>, 'enclaveSignature', '$type', 'brokerageCountersignature'))
  } catch (err) {
    fail('canonical-fail', `receipt has no canonical form: ${(err as Error).message}`)
  }

  // The attestation: same repo as the receipt, the exact version referenced, self-signed, in force.
  if (!attestation) {
    fail('attestation-not-indexed', `attestation ${r.attestation?.uri} is not indexed`)
  } else {
    const a = attestation.body
    if (uriDid(attestation.uri) !== receipt.did) fail('attestation-owner-mismatch', 'the attestation lives in another repo than the receipt')
    if (attestation.cid !== r.attestation.cid) fail('attestation-cid-mismatch', 'the indexed attestation is not the version the receipt references')
    const raw = toBytes(a.publicKey)
    let key
    try {
      key = raw ? p256PublicKey(raw) : undefined
    } catch {
      key = undefined
    }
    if (!key) {
      fail('attestation-key-invalid', 'attestation publicKey is not a 64-byte P-256 key')
    } else {
      if (a.selfSignature === undefined || a.selfSignature === '') fail('attestation-unsigned', 'attestation has no selfSignature')
      else if (!verifyAttestationSignature(a as unknown as Record<string, unknown>, key)) fail('attestation-selfsig-invalid', 'attestation selfSignature does not verify with its publicKey')
      if (r.enclaveSignature === undefined || r.enclaveSignature === '') fail('no-signature', 'receipt has no enclaveSignature')
      else if (!verifyReceiptSignature(r as unknown as Record<string, unknown>, key)) fail('signature-invalid', "enclaveSignature does not verify with the attestation's publicKey")
    }
    const done = time(r.completedAt)
    if (!Number.isNaN(done) && (done < time(a.attestedAt) || done > time(a.expiresAt))) {
      fail('attestation-stale', 'completedAt is outside the attestation validity window')
    }
  }

  // The job: the exact version referenced, owned by the requester, and its terms honoured.
  if (!job) {
    fail('job-not-indexed', `job ${r.job?.uri} is not indexed`)
  } else {
    const j = job.body
    if (job.cid !== r.job.cid) fail('job-cid-mismatch', 'the indexed job is not the version the receipt references')
    if (job.did !== r.requester) fail('requester-mismatch', 'receipt requester is not the owner of the job record')
    if (r.inputCommitment !== j.inputCommitment) fail('commitment-mismatch', "receipt inputCommitment differs from the job's")
    if (r.model !== j.model) fail('model-mismatch', "receipt model differs from the job's")
    if (r.price?.currency !== j.priceCeiling?.currency) fail('currency-mismatch', "price currency differs from the job's ceiling currency")
    else if (r.price.amount > j.priceCeiling.amount) fail('price-over-ceiling', `price ${r.price.amount} exceeds the job's ceiling ${j.priceCeiling.amount}`)
    if (time(r.completedAt) > time(j.expiresAt)) fail('job-expired', 'completedAt is after the job expired')
  }

  if (r.proBono === true) {
    if (r.price?.amount !== 0) fail('pro-bono-nonzero-price', 'a pro bono receipt must have price 0')
    if (r.tokens?.in !== 0 || r.tokens?.out !== 0) fail('pro-bono-nonzero-tokens', 'a pro bono receipt must count 0 tokens in and out')
  }

  // Any brokerage's countersignature is checked against its own DID document; only a trusted one makes the receipt confidential.
  let confidential = false
  const cs = r.brokerageCountersignature
  if (cs !== undefined) {
    const authority = typeof cs.authority === 'string' ? cs.authority : ''
    if (!brokerage?.authorityDoc || brokerage.authorityDoc.id !== authority) fail('brokerage-countersignature-invalid', `the DID document of ${authority || 'the countersignature authority'} could not be resolved`)
    else if (!countersignatureVerifies(r, p256KeysOf(brokerage.authorityDoc).map((k) => k.key))) {
      fail('brokerage-countersignature-invalid', `the countersignature of ${authority} does not verify, with a P-256 key of its DID document, for this job, requester, machine and attestation`)
    } else if (brokerage.trusted.has(authority)) confidential = true
    else findings.push({ severity: 'info', code: 'brokerage-untrusted', message: `countersigned by ${authority}, a brokerage this verifier does not trust` })
  }

  // Hardware attestation chains (App Attest, MDA) are not verified here, so no receipt is promoted above self-attested.
  const ok = !findings.some((f) => f.severity === 'error')
  return { ok, trustLevel: 'self-attested', confidential: ok && confidential, ...(ok && confidential ? { brokerageAuthority: cs!.authority } : {}), findings }
}
