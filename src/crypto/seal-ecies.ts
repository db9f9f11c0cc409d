/**
 * Prompt sealing, scheme `p256-ecies-se`: what the network's providers whose
 * key lives in a Secure Enclave announce (`encScheme` on their attestation,
 * ADR 0005 of the reference), byte-compatible with its Rust provider
 * (`crypto::ecies`), TypeScript SDK (`ecies.ts`) and Python SDK (`ecies.py`):
 *
 *   Z    = x-coordinate of the P-256 ECDH point (32 bytes, big-endian)
 *   key  = HKDF-SHA256(salt = 32 zero bytes, IKM = Z, info = "cocore/p256-ecies-se/v1", 32 bytes)
 *   blob = iv(12, random per message) || AES-256-GCM(key, iv, no AAD, plaintext) || tag(16)
 *
 * Public keys are the raw 64-byte point X || Y (no 0x04 tag), base64. The
 * requester seals from a fresh ephemeral P-256 key and sends its public key
 * where the x25519 scheme sends its ephemeral key (`requester_pub_key`). The
 * reply channel is as in x25519: the provider seals reply chunks with the
 * same key (its secret with the ephemeral public key gives the same Z), a
 * fresh IV each; the requester opens them with the ephemeral secret and the
 * provider's published key. The wire carries no scheme tag: the provider's
 * announced key decides.
 *
 * Two backends give the same bytes: Node's native crypto (OpenSSL: the ECDH
 * about 15 times and AES-GCM 3 times faster) where there is one, and the
 * @noble libraries in the browser.
 */
import { gcm } from '@noble/ciphers/aes.js'
import { p256 } from '@noble/curves/nist.js'
import { hkdf } from '@noble/hashes/hkdf.js'
import { sha256 } from '@noble/hashes/sha2.js'
import { fromB64, KeyedChannel, native, randomNonce, SealError } from './seal.ts'

export const ECIES_SCHEME = 'p256-ecies-se'
export const IV_BYTES = 12
export const TAG_BYTES = 16
/** Raw X || Y. */
export const P256_PUBLIC_BYTES = 64
const INFO = new TextEncoder().encode('cocore/p256-ecies-se/v1')
const SALT = new Uint8Array(32)

export interface P256KeyPair {
  /** The 32-byte scalar. */
  secretKey: Uint8Array
  /** Raw X || Y, 64 bytes. */
  publicKey: Uint8Array
}

/** One implementation of the curve and cipher steps. */
export interface EciesBackend {
  generate(): P256KeyPair
  publicOf(secretKey: Uint8Array): Uint8Array
  /** Z; throws SealError on a point not on the curve (or a bad secret). */
  sharedX(mySecret: Uint8Array, theirPublic: Uint8Array): Uint8Array
  encrypt(key: Uint8Array, iv: Uint8Array, plaintext: Uint8Array): Uint8Array
  /** null when it does not authenticate. */
  decrypt(key: Uint8Array, iv: Uint8Array, sealed: Uint8Array): Uint8Array | null
}

const uncompressed = (pub: Uint8Array): Uint8Array => {
  if (pub.length !== P256_PUBLIC_BYTES) throw new SealError(`P-256 public key must be ${P256_PUBLIC_BYTES} bytes (X || Y), got ${pub.length}`)
  const out = new Uint8Array(65)
  out[0] = 4
  out.set(pub, 1)
  return out
}

/** A Buffer's bytes as a fresh array, left-padded to `n` (OpenSSL drops a scalar's leading zeros). */
const fixed = (b: Uint8Array, n: number): Uint8Array => {
  const out = new Uint8Array(n)
  out.set(b, n - b.length)
  return out
}

export const nobleBackend: EciesBackend = {
  generate() {
    const secretKey = p256.utils.randomSecretKey()
    return { secretKey, publicKey: this.publicOf(secretKey) }
  },
  publicOf: (secretKey) => p256.getPublicKey(secretKey, false).subarray(1),
  sharedX(mySecret, theirPublic) {
    const point = uncompressed(theirPublic)
    try {
      // Compressed form: the tag byte, then X.
      return p256.getSharedSecret(mySecret, point, true).subarray(1)
    } catch (err) {
      throw new SealError(`P-256 refused the key: ${(err as Error).message}`)
    }
  },
  encrypt: (key, iv, plaintext) => gcm(key, iv).encrypt(plaintext),
  decrypt(key, iv, sealed) {
    try {
      return gcm(key, iv).decrypt(sealed)
    } catch {
      return null
    }
  },
}

