/**
 * The cocore signature envelopes, in one place for the provider agent (signs),
 * the AppView (verifies) and the exchange (both).
 *  - receipt `enclaveSignature`: DER P-256 over canonical JSON of the record
 *    without `enclaveSignature`, `$type` and `brokerageCountersignature`.
 *  - attestation `selfSignature`: DER P-256 over canonical JSON without
 *    `selfSignature` and `$type` (or, for attestations the network's agent
 *    published before its 2026-06 fix, over what that agent signed: see
 *    `legacyAttestationBody`).
 *  - settlement / dispute / terms `sig`: ES256 raw R||S base64url over
 *    canonical JSON without `sig` (the reference signs some of these with
 *    `$type` present and some without; a verifier tries both).
 */
import type { KeyObject } from 'node:crypto'
import { canonicalBytes, without } from './canonical-json.ts'
import { P256Signer, toBytes, verifyDer, verifyRawRS } from './p256.ts'

type Rec = Record<string, unknown>

export const receiptSigningBytes = (r: Rec) => canonicalBytes(without(r, 'enclaveSignature', '$type', 'brokerageCountersignature'))
export const attestationSigningBytes = (a: Rec) => canonicalBytes(without(a, 'selfSignature', '$type'))

export function signReceipt<T extends Rec>(receipt: T, signer: P256Signer): T & { enclaveSignature: string } {
  const sig = signer.signDer(receiptSigningBytes(receipt))
  return { ...receipt, enclaveSignature: Buffer.from(sig).toString('base64') }
}

export function signAttestation<T extends Rec>(attestation: T, signer: P256Signer): T & { selfSignature: string } {
  const sig = signer.signDer(attestationSigningBytes(attestation))
  return { ...attestation, selfSignature: Buffer.from(sig).toString('base64') }
}

export function verifyReceiptSignature(receipt: Rec, key: KeyObject): boolean {
  const sig = toBytes(receipt.enclaveSignature)
  return !!sig && verifyDer(key, receiptSigningBytes(receipt), sig)
}

/**
 * The body the network's provider agent signed, up to its 2026-06 fix, for an
 * attestation as its PDS stores it. That agent signed one body and stored
 * another (cocore provider/src/attestation.rs before commit 9220c60):
 *  - it signed `mdaCertChain: []` but left an empty chain out of the stored
 *    record, so an absent chain was signed as `[]` (a chain present was
 *    signed as stored);
 *  - it signed `attestedAt`/`expiresAt` at whole seconds but stored chrono's
 *    default form, which adds the fraction (`...:08.384834Z`), so the
 *    fraction is cut off again.
 * Those records cannot be re-signed (the key stays in the machine), so the
 * verifier rebuilds what was signed. This is the reference verifier's rule
 * exactly (packages/sdk/src/p256.ts `legacyAttestationBody`), both changes at
 * once and nothing else: a record that verifies only some other way is refused.
 * What it tolerates is harmless: only the key holder signs, and the only
 * freedom is a fraction of a second on the two times, or an empty chain left out.
 */
export function legacyAttestationBody(attestation: Rec): Rec {
  const out = without(attestation, 'selfSignature', '$type')
  if (!('mdaCertChain' in out)) out.mdaCertChain = []
  for (const k of ['attestedAt', 'expiresAt']) {
    const v = out[k]
    if (typeof v === 'string') out[k] = v.replace(/\.\d+(Z|[+-]\d\d:\d\d)$/, '$1')
  }
  return out
}

/** `selfSignature` over the record as stored, or else over the body the pre-fix agent signed (legacyAttestationBody). */
export function verifyAttestationSignature(attestation: Rec, key: KeyObject): boolean {
  const sig = toBytes(attestation.selfSignature)
  if (!sig) return false
  const stored = attestationSigningBytes(attestation)
  if (verifyDer(key, stored, sig)) return true
  const legacy = canonicalBytes(legacyAttestationBody(attestation))
  // The same bytes again would only repeat the first answer.
  return !Buffer.from(legacy).equals(stored) && verifyDer(key, legacy, sig)
}

export function signDetached<T extends Rec>(record: T, signer: P256Signer): T & { sig: string } {
  const sig = signer.signRawRS(canonicalBytes(without(record, 'sig', '$type')))
  return { ...record, sig: Buffer.from(sig).toString('base64url') }
}

export function verifyDetached(record: Rec, key: KeyObject): boolean {
  if (typeof record.sig !== 'string') return false
  const sig = new Uint8Array(Buffer.from(record.sig, 'base64url'))
  const bare = without(record, 'sig')
  return verifyRawRS(key, canonicalBytes(without(bare, '$type')), sig) || ('$type' in bare && verifyRawRS(key, canonicalBytes(bare), sig))
}
