/**
 * Prompt sealing, scheme `x25519`: NaCl `crypto_box` (X25519, HSalsa20,
 * XSalsa20-Poly1305), wire form `nonce(24) || box`, base64, byte-compatible
 * with the network's providers and SDKs (which use NaCl / tweetnacl; a test
 * checks interop both ways).
 *
 * The requester seals to the provider's `encryptionPubKey` from a fresh
 * ephemeral key per job and sends the ephemeral public key alongside; the
 * provider seals reply chunks back to that ephemeral key. One implementation
 * for the browser, the TypeScript client and the provider: Uint8Array only,
 * randomness from Web Crypto. X25519 (key generation and multiplication) runs
 * on Node's native crypto when there is one (far faster than the pure-JS
 * curve, which the browser uses), with its key objects kept for keys used
 * again; base64 goes through Buffer there. Both give the same bytes.
 */
import { hsalsa, xsalsa20poly1305 } from '@noble/ciphers/salsa.js'
import { x25519 } from '@noble/curves/ed25519.js'

export const NONCE_BYTES = 24
const MAC_BYTES = 16

export interface X25519KeyPair {
  secretKey: Uint8Array
  publicKey: Uint8Array
}

export class SealError extends Error {
  override name = 'SealError'
}

const u32le = (bytes: Uint8Array): Uint32Array => {
  const out = new Uint32Array(bytes.length / 4)
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  for (let i = 0; i < out.length; i++) out[i] = view.getUint32(i * 4, true)
  return out
}
const bytesLe = (words: Uint32Array): Uint8Array => {
  const out = new Uint8Array(words.length * 4)
  const view = new DataView(out.buffer)
  for (let i = 0; i < words.length; i++) view.setUint32(i * 4, words[i]!, true)
  return out
}
const SIGMA = u32le(new TextEncoder().encode('expand 32-byte k'))

type NodeCrypto = typeof import('node:crypto')
type KeyObject = import('node:crypto').KeyObject
/** Node's crypto, looked up without an import so this module still loads in a browser. */
export const native = (globalThis as { process?: { getBuiltinModule?: (id: string) => unknown } }).process?.getBuiltinModule?.('node:crypto') as NodeCrypto | undefined
/** Node's Buffer, for base64 (several times faster than atob/btoa over strings); absent in a browser. */
const NodeBuffer = (globalThis as { Buffer?: typeof Buffer }).Buffer

/**
 * Strict, padded base64: a length that is a multiple of 4 and at most two `=` at the end. Not one
 * regex of 4-character groups: V8 runs out of stack on such a group repeated a million times
 * (a sealed prompt of a few MB), and the prompt then "did not open".
 */
const B64_CHARS = /^[A-Za-z0-9+/]*={0,2}$/
const isStrictB64 = (s: string) => s.length % 4 === 0 && B64_CHARS.test(s)
export function toB64(b: Uint8Array): string {
  if (NodeBuffer) return NodeBuffer.from(b.buffer, b.byteOffset, b.byteLength).toString('base64')
  let s = ''
  for (const x of b) s += String.fromCharCode(x)
  return btoa(s)
}
/** Throws on what atob refuses; Buffer (lenient) only decodes strict, padded base64. */
export function fromB64(s: string): Uint8Array {
  if (NodeBuffer && isStrictB64(s)) {
    const b = NodeBuffer.from(s, 'base64')
    return new Uint8Array(b.buffer, b.byteOffset, b.byteLength)
  }
  return Uint8Array.from(atob(s), (c) => c.charCodeAt(0))
}
/** A fresh array (keys: never a view of Buffer's shared pool). */
const fromB64url = (s: string): Uint8Array => new Uint8Array(fromB64(s.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (s.length % 4)) % 4)))

const hex = (h: string) => Uint8Array.from(h.match(/../g)!, (b) => parseInt(b, 16))
/** DER wrapper of a raw X25519 secret key (RFC 8410 PKCS#8). */
const PKCS8_X25519 = hex('302e020100300506032b656e04220420')
const concat = (a: Uint8Array, b: Uint8Array) => {
  const out = new Uint8Array(a.length + b.length)
  out.set(a)
  out.set(b, a.length)
  return out
}

/**
 * Native secret keys, by the array that holds the raw key: importing one
 * costs as much as the X25519 multiplication itself, and a provider uses its
 * machine key for every job. Each entry carries a fingerprint (sha256, not the
 * key) checked on every use, so a key changed or wiped in place is not reused.
 */
const nativeSecrets = new WeakMap<Uint8Array, { fingerprint: string; key: KeyObject }>()
const fingerprintOf = (n: NodeCrypto, secret: Uint8Array) => n.createHash('sha256').update(secret).digest('base64')
function nativeSecret(n: NodeCrypto, secret: Uint8Array): KeyObject {
  const fingerprint = fingerprintOf(n, secret)
  const hit = nativeSecrets.get(secret)
  if (hit?.fingerprint === fingerprint) return hit.key
  const key = n.createPrivateKey({ key: concat(PKCS8_X25519, secret) as never, format: 'der', type: 'pkcs8' })
  nativeSecrets.set(secret, { fingerprint, key })
  return key
}