type NodeCrypto = NonNullable<typeof native>

const nodeBackend = (n: NodeCrypto): EciesBackend => ({
  generate() {
    const ecdh = n.createECDH('prime256v1')
    ecdh.generateKeys()
    return { secretKey: fixed(ecdh.getPrivateKey(), 32), publicKey: fixed(ecdh.getPublicKey().subarray(1), P256_PUBLIC_BYTES) }
  },
  publicOf(secretKey) {
    const ecdh = n.createECDH('prime256v1')
    ecdh.setPrivateKey(secretKey)
    return fixed(ecdh.getPublicKey().subarray(1), P256_PUBLIC_BYTES)
  },
  sharedX(mySecret, theirPublic) {
    const point = uncompressed(theirPublic)
    try {
      const ecdh = n.createECDH('prime256v1')
      ecdh.setPrivateKey(mySecret)
      return fixed(ecdh.computeSecret(point), 32)
    } catch (err) {
      throw new SealError(`P-256 refused the key: ${(err as Error).message}`)
    }
  },
  encrypt(key, iv, plaintext) {
    const c = n.createCipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES })
    const head = c.update(plaintext)
    const tail = c.final()
    const out = new Uint8Array(head.length + tail.length + TAG_BYTES)
    out.set(head)
    out.set(tail, head.length)
    out.set(c.getAuthTag(), head.length + tail.length)
    return out
  },
  decrypt(key, iv, sealed) {
    if (sealed.length < TAG_BYTES) return null
    const d = n.createDecipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES })
    d.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES))
    const head = d.update(sealed.subarray(0, sealed.length - TAG_BYTES))
    try {
      const tail = d.final()
      const out = new Uint8Array(head.length + tail.length)
      out.set(head)
      out.set(tail, head.length)
      head.fill(0)
      return out
    } catch {
      // Plaintext that did not authenticate is never handed out.
      head.fill(0)
      return null
    }
  },
})

export const backend: EciesBackend = native ? nodeBackend(native) : nobleBackend

export const generateP256KeyPair = (): P256KeyPair => backend.generate()
export const p256EncryptionPublicKey = (secretKey: Uint8Array): Uint8Array => backend.publicOf(secretKey)

/** The AES-256-GCM key of a pair: HKDF over Z. */
export function eciesKey(mySecret: Uint8Array, theirPublic: Uint8Array, b: EciesBackend = backend): Uint8Array {
  const z = b.sharedX(mySecret, theirPublic)
  const key = hkdf(sha256, z, SALT, INFO, 32)
  z.fill(0)
  return key
}

/** `iv || ciphertext || tag`. */
export function eciesSealWithIv(key: Uint8Array, iv: Uint8Array, plaintext: Uint8Array, b: EciesBackend = backend): Uint8Array {
  if (iv.length !== IV_BYTES) throw new SealError(`the IV is ${IV_BYTES} bytes`)
  const body = b.encrypt(key, iv, plaintext)
  const out = new Uint8Array(IV_BYTES + body.length)
  out.set(iv)
  out.set(body, IV_BYTES)
  return out
}

/** Opens `iv || ciphertext || tag`; null when it does not authenticate. */
export function eciesOpen(key: Uint8Array, blob: Uint8Array, b: EciesBackend = backend): Uint8Array | null {
  if (blob.length < IV_BYTES + TAG_BYTES) return null
  return b.decrypt(key, blob.subarray(0, IV_BYTES), blob.subarray(IV_BYTES))
}

/** One job's channel in this scheme (see the module comment): one ECDH, then AES-GCM per message. */
export class EciesChannel extends KeyedChannel {
  /** The provider's end: the requester's ephemeral public key (base64) and its own secret key. */
  static provider(ephemeralPublicKey: string, providerSecretKey: Uint8Array): EciesChannel {
    return new EciesChannel(eciesKey(providerSecretKey, fromB64(ephemeralPublicKey)))
  }
  /** The requester's end: the provider's published key (base64) and the ephemeral secret key. */
  static requester(providerEncryptionPubKey: string, ephemeralSecretKey: Uint8Array): EciesChannel {
    return new EciesChannel(eciesKey(ephemeralSecretKey, fromB64(providerEncryptionPubKey)))
  }
  protected sealBytes(chunk: Uint8Array): Uint8Array {
    return eciesSealWithIv(this.key, randomNonce(IV_BYTES), chunk)
  }
  protected openBytes(blob: Uint8Array): Uint8Array | null {
    return eciesOpen(this.key, blob)
  }
}
