/**
 * Sealing, scheme p256-ecies-se (src/crypto/seal-ecies.ts), and the choice
 * of scheme by a provider's announced key (src/crypto/enc-scheme.ts).
 *
 * The test vector is ours, derived from the network's construction (its Rust
 * `crypto::ecies`, TypeScript `ecies.ts` and Python `ecies.py` agree on it):
 *   k  = sha256("cocore-appview/ecies-vector/recipient")   the provider's key
 *   e  = sha256("cocore-appview/ecies-vector/ephemeral")   the requester's ephemeral key
 *   K, E = their public points, raw X || Y
 *   Z  = x(e·K) = x(k·E)
 *   key = HKDF-SHA256(salt = 32 zero bytes, IKM = Z, info = "cocore/p256-ecies-se/v1", 32)
 *   iv = a0 a1 ... ab
 *   blob = iv || AES-256-GCM(key, iv, no AAD, PLAINTEXT) || tag
 * The pinned values were computed with Node's crypto alone (ECDH, hkdfSync,
 * createCipheriv), and the test computes them that way again, beside both of
 * our backends (native and @noble, the browser's).
 */
import * as nodeCrypto from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { ENC_SCHEMES, encSchemeOf, providerChannel, requesterSeal, sealedPlaintextBytes, sealPromptTo } from '../src/crypto/enc-scheme.ts'
import { backend, EciesChannel, eciesKey, eciesOpen, eciesSealWithIv, generateP256KeyPair, IV_BYTES, nobleBackend, TAG_BYTES, type EciesBackend } from '../src/crypto/seal-ecies.ts'
import { generateX25519KeyPair, SealError } from '../src/crypto/seal.ts'

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex')
const unhex = (h: string) => new Uint8Array(Buffer.from(h, 'hex'))
const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64')
const text = (s: string) => new TextEncoder().encode(s)

const VECTOR = {
  k: '42b972026255a8b375c72ba7d45127513aae958a2a92098e6ad6db74fc872e9f',
  K: '521a0930e984ab351ded7e4522279dec0fe7043b7ee30bfa4d24824583308c43a0344c57176e7321a3ac1df61a6c5fbd579d717217c9e35920eb0cd66d04aa8a',
  e: 'cde4202ccc53b2c0149bbb93a445d55334814ae6e11227e039c17ff02f7ea8c1',
  E: '77b5ad33119c46dff5bb0acc63a16916cd28a7b38a413163ee24eb7b0f4a54ca941a0b921f187a7708601213977bba248a00f3aa9d45b9a457f949789260c558',
  Z: '2b833a56ac69180d92a6b61d9235ff93d968561ab3b5115c8c7596bf643b41bc',
  key: 'e3ca085efe8a2b8d0c4ebb3155471c62e875db990c3d17d794b0de7bf5890f37',
  iv: 'a0a1a2a3a4a5a6a7a8a9aaab',
  plaintext: '{"messages":[{"content":"Name three rivers in Europe.","role":"user"}],"v":1}',
  blob:
    'a0a1a2a3a4a5a6a7a8a9aaab7689bea8f98cd33a4ec318d972890ad5c4c92b83fe4a3a7dfb432e2a1538ecb85dbdedb36556e9a8fd66a7a0dea80979d3f6ca01d896c5dca82dc64d80933121bfb260efc0c5264636494c42b65b1457c8ee1187b92363b5ec826095a1',
}

const backends: [string, EciesBackend][] = [
  ['native', backend],
  ['noble', nobleBackend],
]