/** Native public keys by their base64url, a few kept: requesters seal to the same provider keys job after job. */
const nativePublics = new Map<string, KeyObject>()
const NATIVE_PUBLICS_KEPT = 64
function nativePublic(n: NodeCrypto, pub: Uint8Array): KeyObject {
  const id = NodeBuffer ? NodeBuffer.from(pub.buffer, pub.byteOffset, pub.byteLength).toString('base64url') : toB64(pub).replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_')
  let key = nativePublics.get(id)
  if (!key) {
    // JWK: half the cost of importing DER.
    key = n.createPublicKey({ key: { kty: 'OKP', crv: 'X25519', x: id }, format: 'jwk' })
    nativePublics.set(id, key)
    if (nativePublics.size > NATIVE_PUBLICS_KEPT) nativePublics.delete(nativePublics.keys().next().value!)
  }
  return key
}

function publicOf(secretKey: Uint8Array): Uint8Array {
  if (!native) return x25519.getPublicKey(secretKey)
  return fromB64url(native.createPublicKey(nativeSecret(native, secretKey)).export({ format: 'jwk' }).x!)
}

/** The X25519 shared point; a low-order public key (an all-zero point) is refused. */
function sharedPoint(mySecret: Uint8Array, theirPublic: Uint8Array): Uint8Array {
  if (!native) return x25519.getSharedSecret(mySecret, theirPublic)
  let shared: Uint8Array
  try {
    shared = new Uint8Array(native.diffieHellman({ privateKey: nativeSecret(native, mySecret), publicKey: nativePublic(native, theirPublic) }))
  } catch (err) {
    throw new SealError(`X25519 refused the key: ${(err as Error).message}`)
  }
  if (shared.every((b) => b === 0)) throw new SealError('low-order X25519 public key')
  return shared
}

export function generateX25519KeyPair(): X25519KeyPair {
  if (!native) {
    const secretKey = crypto.getRandomValues(new Uint8Array(32))
    return { secretKey, publicKey: x25519.getPublicKey(secretKey) }
  }
  // Generated natively: the key object comes with it, so sealing to a provider imports nothing.
  const { privateKey } = native.generateKeyPairSync('x25519')
  const jwk = privateKey.export({ format: 'jwk' })
  const secretKey = fromB64url(jwk.d!)
  nativeSecrets.set(secretKey, { fingerprint: fingerprintOf(native, secretKey), key: privateKey })
  return { secretKey, publicKey: fromB64url(jwk.x!) }
}

export const x25519PublicKey = (secretKey: Uint8Array): Uint8Array => publicOf(secretKey)

/** crypto_box_beforenm: HSalsa20 of the X25519 shared point, the key of the box. */
function boxKey(theirPublic: Uint8Array, mySecret: Uint8Array): Uint8Array {
  if (theirPublic.length !== 32) throw new SealError(`X25519 public key must be 32 bytes, got ${theirPublic.length}`)
  const shared = sharedPoint(mySecret, theirPublic)
  const out = new Uint32Array(8)
  hsalsa(SIGMA, u32le(shared), new Uint32Array(4), out)
  return bytesLe(out)
}

/**
 * Random nonces drawn from a pool filled by Web Crypto 4 KB at a time: one
 * call per reply chunk cost more than the cipher. Each byte is handed out
 * once, and the pool is zeroed as it is used.
 */
const NONCE_POOL_BYTES = 4096
const noncePool = new Uint8Array(NONCE_POOL_BYTES)
let noncePoolAt = NONCE_POOL_BYTES
/** `n` (at most 4096) random bytes for a nonce or an IV, from the pool. */
export function randomNonce(n = NONCE_BYTES): Uint8Array {
  if (noncePoolAt + n > NONCE_POOL_BYTES) {
    crypto.getRandomValues(noncePool)
    noncePoolAt = 0
  }
  const nonce = noncePool.slice(noncePoolAt, noncePoolAt + n)
  noncePool.fill(0, noncePoolAt, noncePoolAt + n)
  noncePoolAt += n
  return nonce
}

const sealWithKey = (key: Uint8Array, plaintext: Uint8Array): Uint8Array => {
  const nonce = randomNonce()
  const sealed = xsalsa20poly1305(key, nonce).encrypt(plaintext)
  const out = new Uint8Array(NONCE_BYTES + sealed.length)
  out.set(nonce)
  out.set(sealed, NONCE_BYTES)
  return out
}

const openWithKey = (key: Uint8Array, framed: Uint8Array): Uint8Array | null => {
  if (framed.length < NONCE_BYTES + MAC_BYTES) return null
  try {
    return xsalsa20poly1305(key, framed.subarray(0, NONCE_BYTES)).decrypt(framed.subarray(NONCE_BYTES))
  } catch {
    return null
  }
}

