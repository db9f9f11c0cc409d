/**
 * verifyReceipt / verifySettlement over XRPC, on records published to a real
 * PDS and indexed from its firehose: a receipt signed in the reference format
 * verifies (also with a high-S signature), and each tampered field is refused
 * with its own finding.
 */
import type { JsonWebKey } from 'node:crypto'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import { signDetached, signReceipt } from '../src/crypto/signing.ts'
import { fakeCertChain, legacyAttestation } from './fixture/legacy-attestation.ts'
import { canonicalJson } from '../src/crypto/canonical-json.ts'
import { verifySettlement as verifySettlementFn } from '../appview/verify/settlement.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { AppView } from '../appview/index.ts'
import { startAppView, tempDbPath } from './fixture/appview.ts'
import { attestationRecord, authorizationRecord, hex32, jobRecord, putRecord, receiptRecord } from '../src/dev/records.ts'
import { waitFor } from './fixture/wait.ts'

let net: LocalNetwork
let av: AppView
let provider: LocalAccount
let requester: LocalAccount
let exchange: LocalAccount
let other: LocalAccount
const signer = P256Signer.generate()
let attestation: { uri: string; cid: string }
let otherAttestation: { uri: string; cid: string }
let job: { uri: string; cid: string }
let auth: { uri: string; cid: string }
const commitment = hex32()

const indexed = (uri: string) => av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(uri)
async function publish(acct: LocalAccount, record: Record<string, unknown>) {
  const ref = await putRecord(acct.agent, acct.did, record)
  await waitFor(() => indexed(ref.uri), `${record.$type} indexed`)
  return ref
}
async function xrpc(nsid: string, params: Record<string, string>) {
  const res = await fetch(`${av.url}/xrpc/${nsid}?${new URLSearchParams(params)}`)
  return { status: res.status, body: (await res.json()) as { ok: boolean; findings: { code: string }[]; trustLevel?: string; error?: string } }
}
const codes = (b: { findings: { code: string }[] }) => b.findings.map((f) => f.code).sort()

beforeAll(async () => {
  net = await LocalNetwork.create()
  av = await startAppView(net, tempDbPath(), { http: true })
  provider = await net.createAccount('gpu-host.test')
  requester = await net.createAccount('asker.test')
  exchange = await net.createAccount('market.test')
  other = await net.createAccount('stranger.test')
  attestation = await publish(provider, attestationRecord(signer))
  otherAttestation = await publish(other, attestationRecord(signer))
  auth = await publish(requester, authorizationRecord(exchange.did, 1_000))
  job = await publish(requester, jobRecord(auth, commitment, 'llama-3-8b', 1_000))
})
afterAll(async () => {
  await av?.stop()
  await net?.close()
})

const base = () => ({ job, requester: requester.did, attestation, inputCommitment: commitment })

/** Re-encodes a DER ECDSA signature with s replaced by n - s (the high-S twin, equally valid). */
function toHighS(der: Uint8Array): Uint8Array {
  const n = 0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551n
  const rLen = der[3]!
  const r = der.subarray(4, 4 + rLen)
  const sLen = der[5 + rLen]!
  const s = BigInt('0x' + Buffer.from(der.subarray(6 + rLen, 6 + rLen + sLen)).toString('hex'))
  const flipped = s > n / 2n ? s : n - s
  const int = (v: Uint8Array) => (v[0]! & 0x80 ? Buffer.concat([Buffer.from([0]), v]) : Buffer.from(v))
  const sBytes = int(Buffer.from(flipped.toString(16).padStart(64, '0'), 'hex'))
  const body = Buffer.concat([Buffer.from([2, r.length]), r, Buffer.from([2, sBytes.length]), sBytes])
  return new Uint8Array(Buffer.concat([Buffer.from([0x30, body.length]), body]))
}

