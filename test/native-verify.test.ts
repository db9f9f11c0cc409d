/**
 * The native commit-signature verifier must agree with @atproto/crypto's own
 * (pure JS) one on every input, valid or not.
 */
import { describe, expect, it } from 'vitest'
import { P256Keypair, p256Plugin, Secp256k1Keypair, secp256k1Plugin } from '@atproto/crypto'
import { CURVES, installNativeSignatureVerification } from '../src/crypto/native-verify.ts'

// Captured before the native verifiers are installed (nothing installs them at import time).
const original = { secp256k1: secp256k1Plugin.verifySignature, p256: p256Plugin.verifySignature }
const originalDecompress = { secp256k1: secp256k1Plugin.decompressPubkey, p256: p256Plugin.decompressPubkey }

const n = { secp256k1: CURVES.secp256k1.halfOrder * 2n + 1n, p256: CURVES.p256.halfOrder * 2n + 1n }

function highS(sig: Uint8Array, order: bigint): Uint8Array {
  const s = BigInt('0x' + Buffer.from(sig.subarray(32)).toString('hex'))
  const out = new Uint8Array(sig)
  out.set(Buffer.from((order - s).toString(16).padStart(64, '0'), 'hex'), 32)
  return out
}

function derOf(sig: Uint8Array): Uint8Array {
  const int = (b: Uint8Array) => {
    let i = 0
    while (i < b.length - 1 && b[i] === 0 && !(b[i + 1]! & 0x80)) i++
    const v = Buffer.from(b.subarray(i))
    return v[0]! & 0x80 ? Buffer.concat([Buffer.from([0]), v]) : v
  }
  const r = int(sig.subarray(0, 32))
  const s = int(sig.subarray(32))
  const body = Buffer.concat([Buffer.from([2, r.length]), r, Buffer.from([2, s.length]), s])
  return new Uint8Array(Buffer.concat([Buffer.from([0x30, body.length]), body]))
}

describe('native commit-signature verification', () => {
  for (const curve of ['secp256k1', 'p256'] as const) {
    it(`agrees with the library on ${curve}`, async () => {
      const cases: { did: string; data: Uint8Array; sig: Uint8Array; opts?: { allowMalleableSig: boolean } }[] = []
      for (let i = 0; i < 20; i++) {
        const kp = curve === 'secp256k1' ? await Secp256k1Keypair.create() : await P256Keypair.create()
        const other = curve === 'secp256k1' ? await Secp256k1Keypair.create() : await P256Keypair.create()
        const data = new TextEncoder().encode(`commit ${i}`)
        const sig = await kp.sign(data)
        cases.push(
          { did: kp.did(), data, sig },
          { did: kp.did(), data: new TextEncoder().encode(`commit ${i}!`), sig },
          { did: other.did(), data, sig },
          { did: kp.did(), data, sig: highS(sig, n[curve]) },
          { did: kp.did(), data, sig: highS(sig, n[curve]), opts: { allowMalleableSig: true } },
          { did: kp.did(), data, sig: derOf(sig) },
          { did: kp.did(), data, sig: derOf(sig), opts: { allowMalleableSig: true } },
          { did: kp.did(), data, sig: sig.subarray(0, 63) },
          { did: kp.did(), data, sig: new Uint8Array(64) },
        )
      }
      const expected = await Promise.all(cases.map((c) => original[curve](c.did, c.data, c.sig, c.opts).catch(() => false)))
      installNativeSignatureVerification()
      const plugin = curve === 'secp256k1' ? secp256k1Plugin : p256Plugin
      const actual = await Promise.all(cases.map((c) => plugin.verifySignature(c.did, c.data, c.sig, c.opts).catch(() => false)))
      expect(actual).toEqual(expected)
      // Both outcomes are represented: the comparison is not vacuous.
      expect(expected.filter(Boolean).length).toBeGreaterThanOrEqual(40)
      expect(expected.filter((x) => !x).length).toBeGreaterThanOrEqual(100)
    })
  }

  it('remembers decompressed public keys, handing each caller its own copy', async () => {
    installNativeSignatureVerification()
    for (const [name, plugin, key] of [['secp256k1', secp256k1Plugin, await Secp256k1Keypair.create()], ['p256', p256Plugin, await P256Keypair.create()]] as const) {
      const compressed = plugin.compressPubkey(key.publicKeyBytes())
      const want = originalDecompress[name](compressed)
      const a = plugin.decompressPubkey(compressed)
      a.fill(0)
      expect(plugin.decompressPubkey(compressed)).toEqual(want)
      expect(() => plugin.decompressPubkey(new Uint8Array(33).fill(5))).toThrow()
    }
  })
})
