/**
 * The cocore signature envelopes, in one place for the provider agent (signs),
 * the AppView (verifies) and the exchange (both).
 *  - receipt `enclaveSignature`: DER P-256 over canonical JSON of the record
 *    without `enclaveSignature`, `$type` and `brokerageCountersignature`.
 *  - attestation `selfSignature`: DER P-256 over canonical JSON without
 *    `selfSignature` and `$type`.
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

export function verifyAttestationSignature(attestation: Rec, key: KeyObject): boolean {
  const sig = toBytes(attestation.selfSignature)
  return !!sig && verifyDer(key, attestationSigningBytes(attestation), sig)
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
