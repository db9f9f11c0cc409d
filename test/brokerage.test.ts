/**
 * The exchange as a brokerage (the network's ADR 0004), on the real local
 * network with a settling exchange: its did:web document served and resolved,
 * its countersignature on `inference_request` for the machine that answered
 * the challenge (witnessed in the dispatch book), copied onto the receipt by
 * our agent, a reference-style provider and a scripted one; verifyReceipt
 * calls such a receipt confidential only when it trusts the brokerage; a
 * countersignature lifted onto another job, machine or nonce is refused by
 * verifyReceipt and by settlement, one re-signed for another nonce by
 * settlement (against the book), and another brokerage's is checked against
 * its own DID document.
 */
import { createServer, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import verifyReceiptHandler from '../appview/api/dev/cocore/compute/verifyReceipt.ts'
import type { ConsoleService } from '../console/index.ts'
import { didWebOf } from '../src/config.ts'
import { brokerageDidDocument, countersignatureVerifies, fromWireCountersignature, signWitness } from '../src/crypto/brokerage.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import type { LocalAccount } from '../src/dev/network.ts'
import { AuthorityResolver, didWebDocumentUrl } from '../src/identity/authority.ts'
import { createIdResolver } from '../src/identity/index.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { InferenceRequestFrame } from '../src/protocol/agent.ts'
import { startBuiltinAgent } from './fixture/agent.ts'
import { signInWithBrowser } from './fixture/console.ts'
import { runJob } from './fixture/jobs.ts'
import { ReferenceProvider } from './fixture/reference-provider.ts'
import { connectScripted, publishScriptedRecord, writeReceipt, type ScriptedProvider, type ScriptedRecord } from './fixture/scripted-provider.ts'
import { settlingExchange, startStack, type Stack } from './fixture/stack.ts'
import { waitFor } from './fixture/wait.ts'

const POLICY = { grant: 50_000, floor: 100, tokenRate: { inputPerMTok: 1_000_000, outputPerMTok: 2_000_000 } }
/** What the scripted 'reply' provider reports (7 in, one out per piece), and its price under POLICY. */
const HONEST = { tokens: { in: 7, out: 4 }, price: 7 + 2 * 4 }

let stack: Stack
let svc: ConsoleService
let alice: LocalAccount
let market: LocalAccount
let brokerage: string

beforeAll(async () => {
  stack = await startStack({
    accounts: ['alice.test', 'market.test'],
    console: ([, market], av, net) => settlingExchange(market, av, net, { policy: POLICY, firstChunkTimeoutMs: 5000 }),
  })
  svc = stack.svc
  ;[alice, market] = stack.accounts as LocalAccount[] as [LocalAccount, LocalAccount]
  brokerage = svc.brokerage!.did
  // As the stacks configure it (COCORE_TRUSTED_BROKERAGES' default), once the console's DID is known.
  stack.av.trustedBrokerages.add(brokerage)
  // Signing in gives the OAuth session that publishes job records, and the welcome grant.
  await (await signInWithBrowser(stack.browser, svc.url, alice.handle, alice.password)).close()
}, 180_000)

afterAll(async () => {
  await stack?.close()
})

const indexed = (uri: string) => waitFor(() => stack.av.db.$client.prepare('SELECT 1 FROM records WHERE uri = ?').get(uri), `${uri} indexed`)
const decided = (uri: string) => waitFor(() => svc.db.$client.prepare('SELECT * FROM settlements WHERE receipt_uri = ?').get(uri) as Record<string, unknown> | undefined, `${uri} decided`)
const rkeyOf = (uri: string) => uri.split('/').pop()!

type Verdict = { ok: boolean; confidential?: boolean; brokerageAuthority?: string; findings: { severity: string; code: string }[] }
/** verifyReceipt as the AppView serves it (it trusts the network's brokerage and this exchange's, as configured by default). */
async function served(uri: string): Promise<Verdict> {
  await indexed(uri)
  const res = await fetch(`${stack.av.url}/xrpc/${ids.ComputeVerifyReceipt}?uri=${encodeURIComponent(uri)}`)
  expect(res.status).toBe(200)
  return (await res.json()) as Verdict
}
/** verifyReceipt's answer by a verifier trusting `did`, by one trusting nothing, and as the AppView serves it. */
async function verifyTrusting(did: string, uri: string): Promise<{ trusted: Verdict; untrusted: Verdict; served: Verdict }> {
  await indexed(uri)
  const as = (trusted: string[]) =>
    verifyReceiptHandler({ db: stack.av.db, brokerage: { trusted: new Set(trusted), authorities: stack.av.authorities } }, { uri }) as Promise<Verdict>
  return { trusted: await as([did]), untrusted: await as([]), served: await served(uri) }
}

/** A job through the exchange, sealed as a requester seals it. */
const run = (model: string) => runJob(svc.exchange!, alice.did, model, [{ role: 'user', content: `hello ${model}` }])

interface Machine {
  acct: LocalAccount
  published: ScriptedRecord
  p: ScriptedProvider
}
async function scripted(handle: string, model: string): Promise<Machine> {
  const acct = await stack.net.createAccount(handle)
  const published = await publishScriptedRecord(acct, model, {}, { attestation: true })
  await indexed(published.attestation!.uri)
  const p = await connectScripted(svc.localUrl.replace('http', 'ws'), acct, market.did, published, { models: [model] })
  return { acct, published, p }
}
/** A job served by `m`, and the request it got. */
async function job(m: Machine, model: string): Promise<InferenceRequestFrame> {
  const { meta } = await run(model)
  return m.p.requests.find((r) => r.job_uri === meta.jobUri)!
}
/** The countersignature a request carried, as a receipt carries it. */
const onReceipt = (req: InferenceRequestFrame) => fromWireCountersignature(req.brokerage_countersignature)!

describe('the brokerage DID document', () => {
  it('is the did:web of the console, served at /.well-known/did.json and resolved by the AppView; http on loopback only in dev', async () => {
    expect(brokerage).toBe(didWebOf(svc.url))
    const res = await fetch(`${svc.url}/.well-known/did.json`)
    expect(res.status).toBe(200)
    const doc = (await res.json()) as { id: string; verificationMethod: { type: string; publicKeyJwk: Record<string, string> }[] }
    expect(doc.id).toBe(brokerage)
    expect(doc.verificationMethod[0]).toMatchObject({ type: 'JsonWebKey2020', publicKeyJwk: { kty: 'EC', crv: 'P-256', x: svc.brokerage!.key.publicJwk.x, y: svc.brokerage!.key.publicJwk.y } })
    expect(doc.verificationMethod[0]!.publicKeyJwk).not.toHaveProperty('d')

    expect((await stack.av.authorities.resolve(brokerage))?.id).toBe(brokerage)
    // Outside the local network the same DID is refused: http, an IP literal, a custom port, loopback.
    const production = new AuthorityResolver({ idResolver: createIdResolver({ plcUrl: stack.net.plcUrl, cacheSize: 10, cacheTtlSec: 60, allowHttp: false }) })
    expect(await production.resolve(brokerage)).toBeNull()
  })

  it('reads a did:web as the network does, and nothing that is not one', () => {
    expect(didWebDocumentUrl('did:web:example.com', false)?.href).toBe('https://example.com/.well-known/did.json')
    expect(didWebDocumentUrl('did:web:example.com:users:alice', false)?.href).toBe('https://example.com/users/alice/did.json')
    expect(didWebDocumentUrl('did:web:127.0.0.1%3A2585', true)?.href).toBe('http://127.0.0.1:2585/.well-known/did.json')
    expect(didWebDocumentUrl('did:web:127.0.0.1%3A2585', false)?.href).toBe('https://127.0.0.1:2585/.well-known/did.json')
    expect(didWebDocumentUrl('did:web:example.com', true)?.protocol).toBe('https:')
    for (const bad of ['did:web:', 'did:web:a%2Fb', 'did:web:user%40evil.com', 'did:web:example.com::x', 'did:plc:abc']) expect(didWebDocumentUrl(bad, true)).toBeNull()
  })
})

describe('countersigned at dispatch', () => {
  let rig: Machine
  beforeAll(async () => {
    rig = await scripted('rig.test', 'bk-1')
  })

  it("signs the job for the machine that answered the challenge, on inference_request, witnessed in the book; the receipt carrying it settles and is confidential only to a verifier trusting this brokerage", async () => {
    const req = await job(rig, 'bk-1')
    const c = req.brokerage_countersignature!
    expect(c).toEqual({ authority: brokerage, machine_id: rkeyOf(rig.published.ref.uri), nonce: expect.stringMatching(/^[0-9a-f]{32}$/), sig: expect.any(String) })
    const receiptLike = { requester: alice.did, job: { uri: req.job_uri, cid: req.job_cid }, attestation: rig.published.attestation!, brokerageCountersignature: onReceipt(req) }
    expect(countersignatureVerifies(receiptLike, [svc.brokerage!.key.signer.publicKey])).toBe(true)
    expect(svc.exchange!.book.get(req.job_uri)!.witness).toEqual({ authority: brokerage, machineId: c.machine_id, attestation: rig.published.attestation!.uri, nonce: c.nonce })

    const receipt = await writeReceipt(rig.acct, rig.published, req, { ...HONEST, brokerageCountersignature: onReceipt(req) })
    expect(await decided(receipt.uri)).toMatchObject({ outcome: 'settled', amount: HONEST.price })
    const { trusted, untrusted, served } = await verifyTrusting(brokerage, receipt.uri)
    expect(trusted).toMatchObject({ ok: true, confidential: true, brokerageAuthority: brokerage, findings: [] })
    expect(served).toEqual(trusted)
    expect(untrusted).toMatchObject({ ok: true, confidential: false, findings: [{ severity: 'info', code: 'brokerage-untrusted' }] })
    expect(untrusted).not.toHaveProperty('brokerageAuthority')
  })

  it('our provider agent copies it onto its receipt, which settles and is confidential to a verifier trusting this brokerage', async () => {
    const acct = await stack.net.createAccount('agent.test')
    const agent = await startBuiltinAgent(stack.net.pdsUrl, acct, { url: svc.url, did: market.did })
    try {
      await indexed(agent.published.attestation.uri)
      const { meta, done } = await run('builtin')
      const witness = svc.exchange!.book.get(meta.jobUri)!.witness!
      expect(witness).toMatchObject({ authority: brokerage, machineId: rkeyOf(agent.published.provider.uri), attestation: agent.published.attestation.uri })
      await indexed(done.receiptUri!)
      const body = (await acct.agent.com.atproto.repo.getRecord({ repo: acct.did, collection: ids.ComputeReceipt, rkey: rkeyOf(done.receiptUri!) })).data.value as Record<string, unknown>
      expect(body.brokerageCountersignature).toEqual({ authority: brokerage, machineId: witness.machineId, nonce: witness.nonce, sig: expect.any(String) })
      expect(await decided(done.receiptUri!)).toMatchObject({ outcome: 'settled', finding_code: null })
      const { trusted, untrusted, served } = await verifyTrusting(brokerage, done.receiptUri!)
      expect(trusted).toMatchObject({ ok: true, confidential: true, brokerageAuthority: brokerage })
      expect(served).toEqual(trusted)
      expect(untrusted).toMatchObject({ ok: true, confidential: false })
    } finally {
      await agent.stop()
    }
  })

  it("a provider that speaks only the network's protocol reads it (its wire struct) and copies it onto its receipt, which settles", async () => {
    const acct = await stack.net.createAccount('refrig.test')
    const published = await publishScriptedRecord(acct, 'bk-ref', {}, { attestation: true })
    await indexed(published.attestation!.uri)
    const p = await ReferenceProvider.connect({ url: svc.localUrl.replace('http', 'ws'), acct, exchangeDid: market.did, published, models: ['bk-ref'], binaryVersion: '0.9.52' })
    try {
      await waitFor(() => svc.gateway!.connected('bk-ref').length, 'routable')
      const { meta, done } = await run('bk-ref')
      const request = p.received.find((f) => f.type === 'inference_request' && f.job_uri === meta.jobUri)!
      expect(request.brokerage_countersignature).toMatchObject({ authority: brokerage, machine_id: rkeyOf(published.ref.uri) })
      expect(p.violations).toEqual([])
      expect(await decided(done.receiptUri!)).toMatchObject({ outcome: 'settled', finding_code: null })
      expect((await verifyTrusting(brokerage, done.receiptUri!)).trusted).toMatchObject({ ok: true, confidential: true, brokerageAuthority: brokerage })
    } finally {
      p.close()
    }
  })
})

describe('forged and lifted countersignatures', () => {
  let rig: Machine
  beforeAll(async () => {
    rig = await scripted('lifter.test', 'bk-2')
  })

  /** A receipt for `req` carrying `countersignature`, its verifyReceipt verdict (this brokerage trusted) and its settlement. */
  async function judged(req: InferenceRequestFrame, countersignature: object) {
    const receipt = await writeReceipt(rig.acct, rig.published, req, { ...HONEST, brokerageCountersignature: countersignature })
    const { trusted, served } = await verifyTrusting(brokerage, receipt.uri)
    expect(served).toEqual(trusted)
    return { verdict: trusted, decision: await decided(receipt.uri) }
  }
  const invalid = { ok: false, confidential: false, findings: [{ severity: 'error', code: 'brokerage-countersignature-invalid' }] }

  it("lifted from another job onto this one's receipt: refused by verifyReceipt and by settlement", async () => {
    const a = await job(rig, 'bk-2')
    const b = await job(rig, 'bk-2')
    const { verdict, decision } = await judged(b, onReceipt(a))
    expect(verdict).toMatchObject(invalid)
    expect(decision).toMatchObject({ outcome: 'refused', finding_code: 'brokerage-countersignature-invalid' })
  })

  it('naming another machine, or another nonce, than it was signed for: refused by verifyReceipt and by settlement', async () => {
    for (const change of [{ machineId: 'another-machine' }, { nonce: '0123456789abcdef0123456789abcdef' }]) {
      const req = await job(rig, 'bk-2')
      const { verdict, decision } = await judged(req, { ...onReceipt(req), ...change })
      expect(verdict).toMatchObject(invalid)
      expect(decision).toMatchObject({ outcome: 'refused', finding_code: 'brokerage-countersignature-invalid' })
    }
  })

  it("signed with this brokerage's key for a nonce it never sent this job's machine: settlement refuses it against the book", async () => {
    const req = await job(rig, 'bk-2')
    const machineId = rkeyOf(rig.published.ref.uri)
    const resigned = signWitness(svc.brokerage!.key.signer, { authority: brokerage, attestation: rig.published.attestation!.uri, jobCid: req.job_cid!, jobUri: req.job_uri, machineId, requester: alice.did })
    const { verdict, decision } = await judged(req, resigned)
    // A verifier has only the signature to go by; the exchange has its book.
    expect(verdict).toMatchObject({ ok: true, confidential: true })
    expect(decision).toMatchObject({ outcome: 'refused', finding_code: 'brokerage-witness-mismatch' })
  })

  describe("another brokerage's", () => {
    let server: Server
    let other: string
    const key = P256Signer.generate()
    beforeAll(async () => {
      server = createServer((req, res) => {
        if (req.url !== '/.well-known/did.json') return void res.writeHead(404).end()
        const jwk = key.publicKey.export({ format: 'jwk' }) as Record<string, string>
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(brokerageDidDocument(other, { kty: 'EC', crv: 'P-256', x: jwk.x!, y: jwk.y! })))
      })
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
      other = `did:web:127.0.0.1%3A${(server.address() as AddressInfo).port}`
    })
    afterAll(() => new Promise<void>((resolve) => server.close(() => resolve())))

    const signedBy = (signer: P256Signer, authority: string, req: InferenceRequestFrame) =>
      signWitness(signer, { authority, attestation: rig.published.attestation!.uri, jobCid: req.job_cid!, jobUri: req.job_uri, machineId: 'elsewhere', requester: alice.did })

    it('is checked against its DID document: one that verifies is not required and settles, confidential only to a verifier trusting it', async () => {
      const req = await job(rig, 'bk-2')
      const receipt = await writeReceipt(rig.acct, rig.published, req, { ...HONEST, brokerageCountersignature: signedBy(key, other, req) })
      expect(await decided(receipt.uri)).toMatchObject({ outcome: 'settled', finding_code: null })
      const { trusted, untrusted, served } = await verifyTrusting(other, receipt.uri)
      expect(trusted).toMatchObject({ ok: true, confidential: true, brokerageAuthority: other })
      expect(untrusted).toMatchObject({ ok: true, confidential: false, findings: [{ severity: 'info', code: 'brokerage-untrusted' }] })
      // The AppView does not trust it.
      expect(served).toEqual(untrusted)
    })

    it('one that does not verify with its key, or whose document cannot be read, is refused', async () => {
      const r1 = await job(rig, 'bk-2')
      const bad = await writeReceipt(rig.acct, rig.published, r1, { ...HONEST, brokerageCountersignature: signedBy(P256Signer.generate(), other, r1) })
      expect(await decided(bad.uri)).toMatchObject({ outcome: 'refused', finding_code: 'brokerage-countersignature-invalid' })
      expect((await verifyTrusting(other, bad.uri)).trusted).toMatchObject(invalid)
      const r2 = await job(rig, 'bk-2')
      const unreadable = await writeReceipt(rig.acct, rig.published, r2, { ...HONEST, brokerageCountersignature: signedBy(key, 'did:web:127.0.0.1%3A9', r2) })
      expect(await decided(unreadable.uri)).toMatchObject({ outcome: 'refused', finding_code: 'brokerage-countersignature-invalid' })
    })
  })
})
