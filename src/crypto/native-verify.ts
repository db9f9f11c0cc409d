/**
 * Native (OpenSSL) verification of atproto repo-commit signatures.
 *
 * `@atproto/repo` checks every commit signature through `@atproto/crypto`'s
 * curve plugins, which verify in pure JS (~1.5 ms per secp256k1 signature on
 * these machines, the largest cost of indexing our commits). This installs a
 * native `verifySignature` on those same plugin objects, with the library's
 * semantics: a did:key of the plugin's curve, SHA-256 of the data, a 64-byte
 * compact (r||s) signature with low S; with `allowMalleableSig`, high S and
 * DER are accepted too. Installing is idempotent.
 */
import { createPublicKey, verify, type KeyObject } from 'node:crypto'
import { extractMultikey, extractPrefixedBytes, hasPrefix, P256_DID_PREFIX, p256Plugin, SECP256K1_DID_PREFIX, secp256k1Plugin } from '@atproto/crypto'

interface Curve {
  prefix: Uint8Array
  /** SPKI DER header for a 33-byte compressed point of this curve. */
  spkiHeader: Buffer
  halfOrder: bigint
}

const CURVES = {
  secp256k1: {
    prefix: SECP256K1_DID_PREFIX,
    spkiHeader: Buffer.from('3036301006072a8648ce3d020106052b8104000a032200', 'hex'),
    halfOrder: 0xfffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141n / 2n,
  },
  p256: {
    prefix: P256_DID_PREFIX,
    spkiHeader: Buffer.from('3039301306072a8648ce3d020106082a8648ce3d030107032200', 'hex'),
    halfOrder: 0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551n / 2n,
  },
} satisfies Record<string, Curve>

/** Parsed did:key public keys, least recently used first; bounded. */
const keyCache = new Map<string, KeyObject>()
const KEY_CACHE_MAX = 10_000

function publicKeyFor(didKey: string, curve: Curve): KeyObject {
  let key = keyCache.get(didKey)
  if (key) {
    keyCache.delete(didKey)
  } else {
    const prefixed = extractPrefixedBytes(extractMultikey(didKey))
    if (!hasPrefix(prefixed, curve.prefix)) throw new Error(`did:key is not of the expected curve: ${didKey}`)
    const point = prefixed.slice(curve.prefix.length)
    key = createPublicKey({ key: Buffer.concat([curve.spkiHeader, point]), format: 'der', type: 'spki' })
    if (keyCache.size >= KEY_CACHE_MAX) keyCache.delete(keyCache.keys().next().value!)
  }
  keyCache.set(didKey, key)
  return key
}

export function verifyDidKeySignature(curve: Curve, didKey: string, data: Uint8Array, sig: Uint8Array, allowMalleable = false): boolean {
  const key = publicKeyFor(didKey, curve)
  if (sig.length === 64) {
    const s = BigInt('0x' + Buffer.from(sig.subarray(32)).toString('hex'))
    if (!allowMalleable && s > curve.halfOrder) return false
    return verify('sha256', data, { key, dsaEncoding: 'ieee-p1363' }, sig)
  }
  // Only malleable mode accepts DER (as the library does).
  if (!allowMalleable) return false
  try {
    return verify('sha256', data, { key, dsaEncoding: 'der' }, sig)
  } catch {
    return false
  }
}

let installed = false

export function installNativeSignatureVerification(): void {
  if (installed) return
  installed = true
  const plugins: [typeof secp256k1Plugin, Curve][] = [
    [secp256k1Plugin, CURVES.secp256k1],
    [p256Plugin, CURVES.p256],
  ]
  for (const [plugin, curve] of plugins) {
    plugin.verifySignature = async (didKey: string, data: Uint8Array, sig: Uint8Array, opts?: { allowMalleableSig?: boolean }) =>
      verifyDidKeySignature(curve, didKey, data, sig, opts?.allowMalleableSig ?? false)
    // @atproto/crypto parses the did:key before every verification, decompressing its point in pure JS (~70 us):
    // the result is remembered (bounded), and each caller gets its own copy.
    const decompress = plugin.decompressPubkey
    const points = new Map<string, Uint8Array>()
    plugin.decompressPubkey = (compressed: Uint8Array): Uint8Array => {
      const k = Buffer.from(compressed).toString('hex')
      let point = points.get(k)
      if (!point) {
        point = decompress(compressed)
        if (points.size >= KEY_CACHE_MAX) points.delete(points.keys().next().value!)
        points.set(k, point)
      }
      return point.slice()
    }
  }
}

export { CURVES }
