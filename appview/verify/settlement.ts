/**
 * Settlement verification: the amounts against the requester's payment
 * authorization and the provider's receipt, and the exchange's ES256 `sig`
 * against the settlement signing key the exchange publishes in its DID
 * document or in its own `exchangeAttestation` record (pinned by the
 * attestation's fingerprint when present).
 */
import { createHash, createPublicKey, type JsonWebKey, type KeyObject } from 'node:crypto'
import type { DidDocument } from '@atproto/identity'
import { canonicalJson } from '../../src/crypto/canonical-json.ts'
import { verifyDetached } from '../../src/crypto/signing.ts'
import type {
  ComputeExchangeAttestation,
  ComputePaymentAuthorization,
  ComputeReceipt,
  ComputeSettlement,
  DefsVerifyFinding,
} from '../../src/lexicon/generated/types.ts'
import { uriDid } from '../indexer/columns.ts'
import type { IndexedBody } from './receipt.ts'

export interface SettlementVerdict {
  ok: boolean
  findings: DefsVerifyFinding[]
}

/** The reference's key fingerprint: base64url(sha256(canonical JSON of the public JWK members)). */
export function jwkFingerprint(jwk: JsonWebKey): string {
  const members: Record<string, unknown> = { kty: jwk.kty, crv: jwk.crv, x: jwk.x, y: jwk.y }
  if (jwk.alg) members.alg = jwk.alg
  if (jwk.kid) members.kid = jwk.kid
  return createHash('sha256').update(canonicalJson(members)).digest('base64url')
}

/** P-256 keys a DID document publishes as JWK verification methods. */
export function p256KeysOf(doc: DidDocument): { id: string; jwk: JsonWebKey; key: KeyObject }[] {
  const out: { id: string; jwk: JsonWebKey; key: KeyObject }[] = []
  for (const vm of (doc.verificationMethod ?? []) as { id: string; publicKeyJwk?: JsonWebKey }[]) {
    const jwk = vm.publicKeyJwk
    if (jwk?.kty !== 'EC' || jwk.crv !== 'P-256') continue
    try {
      out.push({ id: vm.id, jwk, key: createPublicKey({ key: jwk, format: 'jwk' }) })
    } catch {
      // A malformed key is simply not a candidate.
    }
  }
  return out
}

export function verifySettlement(
  settlement: IndexedBody<ComputeSettlement>,
  receipt: IndexedBody<ComputeReceipt> | undefined,
  authorization: IndexedBody<ComputePaymentAuthorization> | undefined,
  exchangeAttestation: IndexedBody<ComputeExchangeAttestation> | undefined,
  exchangeDoc: DidDocument | null,
): SettlementVerdict {
  const findings: DefsVerifyFinding[] = []
  const fail = (code: string, message: string, severity: DefsVerifyFinding['severity'] = 'error') => findings.push({ severity, code, message })
  const s = settlement.body
  const { amountCharged: charged, providerPayout: payout, exchangeFee: fee } = s

  if (charged.currency !== payout.currency || charged.currency !== fee.currency) fail('currency-mismatch', 'settlement amounts are in different currencies')
  else if (charged.amount !== payout.amount + fee.amount) fail('split-mismatch', `amountCharged ${charged.amount} != providerPayout ${payout.amount} + exchangeFee ${fee.amount}`)

  if (!authorization) {
    fail('authorization-not-indexed', `authorization ${s.requesterAuthorization.uri} is not indexed`)
  } else {
    const a = authorization.body
    if (authorization.cid !== s.requesterAuthorization.cid) fail('authorization-cid-mismatch', 'the indexed authorization is not the version the settlement references')
    if (a.exchange !== settlement.did) fail('wrong-exchange', 'the authorization names another exchange than the settlement repo')
    if (a.ceiling.currency !== charged.currency) fail('currency-mismatch', "amountCharged currency differs from the authorization's ceiling")
    else if (charged.amount > a.ceiling.amount) fail('over-ceiling', `amountCharged ${charged.amount} exceeds the authorization ceiling ${a.ceiling.amount}`)
    // Expiry is judged at the time the work was done, not now: a late settlement of timely work is valid.
    if (receipt && Date.parse(receipt.body.completedAt) > Date.parse(a.expiresAt)) fail('authorization-expired', 'the receipt completed after the authorization expired')
  }

  if (!receipt) {
    fail('receipt-not-indexed', `receipt ${s.receipt.uri} is not indexed`)
  } else {
    const r = receipt.body
    if (receipt.cid !== s.receipt.cid) fail('receipt-cid-mismatch', 'the indexed receipt is not the version the settlement references')
    if (authorization && uriDid(authorization.uri) !== r.requester) fail('requester-mismatch', "the authorization is not on the receipt requester's repo")
    if (s.status === 'settled' && (r.price.amount !== charged.amount || r.price.currency !== charged.currency)) {
      fail('amount-vs-price', `amountCharged ${charged.amount} ${charged.currency} differs from the receipt price ${r.price.amount} ${r.price.currency}`)
    }
    if (r.proBono === true && (charged.amount !== 0 || payout.amount !== 0 || fee.amount !== 0)) fail('pro-bono-nonzero', 'a pro bono receipt must settle with all amounts 0')
  }

  // The signature.
  if (!s.sig) {
    fail('no-signature', 'settlement has no sig')
  } else {
    // Candidates: the P-256 keys of the exchange's DID document, and the key its own exchangeAttestation carries
    // (authenticated by the exchange's repo commit); the attested fingerprint pins which one signs.
    let candidates = exchangeDoc ? p256KeysOf(exchangeDoc) : []
    const attested = exchangeAttestation && uriDid(exchangeAttestation.uri) === settlement.did ? exchangeAttestation.body : undefined
    if (attested?.signingKeyJwk) {
      try {
        const jwk = { kty: attested.signingKeyJwk.kty, crv: attested.signingKeyJwk.crv, x: attested.signingKeyJwk.x, y: attested.signingKeyJwk.y }
        candidates.push({ id: exchangeAttestation!.uri, jwk, key: createPublicKey({ key: jwk, format: 'jwk' }) })
      } catch {
        fail('signing-key-malformed', 'the exchange attestation carries a malformed signing key', 'warning')
      }
    }
    const pinned = attested?.signingKeyFingerprint
    if (pinned) candidates = candidates.filter((c) => jwkFingerprint(c.jwk) === pinned)
    if (candidates.length === 0) {
      fail(
        'signing-key-unresolved',
        pinned ? 'no key in the exchange DID document or its attestation matches the attested fingerprint' : exchangeDoc ? 'the exchange publishes no P-256 signing key' : `the DID document of ${settlement.did} could not be resolved`,
      )
    } else if (!candidates.some((c) => verifyDetached(s as unknown as Record<string, unknown>, c.key))) fail('signature-invalid', "sig does not verify with the exchange's signing key")
  }

  return { ok: !findings.some((f) => f.severity === 'error'), findings }
}