describe('the test vector', () => {
  it('is what Node crypto alone derives from the construction', () => {
    const sha = (s: string) => nodeCrypto.createHash('sha256').update(s).digest()
    expect(sha('cocore-appview/ecies-vector/recipient').toString('hex')).toBe(VECTOR.k)
    expect(sha('cocore-appview/ecies-vector/ephemeral').toString('hex')).toBe(VECTOR.e)
    const provider = nodeCrypto.createECDH('prime256v1')
    provider.setPrivateKey(unhex(VECTOR.k))
    const eph = nodeCrypto.createECDH('prime256v1')
    eph.setPrivateKey(unhex(VECTOR.e))
    expect(provider.getPublicKey().subarray(1).toString('hex')).toBe(VECTOR.K)
    expect(eph.getPublicKey().subarray(1).toString('hex')).toBe(VECTOR.E)
    const z = eph.computeSecret(provider.getPublicKey())
    expect(z.toString('hex')).toBe(VECTOR.Z)
    expect(provider.computeSecret(eph.getPublicKey()).toString('hex')).toBe(VECTOR.Z)
    const key = Buffer.from(nodeCrypto.hkdfSync('sha256', z, Buffer.alloc(32), 'cocore/p256-ecies-se/v1', 32))
    expect(key.toString('hex')).toBe(VECTOR.key)
    const c = nodeCrypto.createCipheriv('aes-256-gcm', key, unhex(VECTOR.iv))
    const blob = Buffer.concat([unhex(VECTOR.iv), c.update(VECTOR.plaintext), c.final(), c.getAuthTag()])
    expect(blob.toString('hex')).toBe(VECTOR.blob)
    expect(blob.length).toBe(IV_BYTES + VECTOR.plaintext.length + TAG_BYTES)
  })

  for (const [name, b] of backends) {
    it(`is reproduced by the ${name} backend, from either side`, () => {
      expect(hex(b.publicOf(unhex(VECTOR.k)))).toBe(VECTOR.K)
      expect(hex(b.publicOf(unhex(VECTOR.e)))).toBe(VECTOR.E)
      expect(hex(b.sharedX(unhex(VECTOR.e), unhex(VECTOR.K)))).toBe(VECTOR.Z)
      expect(hex(b.sharedX(unhex(VECTOR.k), unhex(VECTOR.E)))).toBe(VECTOR.Z)
      const requesterKey = eciesKey(unhex(VECTOR.e), unhex(VECTOR.K), b)
      expect(hex(requesterKey)).toBe(VECTOR.key)
      expect(hex(eciesSealWithIv(requesterKey, unhex(VECTOR.iv), text(VECTOR.plaintext), b))).toBe(VECTOR.blob)
      const providerKey = eciesKey(unhex(VECTOR.k), unhex(VECTOR.E), b)
      expect(new TextDecoder().decode(eciesOpen(providerKey, unhex(VECTOR.blob), b)!)).toBe(VECTOR.plaintext)
    })
  }

  it('opens through the channels, from the base64 wire forms', () => {
    const atProvider = EciesChannel.provider(b64(unhex(VECTOR.E)), unhex(VECTOR.k))
    expect(new TextDecoder().decode(atProvider.open(b64(unhex(VECTOR.blob)))!)).toBe(VECTOR.plaintext)
    const atRequester = EciesChannel.requester(b64(unhex(VECTOR.K)), unhex(VECTOR.e))
    expect(new TextDecoder().decode(atRequester.open(b64(unhex(VECTOR.blob)))!)).toBe(VECTOR.plaintext)
  })
})

