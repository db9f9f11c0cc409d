/**
 * P-256 signatures in the cocore wire formats, verified with Node's native
 * crypto (OpenSSL), which accepts high-S signatures as the network requires.
 *  - receipts and attestations: ECDSA over SHA-256, DER, standard base64;
 *    public key raw 64-byte X||Y, standard base64.
 *  - settlements, disputes, terms acceptances: ES256 raw R||S, base64url.
 */
import { createHash, createPublicKey, createPrivateKey, sign, verify, type KeyObject, generateKeyPairSync } from 'node:crypto'
import { decodeBase64 } from '../lexicon/validate.ts'

export function sha256Hex(data: Uint8Array | string): string {
  return createHash('sha256').update(data).digest('hex')
}

/** Bytes from a base64 string or passthrough of Uint8Array (CBOR bytes). */
export function toBytes(v: unknown): Uint8Array | null {
  if (v instanceof Uint8Array) return v
  if (typeof v === 'string') return decodeBase64(v)
  return null
}

/** A public key object from raw X||Y (64 bytes) or uncompressed SEC1 (65 bytes). */
export function p256PublicKey(raw: Uint8Array): KeyObject {
  const xy = raw.length === 65 && raw[0] === 4 ? raw.subarray(1) : raw
  if (xy.length !== 64) throw new Error(`P-256 public key must be 64 bytes X||Y, got ${raw.length}`)
  return createPublicKey({
    key: { kty: 'EC', crv: 'P-256', x: Buffer.from(xy.subarray(0, 32)).toString('base64url'), y: Buffer.from(xy.subarray(32)).toString('base64url') },
    format: 'jwk',
  })
}

export function verifyDer(publicKey: KeyObject, message: Uint8Array, der: Uint8Array): boolean {
  try {
    return verify('sha256', message, publicKey, der)
  } catch {
    return false
  }
}

export function verifyRawRS(publicKey: KeyObject, message: Uint8Array, rs: Uint8Array): boolean {
  if (rs.length !== 64) return false
  try {
    return verify('sha256', message, { key: publicKey, dsaEncoding: 'ieee-p1363' }, rs)
  } catch {
    return false
  }
}

/** A P-256 signer, as a provider's attestation key or the exchange's settlement key. */
export class P256Signer {
  readonly privateKey: KeyObject
  readonly publicKey: KeyObject
  constructor(privateKey: KeyObject) {
    this.privateKey = privateKey
    this.publicKey = createPublicKey(privateKey)
  }
  static generate(): P256Signer {
    return new P256Signer(generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey)
  }
  static fromJwk(jwk: Record<string, string>): P256Signer {
    return new P256Signer(createPrivateKey({ key: jwk, format: 'jwk' }))
  }
  /** Raw 64-byte X||Y, the wire form of `publicKey`/`attestationPubKey`. */
  rawPublicKey(): Uint8Array {
    const jwk = this.publicKey.export({ format: 'jwk' })
    return new Uint8Array(Buffer.concat([Buffer.from(jwk.x!, 'base64url'), Buffer.from(jwk.y!, 'base64url')]))
  }
  signDer(message: Uint8Array): Uint8Array {
    return new Uint8Array(sign('sha256', message, this.privateKey))
  }
  signRawRS(message: Uint8Array): Uint8Array {
    return new Uint8Array(sign('sha256', message, { key: this.privateKey, dsaEncoding: 'ieee-p1363' }))
  }
}