describe('verifyReceipt', () => {
  it('accepts a receipt signed in the reference format', async () => {
    const r = await publish(provider, receiptRecord(signer, base()))
    const { status, body } = await xrpc(ids.ComputeVerifyReceipt, { uri: r.uri })
    expect(status).toBe(200)
    expect(body.findings).toEqual([])
    expect(body.ok).toBe(true)
    expect(body.trustLevel).toBe('self-attested')
  })

  it('accepts a high-S signature', async () => {
    const rec = receiptRecord(signer, base())
    const high = toHighS(new Uint8Array(Buffer.from(rec.enclaveSignature, 'base64')))
    const r = await publish(provider, { ...rec, enclaveSignature: Buffer.from(high).toString('base64') })
    const { body } = await xrpc(ids.ComputeVerifyReceipt, { uri: r.uri })
    expect(body.ok).toBe(true)
  })

  // Each case: a receipt changed in one respect, and the one finding it must produce.
  const cases: [string, () => Record<string, unknown>, string[]][] = [
    ['a field changed after signing', () => ({ ...receiptRecord(signer, base()), model: 'other-model' }), ['model-mismatch', 'signature-invalid']],
    ['price changed after signing', () => ({ ...receiptRecord(signer, base()), price: { amount: 1, currency: 'CC' } }), ['signature-invalid']],
    ['signed by another key', () => receiptRecord(P256Signer.generate(), base()), ['signature-invalid']],
    ['price over the ceiling', () => receiptRecord(signer, { ...base(), price: 1_001 }), ['price-over-ceiling']],
    ['input commitment differs from the job', () => receiptRecord(signer, { ...base(), inputCommitment: hex32() }), ['commitment-mismatch']],
    ['model differs from the job', () => receiptRecord(signer, { ...base(), model: 'mistral' }), ['model-mismatch']],
    ['currency differs from the ceiling', () => signReceipt({ ...receiptRecord(signer, base()), price: { amount: 1, currency: 'USD' } }, signer), ['currency-mismatch']],
    ['pro bono with a price', () => receiptRecord(signer, { ...base(), proBono: true, price: 5, tokens: { in: 0, out: 0 } }), ['pro-bono-nonzero-price']],
    ['pro bono with tokens', () => receiptRecord(signer, { ...base(), proBono: true, price: 0 }), ['pro-bono-nonzero-tokens']],
    ['requester is not the job owner', () => receiptRecord(signer, { ...base(), requester: other.did }), ['requester-mismatch']],
    ['attestation of another repo', () => receiptRecord(signer, { ...base(), attestation: otherAttestation }), ['attestation-owner-mismatch']],
    ['stale job version', () => receiptRecord(signer, { ...base(), job: { uri: job.uri, cid: attestation.cid } }), ['job-cid-mismatch']],
    ['completed after the job expired', () => signReceipt({ ...receiptRecord(signer, base()), completedAt: new Date(Date.now() + 7200_000).toISOString() }, signer), ['job-expired']],
    ['completed outside the attestation window', () => signReceipt({ ...receiptRecord(signer, base()), completedAt: new Date(Date.now() - 7200_000).toISOString() }, signer), ['attestation-stale']],
    ['malformed output commitment', () => signReceipt({ ...receiptRecord(signer, base()), outputCommitment: 'G'.repeat(64) }, signer), ['output-commitment-shape']],
  ]
  for (const [name, make, expected] of cases) {
    it(`refuses: ${name}`, async () => {
      const r = await publish(provider, make())
      const { body } = await xrpc(ids.ComputeVerifyReceipt, { uri: r.uri })
      expect(body.ok).toBe(false)
      expect(codes(body)).toEqual(expected.sort())
    })
  }

  it('refuses an attestation whose self-signature does not hold', async () => {
    const att = attestationRecord(signer)
    const badAtt = await publish(provider, { ...att, osVersion: 'tampered' })
    const r = await publish(provider, receiptRecord(signer, { ...base(), attestation: badAtt }))
    const { body } = await xrpc(ids.ComputeVerifyReceipt, { uri: r.uri })
    expect(codes(body)).toEqual(['attestation-selfsig-invalid'])
  })

  it('answers NotFound for an unknown receipt and InvalidRequest for a bad uri', async () => {
    expect((await xrpc(ids.ComputeVerifyReceipt, { uri: `at://${provider.did}/${ids.ComputeReceipt}/3zzzzzzzzzzzz` })).status).toBe(404)
    const bad = await xrpc(ids.ComputeVerifyReceipt, { uri: 'not-a-uri' })
    expect(bad.status).toBe(400)
    expect(bad.body.error).toBe('InvalidRequest')
  })
})