describe('p256-ecies-se sealing', () => {
  it('interoperates between the backends both ways, for any size', () => {
    for (const size of [0, 1, 15, 16, 17, 1000, 70_000]) {
      const msg = nodeCrypto.randomBytes(size)
      const provider = nobleBackend.generate()
      const eph = backend.generate()
      const iv = nodeCrypto.randomBytes(IV_BYTES)
      const sealed = eciesSealWithIv(eciesKey(eph.secretKey, provider.publicKey, backend), iv, msg, backend)
      expect(sealed.length).toBe(IV_BYTES + size + TAG_BYTES)
      expect(eciesSealWithIv(eciesKey(eph.secretKey, provider.publicKey, nobleBackend), iv, msg, nobleBackend)).toEqual(sealed)
      expect(eciesOpen(eciesKey(provider.secretKey, eph.publicKey, nobleBackend), sealed, nobleBackend)).toEqual(new Uint8Array(msg))
      expect(eciesOpen(eciesKey(provider.secretKey, eph.publicKey, backend), sealed, backend)).toEqual(new Uint8Array(msg))
    }
  })

  it('runs the prompt and reply round trip with a fresh ephemeral key per prompt', () => {
    const provider = generateP256KeyPair()
    const announced = { encryptionPubKey: b64(provider.publicKey), encScheme: 'p256-ecies-se' }
    const a = sealPromptTo(text('what is 2+2?'), announced)
    const b = sealPromptTo(text('what is 2+2?'), announced)
    expect(a.scheme).toBe('p256-ecies-se')
    expect(Buffer.from(a.ephemeralPublicKey, 'base64')).toHaveLength(64)
    expect(a.ephemeralPublicKey).not.toBe(b.ephemeralPublicKey)
    expect(a.sealed).not.toBe(b.sealed)
    const atProvider = providerChannel('p256-ecies-se', a.ephemeralPublicKey, provider.secretKey)
    expect(new TextDecoder().decode(atProvider.open(a.sealed)!)).toBe('what is 2+2?')
    for (const chunk of ['4', '', ' and that is all']) {
      const sealed = atProvider.seal(text(chunk))
      expect(new TextDecoder().decode(a.reply.open(sealed)!)).toBe(chunk)
      // Another prompt's ephemeral key opens nothing of this one.
      expect(b.reply.open(sealed)).toBeNull()
    }
    // The requester may also seal to the provider on the same channel (one key both ways, as the network's providers use it).
    expect(new TextDecoder().decode(atProvider.open(a.reply.seal(text('more')))!)).toBe('more')
    // Fresh IVs: the same chunk twice gives two messages.
    expect(atProvider.seal(text('x'))).not.toBe(atProvider.seal(text('x')))
  })

  it('refuses tampered, truncated and foreign messages', () => {
    const provider = generateP256KeyPair()
    const p = sealPromptTo(text('secret prompt'), { encryptionPubKey: b64(provider.publicKey) })
    const atProvider = providerChannel('p256-ecies-se', p.ephemeralPublicKey, provider.secretKey)
    const blob = Buffer.from(p.sealed, 'base64')
    for (const at of [0, IV_BYTES - 1, IV_BYTES, blob.length - TAG_BYTES - 1, blob.length - 1]) {
      const bad = Buffer.from(blob)
      bad[at]! ^= 0x01
      expect(atProvider.open(bad.toString('base64'))).toBeNull()
    }
    expect(atProvider.open(blob.subarray(0, IV_BYTES + TAG_BYTES - 1).toString('base64'))).toBeNull()
    expect(atProvider.open(blob.subarray(0, blob.length - 1).toString('base64'))).toBeNull()
    expect(atProvider.open('not base64!')).toBeNull()
    // Opened with another provider's key, or with another ephemeral key named.
    expect(providerChannel('p256-ecies-se', p.ephemeralPublicKey, generateP256KeyPair().secretKey).open(p.sealed)).toBeNull()
    expect(providerChannel('p256-ecies-se', b64(generateP256KeyPair().publicKey), provider.secretKey).open(p.sealed)).toBeNull()
    // An empty message is IV and tag only, and opens.
    expect(atProvider.open(p.reply.seal(new Uint8Array()))).toEqual(new Uint8Array())
  })

  it('refuses keys that are not P-256 points', () => {
    const provider = generateP256KeyPair()
    const offCurve = Uint8Array.from(provider.publicKey)
    offCurve[63]! ^= 0x01
    for (const b of [backend, nobleBackend]) {
      expect(() => b.sharedX(provider.secretKey, offCurve)).toThrow(SealError)
      expect(() => b.sharedX(provider.secretKey, new Uint8Array(64))).toThrow(SealError)
      expect(() => b.sharedX(provider.secretKey, provider.publicKey.subarray(0, 32))).toThrow(SealError)
      // The 0x04-tagged form is not the wire form.
      expect(() => b.sharedX(provider.secretKey, new Uint8Array([4, ...provider.publicKey]))).toThrow(SealError)
    }
    expect(() => EciesChannel.provider(b64(offCurve), provider.secretKey)).toThrow(SealError)
  })

  it('wipes the channel key', () => {
    const provider = generateP256KeyPair()
    const p = sealPromptTo(text('hi'), { encryptionPubKey: b64(provider.publicKey) })
    const chunk = providerChannel('p256-ecies-se', p.ephemeralPublicKey, provider.secretKey).seal(text('reply'))
    p.reply.wipe()
    expect(p.reply.open(chunk)).toBeNull()
  })
})

