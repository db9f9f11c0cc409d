/**
 * Brokerage countersignatures (the network's ADR 0004): the exchange that
 * dispatched a job, having live-challenged the machine it sent it to on that
 * connection, signs a witness of the dispatch; the provider copies it onto its
 * receipt as `brokerageCountersignature`, outside the `enclaveSignature`'s
 * bytes (signing.ts strips it). A verifier checks it against the key in the
 * authority's DID document and, when it trusts that authority, calls the
 * receipt confidential.
 *
 * The signed message is canonical JSON of exactly {authority, attestation,
 * jobCid, jobUri, machineId, nonce, requester}, where attestation, jobUri,
 * jobCid and requester are the receipt's own (the network's
 * `brokerageWitnessMessage`, packages/sdk/src/brokerage.ts): lifted onto
 * another job, requester, machine or attestation it no longer verifies. DER
 * P-256 over SHA-256, standard base64, as every receipt signature.
 */
import { randomBytes, type KeyObject } from 'node:crypto'
import type { ComputeReceiptBrokerageCountersignature } from '../lexicon/generated/types.ts'
import { canonicalBytes } from './canonical-json.ts'
import { toBytes, verifyDer, type P256Signer } from './p256.ts'

export type BrokerageCountersignature = ComputeReceiptBrokerageCountersignature

/** As `inference_request.brokerage_countersignature` carries it (the wire's snake_case). */
export interface BrokerageCountersignatureWire {
  authority: string
  machine_id: string
  nonce: string
  sig: string
}

/** What a countersignature binds. */
export interface WitnessFields {
  authority: string
  /** The AT URI of the machine's attestation, as its receipt cites it. */
  attestation: string
  jobCid: string
  jobUri: string
  machineId: string
  nonce: string
  requester: string
}

export const brokerageWitnessMessage = (f: WitnessFields): Uint8Array =>
  canonicalBytes({ authority: f.authority, attestation: f.attestation, jobCid: f.jobCid, jobUri: f.jobUri, machineId: f.machineId, nonce: f.nonce, requester: f.requester })

/** Signs the witness of one dispatch under a fresh nonce (16 random bytes, lowercase hex, as the network's). */
export function signWitness(signer: P256Signer, f: Omit<WitnessFields, 'nonce'>): BrokerageCountersignature & { sig: string } {
  const nonce = randomBytes(16).toString('hex')
  const sig = Buffer.from(signer.signDer(brokerageWitnessMessage({ ...f, nonce }))).toString('base64')
  return { authority: f.authority, machineId: f.machineId, nonce, sig }
}

export const toWireCountersignature = (c: BrokerageCountersignature & { sig: string }): BrokerageCountersignatureWire => ({
  authority: c.authority,
  machine_id: c.machineId,
  nonce: c.nonce,
  sig: c.sig,
})

/** The wire block as a receipt carries it; null unless it has the four strings. */
export function fromWireCountersignature(v: unknown): (BrokerageCountersignature & { sig: string }) | null {
  if (!v || typeof v !== 'object') return null
  const { authority, machine_id, nonce, sig } = v as Record<string, unknown>
  if (typeof authority !== 'string' || typeof machine_id !== 'string' || typeof nonce !== 'string' || typeof sig !== 'string') return null
  return { authority, machineId: machine_id, nonce, sig }
}

type ReceiptLike = {
  requester?: unknown
  job?: { uri?: unknown; cid?: unknown }
  attestation?: { uri?: unknown }
  brokerageCountersignature?: Partial<BrokerageCountersignature>
}

/**
 * Whether the receipt's countersignature verifies with one of `keys` (the
 * authority's). False when a bound field is missing, whatever the keys.
 */
export function countersignatureVerifies(receipt: ReceiptLike, keys: readonly KeyObject[]): boolean {
  const c = receipt.brokerageCountersignature
  const f = {
    authority: c?.authority,
    attestation: receipt.attestation?.uri,
    jobCid: receipt.job?.cid,
    jobUri: receipt.job?.uri,
    machineId: c?.machineId,
    nonce: c?.nonce,
    requester: receipt.requester,
  }
  if (!Object.values(f).every((v) => typeof v === 'string' && v !== '')) return false
  const sig = toBytes(c?.sig)
  if (!sig) return false
  const message = brokerageWitnessMessage(f as WitnessFields)
  return keys.some((k) => verifyDer(k, message, sig))
}

/**
 * A brokerage's DID document: its P-256 key as a `JsonWebKey2020`
 * verification method (what the network's verifiers read, the first EC P-256
 * `publicKeyJwk`), also named in `assertionMethod`.
 */
export function brokerageDidDocument(did: string, publicJwk: { kty: string; crv: string; x: string; y: string }) {
  const id = `${did}#brokerage`
  return {
    '@context': ['https://www.w3.org/ns/did/v1', 'https://w3id.org/security/suites/jws-2020/v1'],
    id: did,
    verificationMethod: [{ id, type: 'JsonWebKey2020', controller: did, publicKeyJwk: { kty: publicJwk.kty, crv: publicJwk.crv, x: publicJwk.x, y: publicJwk.y } }],
    assertionMethod: [id],
  }
}