describe('verifyReceipt with attestations published before the 2026-06 fix', () => {
  // Receipts of that time, settled late: completed inside the old attestation's window.
  const oldReceipt = (att: { uri: string; cid: string }) =>
    signReceipt({ ...receiptRecord(signer, { ...base(), attestation: att }), startedAt: '2026-06-20T11:59:58Z', completedAt: '2026-06-20T12:00:00Z' }, signer)
  const forms: [string, Parameters<typeof legacyAttestation>[1]][] = [
    ['no chain, microsecond times', { attestedAt: { at: '2026-06-20T09:14:03Z', nanos: 384_834_000 }, expiresAt: { at: '2026-06-21T09:14:03Z', nanos: 384_834_000 } }],
    ['no chain, whole-second times', { attestedAt: { at: '2026-06-20T09:14:03Z', nanos: 0 }, expiresAt: { at: '2026-06-21T09:14:03Z', nanos: 0 } }],
    ['a certificate chain, nanosecond times', { attestedAt: { at: '2026-06-20T09:14:03Z', nanos: 7 }, expiresAt: { at: '2026-06-21T09:14:03Z', nanos: 7 }, mdaCertChain: fakeCertChain() }],
  ]
  for (const [name, opts] of forms) {
    it(`accepts a receipt citing one: ${name}`, async () => {
      const att = await publish(provider, legacyAttestation(signer, opts).stored)
      const r = await publish(provider, oldReceipt(att))
      const { body } = await xrpc(ids.ComputeVerifyReceipt, { uri: r.uri })
      expect(body.findings).toEqual([])
      expect(body.ok).toBe(true)
    })
  }

  it('still refuses one changed after signing', async () => {
    const { stored } = legacyAttestation(signer, forms[0]![1])
    const att = await publish(provider, { ...stored, osVersion: 'tampered' })
    const r = await publish(provider, oldReceipt(att))
    expect(codes((await xrpc(ids.ComputeVerifyReceipt, { uri: r.uri })).body)).toEqual(['attestation-selfsig-invalid'])
  })
})

describe('verifySettlement', () => {
  it('checks amounts against the authorization and the receipt', async () => {
    const receipt = await publish(provider, receiptRecord(signer, { ...base(), price: 100 }))
    const settlement = (charged: number, payout: number, fee: number) => ({
      $type: ids.ComputeSettlement,
      receipt,
      requesterAuthorization: auth,
      amountCharged: { amount: charged, currency: 'CC' },
      providerPayout: { amount: payout, currency: 'CC' },
      exchangeFee: { amount: fee, currency: 'CC' },
      processorReference: 'ledger',
      status: 'settled',
      settledAt: new Date().toISOString(),
    })
    const key = P256Signer.generate()
    const good = await publish(exchange, signDetached(settlement(100, 95, 5), key))
    // The exchange's DID document does not publish this key here, so the signature cannot be checked: said, not hidden.
    const ok = await xrpc(ids.ComputeVerifySettlement, { uri: good.uri })
    expect(codes(ok.body)).toEqual(['signing-key-unresolved'])
    const split = await publish(exchange, signDetached(settlement(100, 90, 5), key))
    expect(codes((await xrpc(ids.ComputeVerifySettlement, { uri: split.uri })).body)).toEqual(['signing-key-unresolved', 'split-mismatch'])
    const over = await publish(exchange, signDetached(settlement(2000, 1900, 100), key))
    expect(codes((await xrpc(ids.ComputeVerifySettlement, { uri: over.uri })).body)).toEqual(['amount-vs-price', 'over-ceiling', 'signing-key-unresolved'])
    const wrongExchange = await publish(other, signDetached(settlement(100, 95, 5), key))
    expect(codes((await xrpc(ids.ComputeVerifySettlement, { uri: wrongExchange.uri })).body)).toContain('wrong-exchange')
  })
})


