/**
 * Attestations published by the network's agent before its 2026-06 fix were
 * signed over another body than the one stored (test/fixture/
 * legacy-attestation.ts rebuilds both as that agent made them). The verifier
 * accepts them by the reference's rule, and by nothing looser: the record as
 * stored, or else with an absent `mdaCertChain` restored as `[]` and the
 * fraction of `attestedAt`/`expiresAt` cut off, both at once.
 */
import { describe, expect, it } from 'vitest'
import { canonicalBytes } from '../src/crypto/canonical-json.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import { attestationSigningBytes, legacyAttestationBody, signAttestation, verifyAttestationSignature } from '../src/crypto/signing.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { validateRecord } from '../src/lexicon/validate.ts'
import { chronoAutoSi, fakeCertChain, legacyAttestation, type ChronoTime } from './fixture/legacy-attestation.ts'

const signer = P256Signer.generate()
const t = (at: string, nanos: number): ChronoTime => ({ at, nanos })
const verify = (record: Record<string, unknown>, key = signer) => verifyAttestationSignature(record, key.publicKey)
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex')

describe('chrono time forms (what the fixture stores)', () => {
  it('writes no fraction at a whole second, else 3, 6 or 9 digits', () => {
    expect(chronoAutoSi(t('2026-06-20T09:14:03Z', 0))).toBe('2026-06-20T09:14:03Z')
    expect(chronoAutoSi(t('2026-06-20T09:14:03Z', 384_000_000))).toBe('2026-06-20T09:14:03.384Z')
    expect(chronoAutoSi(t('2026-06-20T09:14:03Z', 384_834_000))).toBe('2026-06-20T09:14:03.384834Z')
    expect(chronoAutoSi(t('2026-06-20T09:14:03Z', 5_000))).toBe('2026-06-20T09:14:03.000005Z')
    expect(chronoAutoSi(t('2026-06-20T09:14:03Z', 384_834_123))).toBe('2026-06-20T09:14:03.384834123Z')
  })
})

describe('legacy attestations verify', () => {
  const forms: [string, Parameters<typeof legacyAttestation>[1]][] = [
    ['no chain, microsecond times (the common case)', { attestedAt: t('2026-06-20T09:14:03Z', 384_834_000), expiresAt: t('2026-06-21T09:14:03Z', 384_834_000) }],
    ['no chain, whole-second times (only the chain differs)', { attestedAt: t('2026-06-20T09:14:03Z', 0), expiresAt: t('2026-06-21T09:14:03Z', 0) }],
    ['a chain, nanosecond times (only the times differ)', { attestedAt: t('2026-05-02T23:59:59Z', 999_999_999), expiresAt: t('2026-05-03T23:59:59Z', 999_999_999), mdaCertChain: fakeCertChain() }],
    ['a chain, millisecond times', { attestedAt: t('2026-04-11T00:00:00Z', 1_000_000), expiresAt: t('2026-04-12T00:00:00Z', 1_000_000), mdaCertChain: fakeCertChain() }],
    ['no chain, one time whole and one fractional', { attestedAt: t('2026-06-29T03:56:08Z', 0), expiresAt: t('2026-06-30T03:56:08Z', 384_834_000) }],
  ]
  for (const [name, opts] of forms) {
    it(name, () => {
      const { stored, signedBytes } = legacyAttestation(signer, opts)
      expect(validateRecord(ids.ComputeAttestation, stored).success).toBe(true)
      // The stored form alone does not verify: the rule is what rescues it, by rebuilding the signed bytes exactly.
      expect(hex(attestationSigningBytes(stored))).not.toBe(hex(signedBytes))
      expect(hex(canonicalBytes(legacyAttestationBody(stored)))).toBe(hex(signedBytes))
      expect(verify(stored)).toBe(true)
    })
  }

  it('records signed as stored still verify, fractions and chains included', () => {
    const base = legacyAttestation(signer, { attestedAt: t('2026-08-01T10:00:00Z', 0), expiresAt: t('2026-08-02T10:00:00Z', 0) }).stored
    const asStored = (r: Record<string, unknown>) => signAttestation({ ...r, selfSignature: undefined }, signer)
    expect(verify(asStored({ ...base, attestedAt: '2026-08-01T10:00:00.123Z', expiresAt: '2026-08-02T10:00:00.123Z' }))).toBe(true)
    expect(verify(asStored({ ...base, mdaCertChain: fakeCertChain() }))).toBe(true)
    expect(verify(asStored({ ...base, mdaCertChain: [] }))).toBe(true)
  })
})

describe('and nothing looser', () => {
  const legacy = () => legacyAttestation(signer, { attestedAt: t('2026-06-20T09:14:03Z', 384_834_000), expiresAt: t('2026-06-21T09:14:03Z', 384_834_000) })
  /** Signs `signed` (without $type) and stores `stored`, as a producer other than the old agent might. */
  const made = (signed: Record<string, unknown>, stored: Record<string, unknown>) => ({ ...stored, selfSignature: Buffer.from(signer.signDer(canonicalBytes(signed))).toString('base64') })
  const body = () => {
    const { $type: _t, selfSignature: _s, ...rest } = legacy().stored
    return rest
  }

  it('refuses a legacy record changed after signing, or checked with another key', () => {
    expect(verify({ ...legacy().stored, osVersion: '15.6' })).toBe(false)
    expect(verify({ ...legacy().stored, mdaCertChain: fakeCertChain() })).toBe(false)
    expect(verify({ ...legacy().stored, expiresAt: '2026-06-22T09:14:03.384834Z' })).toBe(false)
    expect(verify(legacy().stored, P256Signer.generate())).toBe(false)
  })

  it('refuses another fraction than the one stored, and a fraction signed but cut off in storage', () => {
    const b = body()
    // Signed at milliseconds, stored at microseconds: cutting gives whole seconds, which were not signed either.
    expect(verify(made({ ...b, mdaCertChain: [], attestedAt: '2026-06-20T09:14:03.384Z' }, { ...b, attestedAt: '2026-06-20T09:14:03.384834Z' }))).toBe(false)
    // The reverse divergence: signed with the fraction, stored without.
    expect(verify(made({ ...b, attestedAt: '2026-06-20T09:14:03.384834Z' }, { ...b, attestedAt: '2026-06-20T09:14:03Z' }))).toBe(false)
  })

  it('applies both changes together, never one alone', () => {
    const b = body()
    // An absent chain signed as [] but the stored fraction signed as is: the old agent never made this, and the rule does not take it.
    expect(verify(made({ ...b, mdaCertChain: [] }, b))).toBe(false)
  })

  it('restores only an empty chain, and only when absent', () => {
    const b = body()
    const whole = { ...b, attestedAt: '2026-06-20T09:14:03Z', expiresAt: '2026-06-21T09:14:03Z' }
    // A chain signed but left out of the record.
    expect(verify(made({ ...whole, mdaCertChain: fakeCertChain() }, b))).toBe(false)
    // A chain in the record that was not signed.
    expect(verify(made(whole, { ...b, mdaCertChain: fakeCertChain() }))).toBe(false)
    // A field signed that the record lacks (other than the chain) is not restored.
    expect(verify(made({ ...whole, mdaCertChain: [], rdmaDisabled: true }, { ...b, rdmaDisabled: undefined }))).toBe(false)
  })

  it('refuses a record without a signature, or with one that is not base64 DER', () => {
    expect(verify({ ...legacy().stored, selfSignature: undefined })).toBe(false)
    expect(verify({ ...legacy().stored, selfSignature: 'AAAA' })).toBe(false)
  })
})
