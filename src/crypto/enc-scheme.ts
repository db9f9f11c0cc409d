/**
 * Which scheme a provider's prompts are sealed with, and sealing by it, for
 * every place a prompt is sealed or opened (the TypeScript client and the
 * browser, the exchange's seal on receipt, the provider agent):
 *  - `x25519`: NaCl box to a 32-byte X25519 key (src/crypto/seal.ts);
 *  - `p256-ecies-se`: P-256 ECIES to a 64-byte P-256 key, what providers
 *    with a Secure Enclave key announce (src/crypto/seal-ecies.ts).
 *
 * An attestation names its key's scheme in `encScheme` (absent: x25519). A
 * provider record has no such field, on the network as here; the network's
 * agent puts the same key there, so its length decides: 32 bytes can only be
 * X25519 and 64 only a P-256 point. A scheme announced must fit its key,
 * and a scheme not known is refused: nothing is sealed by a guess.
 */
import { EciesChannel, ECIES_SCHEME, generateP256KeyPair, IV_BYTES, P256_PUBLIC_BYTES, TAG_BYTES } from './seal-ecies.ts'
import { fromB64, generateX25519KeyPair, NONCE_BYTES, ReplyChannel, SealError, toB64, type SealChannel, type SealedPrompt } from './seal.ts'

export const ENC_SCHEMES = ['x25519', ECIES_SCHEME] as const
export type EncScheme = (typeof ENC_SCHEMES)[number]

const KEY_BYTES: Record<EncScheme, number> = { x25519: 32, [ECIES_SCHEME]: P256_PUBLIC_BYTES }
/** What sealing adds to a message: nonce and Poly1305 tag, or IV and GCM tag. */
export const SEAL_OVERHEAD: Record<EncScheme, number> = { x25519: NONCE_BYTES + 16, [ECIES_SCHEME]: IV_BYTES + TAG_BYTES }

export const isEncScheme = (v: unknown): v is EncScheme => (ENC_SCHEMES as readonly unknown[]).includes(v)

/** A record that announces an encryption key: a provider record, an attestation. */
export interface EncKeyAnnouncement {
  encryptionPubKey?: unknown
  encScheme?: unknown
}

/** The scheme to seal to `a`'s key with; SealError when the key and its announced scheme do not make one. */
export function encSchemeOf(a: EncKeyAnnouncement): EncScheme {
  let bytes: number
  try {
    if (typeof a.encryptionPubKey !== 'string') throw new Error()
    bytes = fromB64(a.encryptionPubKey).length
  } catch {
    throw new SealError('encryptionPubKey is not base64')
  }
  if (a.encScheme === undefined) {
    const byLength = ENC_SCHEMES.find((s) => KEY_BYTES[s] === bytes)
    if (!byLength) throw new SealError(`a ${bytes}-byte encryptionPubKey is neither X25519 (32) nor P-256 (64)`)
    return byLength
  }
  if (!isEncScheme(a.encScheme)) throw new SealError(`unknown encScheme ${JSON.stringify(a.encScheme)}`)
  if (KEY_BYTES[a.encScheme] !== bytes) throw new SealError(`encScheme ${a.encScheme} takes a ${KEY_BYTES[a.encScheme]}-byte key; encryptionPubKey has ${bytes}`)
  return a.encScheme
}

/** The requester's side of one prompt to one provider key, before anything is sealed: a fresh ephemeral key and the channel. */
export interface RequesterSeal {
  scheme: EncScheme
  /** base64; sent as the `requester_pub_key` / envelope `ephemeralPubKey`. */
  ephemeralPublicKey: string
  /** Never sent; zero it with the channel when the job is over. */
  ephemeralSecretKey: Uint8Array
  reply: SealChannel
}

export function requesterSeal(a: EncKeyAnnouncement): RequesterSeal {
  const scheme = encSchemeOf(a)
  const key = a.encryptionPubKey as string
  const eph = scheme === 'x25519' ? generateX25519KeyPair() : generateP256KeyPair()
  const reply = scheme === 'x25519' ? ReplyChannel.requester(key, eph.secretKey) : EciesChannel.requester(key, eph.secretKey)
  return { scheme, ephemeralPublicKey: toB64(eph.publicKey), ephemeralSecretKey: eph.secretKey, reply }
}

/** Seals a prompt to `a`'s key by its scheme, from a fresh ephemeral key. */
export function sealPromptTo(plaintext: Uint8Array, a: EncKeyAnnouncement): SealedPrompt & { scheme: EncScheme } {
  const s = requesterSeal(a)
  return { ...s, sealed: s.reply.seal(plaintext) }
}

/** The provider's end of a job's channel: its own key's scheme and secret, and the requester's ephemeral public key (base64). */
export function providerChannel(scheme: EncScheme, ephemeralPublicKey: string, providerSecretKey: Uint8Array): SealChannel {
  return scheme === 'x25519' ? ReplyChannel.provider(ephemeralPublicKey, providerSecretKey) : EciesChannel.provider(ephemeralPublicKey, providerSecretKey)
}

/** Plaintext bytes of a sealed message (base64) in `scheme`, without decoding it. */
export function sealedPlaintextBytes(ciphertext: string, scheme: EncScheme): number {
  const padding = ciphertext.endsWith('==') ? 2 : ciphertext.endsWith('=') ? 1 : 0
  return Math.max(0, Math.floor((ciphertext.length * 3) / 4) - padding - SEAL_OVERHEAD[scheme])
}