/** `nonce || box` of `plaintext` from `senderSecret` to `recipientPublic`. */
export function box(plaintext: Uint8Array, recipientPublic: Uint8Array, senderSecret: Uint8Array): Uint8Array {
  return sealWithKey(boxKey(recipientPublic, senderSecret), plaintext)
}

/** Opens `nonce || box` sent by `senderPublic` to us; null when it does not authenticate. */
export function openBox(framed: Uint8Array, senderPublic: Uint8Array, recipientSecret: Uint8Array): Uint8Array | null {
  if (framed.length < NONCE_BYTES + MAC_BYTES) return null
  return openWithKey(boxKey(senderPublic, recipientSecret), framed)
}

/** One job's channel, either end, in any scheme: seals and opens base64 messages under the job's one key. */
export interface SealChannel {
  seal(chunk: Uint8Array): string
  /** null when the message does not authenticate (or is not base64). */
  open(sealed: string): Uint8Array | null
  /** Zeroes the key. */
  wipe(): void
}

/** A SealChannel over one key: a scheme gives the framing of one message. */
export abstract class KeyedChannel implements SealChannel {
  protected readonly key: Uint8Array
  protected constructor(key: Uint8Array) {
    this.key = key
  }
  protected abstract sealBytes(chunk: Uint8Array): Uint8Array
  protected abstract openBytes(framed: Uint8Array): Uint8Array | null
  seal(chunk: Uint8Array): string {
    return toB64(this.sealBytes(chunk))
  }
  open(sealed: string): Uint8Array | null {
    let framed: Uint8Array
    try {
      framed = fromB64(sealed)
    } catch {
      return null
    }
    return this.openBytes(framed)
  }
  wipe(): void {
    this.key.fill(0)
  }
}

export interface SealedPrompt {
  /** base64 of the sealed prompt (`nonce || box` here). */
  sealed: string
  /** base64 of the ephemeral public key the provider seals its reply to. */
  ephemeralPublicKey: string
  /** Kept by the requester only, to open the reply; never sent. */
  ephemeralSecretKey: Uint8Array
  /** The requester's end of the reply channel (the same key): opens the reply without another key agreement. */
  reply: SealChannel
}


/** The requester's side: seal a prompt to a provider's published `encryptionPubKey` (base64) from a fresh ephemeral key. */
export function sealPrompt(plaintext: Uint8Array, providerEncryptionPubKey: string): SealedPrompt {
  const eph = generateX25519KeyPair()
  const reply = ReplyChannel.requester(providerEncryptionPubKey, eph.secretKey)
  return { sealed: reply.seal(plaintext), ephemeralPublicKey: toB64(eph.publicKey), ephemeralSecretKey: eph.secretKey, reply }
}

/** The provider's side: open a prompt, given the requester's ephemeral public key. */
export function openPrompt(sealed: string, ephemeralPublicKey: string, providerSecretKey: Uint8Array): Uint8Array | null {
  return openBox(fromB64(sealed), fromB64(ephemeralPublicKey), providerSecretKey)
}

/**
 * One job's reply channel: the box key (NaCl `crypto_box_beforenm`) of the
 * requester's ephemeral key and the provider's key, computed once, so each
 * chunk costs only XSalsa20-Poly1305, not an X25519 multiplication. Both
 * ends derive the same key; the wire form is the same `nonce || box`.
 */
export class ReplyChannel extends KeyedChannel {
  /** The provider's end: the requester's ephemeral public key (base64) and its own secret key. */
  static provider(ephemeralPublicKey: string, providerSecretKey: Uint8Array): ReplyChannel {
    return new ReplyChannel(boxKey(fromB64(ephemeralPublicKey), providerSecretKey))
  }
  /** The requester's end: the provider's published key (base64) and the ephemeral secret key. */
  static requester(providerEncryptionPubKey: string, ephemeralSecretKey: Uint8Array): ReplyChannel {
    return new ReplyChannel(boxKey(fromB64(providerEncryptionPubKey), ephemeralSecretKey))
  }
  protected sealBytes(chunk: Uint8Array): Uint8Array {
    return sealWithKey(this.key, chunk)
  }
  protected openBytes(framed: Uint8Array): Uint8Array | null {
    return openWithKey(this.key, framed)
  }
}

/** The provider's side: seal one reply chunk back to the requester's ephemeral key. */
export function sealReply(chunk: Uint8Array, ephemeralPublicKey: string, providerSecretKey: Uint8Array): string {
  return toB64(box(chunk, fromB64(ephemeralPublicKey), providerSecretKey))
}

/** The requester's side: open a reply chunk from the provider. */
export function openReply(sealed: string, providerEncryptionPubKey: string, ephemeralSecretKey: Uint8Array): Uint8Array | null {
  return openBox(fromB64(sealed), fromB64(providerEncryptionPubKey), ephemeralSecretKey)
}