describe('verifySettlement signature', () => {
  // The exchange's settlement key as its DID document publishes it (a JWK verification method).
  const key = P256Signer.generate()
  const jwk = key.publicKey.export({ format: 'jwk' })
  const doc = (k = jwk) => ({ id: 'did:web:market.example', verificationMethod: [{ id: 'did:web:market.example#exchange-signing-key', type: 'JsonWebKey2020', controller: 'did:web:market.example', publicKeyJwk: k }] })
  const body = {
    $type: ids.ComputeSettlement,
    receipt: { uri: 'at://did:plc:p/dev.cocore.compute.receipt/1', cid: 'bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm' },
    requesterAuthorization: { uri: 'at://did:plc:r/dev.cocore.compute.paymentAuthorization/1', cid: 'bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm' },
    amountCharged: { amount: 100, currency: 'CC' },
    providerPayout: { amount: 95, currency: 'CC' },
    exchangeFee: { amount: 5, currency: 'CC' },
    processorReference: 'ledger',
    status: 'settled',
    settledAt: new Date().toISOString(),
  }
  const sigCodes = (v: { findings: { code: string }[] }) => v.findings.map((f) => f.code).filter((c) => /sig|key/.test(c))
  const run = (s: Record<string, unknown>, d: unknown, att?: string, attKey?: JsonWebKey, attRepo = 'did:web:market.example') =>
    verifySettlementFn(
      { uri: 'at://did:web:market.example/x/1', cid: 'c', did: 'did:web:market.example', body: s as never },
      undefined,
      undefined,
      att ? ({ uri: `at://${attRepo}/${ids.ComputeExchangeAttestation}/1`, cid: 'c', did: attRepo, body: { signingKeyFingerprint: att, ...(attKey ? { signingKeyJwk: attKey } : {}) } } as never) : undefined,
      d as never,
    )

  it('accepts a settlement signed by the key in the exchange DID document, pinned by its fingerprint', async () => {
    const { jwkFingerprint } = await import('../appview/verify/settlement.ts')
    expect(sigCodes(run(signDetached(body, key), doc()))).toEqual([])
    expect(sigCodes(run(signDetached(body, key), doc(), jwkFingerprint(jwk)))).toEqual([])
    // The reference signs some records with $type inside the signed bytes: both forms verify.
    const withType = { ...body, sig: Buffer.from(key.signRawRS(new TextEncoder().encode(canonicalJson(body)))).toString('base64url') }
    expect(sigCodes(run(withType, doc()))).toEqual([])
  })
  it('refuses a tampered settlement, another key, and a fingerprint that matches no published key', () => {
    expect(sigCodes(run({ ...signDetached(body, key), exchangeFee: { amount: 6, currency: 'CC' } }, doc()))).toEqual(['signature-invalid'])
    expect(sigCodes(run(signDetached(body, P256Signer.generate()), doc()))).toEqual(['signature-invalid'])
    expect(sigCodes(run(signDetached(body, key), doc(), 'not-the-fingerprint'))).toEqual(['signing-key-unresolved'])
    expect(sigCodes(run(body, doc()))).toEqual(['no-signature'])
  })
  it("accepts the key the exchange's own attestation carries when its DID document has none, and only from its own repo", async () => {
    const { jwkFingerprint } = await import('../appview/verify/settlement.ts')
    const pub = { kty: 'EC', crv: 'P-256', x: jwk.x!, y: jwk.y! }
    const signed = signDetached(body, key)
    expect(sigCodes(run(signed, null, jwkFingerprint(pub), pub))).toEqual([])
    expect(sigCodes(run(signed, { id: 'did:web:market.example' }, jwkFingerprint(pub), pub))).toEqual([])
    // An attestation in another repo vouches for nothing.
    expect(sigCodes(run(signed, null, jwkFingerprint(pub), pub, 'did:plc:someoneelse'))).toEqual(['signing-key-unresolved'])
    // A carried key whose fingerprint is not the attested one is not used.
    expect(sigCodes(run(signed, null, 'another-fingerprint', pub))).toEqual(['signing-key-unresolved'])
  })
})