describe('the scheme of an announced key', () => {
  const x = b64(generateX25519KeyPair().publicKey)
  const p = b64(generateP256KeyPair().publicKey)

  it('follows encScheme where it is announced, and the key where it is not (provider records)', () => {
    expect(ENC_SCHEMES).toEqual(['x25519', 'p256-ecies-se'])
    expect(encSchemeOf({ encryptionPubKey: x })).toBe('x25519')
    expect(encSchemeOf({ encryptionPubKey: x, encScheme: 'x25519' })).toBe('x25519')
    expect(encSchemeOf({ encryptionPubKey: p })).toBe('p256-ecies-se')
    expect(encSchemeOf({ encryptionPubKey: p, encScheme: 'p256-ecies-se' })).toBe('p256-ecies-se')
  })

  it('refuses an announcement whose key does not fit it, an unknown scheme and a malformed key', () => {
    expect(() => encSchemeOf({ encryptionPubKey: x, encScheme: 'p256-ecies-se' })).toThrow(/takes a 64-byte key/)
    expect(() => encSchemeOf({ encryptionPubKey: p, encScheme: 'x25519' })).toThrow(/takes a 32-byte key/)
    expect(() => encSchemeOf({ encryptionPubKey: p, encScheme: 'p384-ecies' })).toThrow(/unknown encScheme/)
    expect(() => encSchemeOf({ encryptionPubKey: b64(new Uint8Array(48)) })).toThrow(/neither/)
    expect(() => encSchemeOf({ encryptionPubKey: 'not base64!' })).toThrow(SealError)
    expect(() => encSchemeOf({})).toThrow(SealError)
    expect(() => sealPromptTo(text('x'), { encryptionPubKey: x, encScheme: 'p256-ecies-se' })).toThrow(SealError)
  })

  it('seals by the scheme: each provider opens only its own kind', () => {
    const xk = generateX25519KeyPair()
    const pk = generateP256KeyPair()
    const toX = requesterSeal({ encryptionPubKey: b64(xk.publicKey) })
    const toP = requesterSeal({ encryptionPubKey: b64(pk.publicKey), encScheme: 'p256-ecies-se' })
    expect([toX.scheme, toP.scheme]).toEqual(['x25519', 'p256-ecies-se'])
    expect(Buffer.from(toX.ephemeralPublicKey, 'base64')).toHaveLength(32)
    expect(Buffer.from(toP.ephemeralPublicKey, 'base64')).toHaveLength(64)
    const sx = toX.reply.seal(text('to x'))
    const sp = toP.reply.seal(text('to p'))
    expect(new TextDecoder().decode(providerChannel('x25519', toX.ephemeralPublicKey, xk.secretKey).open(sx)!)).toBe('to x')
    expect(new TextDecoder().decode(providerChannel('p256-ecies-se', toP.ephemeralPublicKey, pk.secretKey).open(sp)!)).toBe('to p')
    // A P-256 ephemeral key named to an X25519 provider (or the reverse) is refused, not misread.
    expect(() => providerChannel('x25519', toP.ephemeralPublicKey, xk.secretKey)).toThrow(SealError)
    expect(() => providerChannel('p256-ecies-se', toX.ephemeralPublicKey, pk.secretKey)).toThrow(SealError)
  })

  it('counts the plaintext of a sealed message by its scheme', () => {
    const pk = generateP256KeyPair()
    const xk = generateX25519KeyPair()
    for (const size of [0, 1, 2, 3, 100]) {
      const msg = new Uint8Array(size)
      expect(sealedPlaintextBytes(requesterSeal({ encryptionPubKey: b64(pk.publicKey) }).reply.seal(msg), 'p256-ecies-se')).toBe(size)
      expect(sealedPlaintextBytes(requesterSeal({ encryptionPubKey: b64(xk.publicKey) }).reply.seal(msg), 'x25519')).toBe(size)
    }
  })
})
