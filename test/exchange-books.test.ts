/**
 * The exchange's books under a seeded randomized run: hundreds of jobs from
 * several requesters, sent to honest and dishonest providers, with receipts
 * from the machine the job went to, from other machines, from a bystander and
 * from the requester itself, inflated counts and prices, duplicates, jobs
 * that fail, are cancelled or never recorded, time passing deadlines, and the
 * exchange killed between any two steps (the database reopened, everything in
 * memory lost). The real dispatch book, ledger and settlement pipeline on a
 * SQLite file; the index is an in-memory stand-in holding signed records.
 *
 * After every step: the books sum to zero, no account is below zero or below
 * what is held for it, the holds equal the open jobs' holds, every closed job
 * holds nothing, each job is settled at most once, to the provider it was
 * sent to, within its ceiling, and only honest receipts are ever settled.
 *
 * COCORE_FUZZ_SEED and COCORE_FUZZ_CASES (jobs) make longer runs.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, expect, it } from 'vitest'
import type { ConsoleIndex } from '../appview/index.ts'
import { UsageCounters } from '../console/api-keys.ts'
import { AdmissionError } from '../console/exchange/admission.ts'
import { DispatchBook, tokenBounds } from '../console/exchange/dispatch-book.ts'
import { ISSUANCE, Ledger } from '../console/exchange/ledger.ts'
import { Outbox } from '../console/exchange/outbox.ts'
import { DEFAULT_POLICY, maxPrice, type EconomyPolicy } from '../console/exchange/policy.ts'
import { Settler } from '../console/exchange/settlement.ts'
import { loadSigningKey } from '../console/exchange/signing-key.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import { openDb, type Db } from '../src/db/index.ts'
import { attestationRecord, hex32, nonce, receiptRecord } from '../src/dev/records.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { JobRecords } from '../console/publisher.ts'
import { createHash } from 'node:crypto'
import { CID } from 'multiformats/cid'
import { create as digest } from 'multiformats/hashes/digest'

const SEED = Number(process.env.COCORE_FUZZ_SEED ?? 202113765)
const JOBS = Number(process.env.COCORE_FUZZ_CASES ?? 300)
const EXCHANGE = 'did:plc:exchangeexchangeexchange'
const POLICY: EconomyPolicy = { ...DEFAULT_POLICY, grant: 200_000, floor: 100, tokenRate: { inputPerMTok: 1_000_000, outputPerMTok: 2_000_000 } }

/** A CID (dag-cbor, sha-256) named by a string: records here are never encoded, but their refs must be CIDs. */
const cidOf = (name: string) => CID.createV1(0x71, digest(0x12, createHash('sha256').update(name).digest())).toString()

/** mulberry32: small, seeded, good enough to pick steps. */
function prng(seed: number) {
  let a = seed >>> 0
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
  return { next, int: (n: number) => Math.floor(next() * n), pick: <T>(xs: readonly T[]) => xs[Math.floor(next() * xs.length)]! }
}

type Rec = { uri: string; cid: string; did: string; collection: string; body: Record<string, unknown>; rowid: number }

/** The AppView's index as the settler reads it, in memory: what providers and bystanders publish. */
class MemoryIndex implements Pick<ConsoleIndex, 'receiptsAfter' | 'receiptsForJob' | 'record'> {
  private readonly rows: Rec[] = []
  add(r: Omit<Rec, 'rowid'>): Rec {
    const row = { ...r, rowid: this.rows.length + 1 }
    this.rows.push(row)
    return row
  }
  receiptsAfter(rowid: number, limit: number) {
    return this.rows.filter((r) => r.collection === ids.ComputeReceipt && r.rowid > rowid).slice(0, limit) as never
  }
  receiptsForJob(jobUri: string) {
    return this.rows.filter((r) => r.collection === ids.ComputeReceipt && (r.body.job as { uri: string }).uri === jobUri) as never
  }
  record(uri: string) {
    return this.rows.find((r) => r.uri === uri) as never
  }
}

interface Machine {
  did: string
  signer: P256Signer
  attestation: { uri: string; cid: string }
  honest: boolean
}

type ReceiptKind = 'honest' | 'inflated-out' | 'inflated-in' | 'over-rate' | 'wrong-machine' | 'bystander' | 'requester' | 'duplicate'

const dir = mkdtempSync(join(tmpdir(), 'cocore-books-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

it(`keeps the books over ${JOBS} randomized jobs with crashes between steps (seed ${SEED})`, () => {
  const rnd = prng(SEED)
  const dbPath = join(dir, 'console.sqlite')
  const key = loadSigningKey(undefined, join(dir, 'signing-key.json'))
  const index = new MemoryIndex()
  const refs = { policy: { uri: `at://${EXCHANGE}/${ids.ComputeExchangePolicy}/p`, cid: cidOf('policy') }, attestation: { uri: `at://${EXCHANGE}/${ids.ComputeExchangeAttestation}/a`, cid: cidOf('att') } }

  let db: Db
  let ledger: Ledger
  let book: DispatchBook
  let settler: Settler
  const boot = () => {
    db = openDb(dbPath)
    ledger = new Ledger(db)
    book = new DispatchBook({ db, policy: POLICY, ledger, usage: new UsageCounters(db), dailyTokenLimit: 1e12 })
    // As the console does at start: what the killed process was running ends as failed.
    book.recoverInterrupted()
    // Publication is not under test here: a repo that never answers keeps every settlement queued.
    const outbox = new Outbox(db, { did: EXCHANGE, put: () => new Promise(() => undefined) })
    settler = new Settler({ db, index, book, ledger, outbox, exchangeDid: EXCHANGE, policy: POLICY, refs, key })
    book.onReady = (jobUri) => settler.jobReady(jobUri)
  }
  boot()

  const machine = (n: number, honest: boolean): Machine => {
    const signer = P256Signer.generate()
    const did = `did:plc:provider${n}${'a'.repeat(16)}`
    const att = index.add({ uri: `at://${did}/${ids.ComputeAttestation}/a${n}`, cid: cidOf(`att${n}`), did, collection: ids.ComputeAttestation, body: attestationRecord(signer) })
    return { did, signer, attestation: { uri: att.uri, cid: att.cid }, honest }
  }
  const machines = [machine(1, true), machine(2, true), machine(3, true), machine(4, false)]
  const bystander = machine(9, false)
  const requesters = ['did:plc:requesteraaaaaaaaaaaaaaaa', 'did:plc:requesterbbbbbbbbbbbbbbbb', 'did:plc:requestercccccccccccccccc']
  for (const r of requesters) ledger!.post('grant', `grant:welcome:${r}`, [{ account: r, amount: POLICY.grant }, { account: ISSUANCE, amount: -POLICY.grant }])
  // Requesters that also run a machine: their receipts for their own jobs are self-loops only when dispatched so.
  const requesterMachine = new Map(requesters.map((r, i) => [r, { ...machine(20 + i, true), did: r }]))

  /** What the simulation knows of each job (the exchange process's memory is what a crash loses). */
  interface Sim {
    uri: string
    requester: string
    machine: Machine | null
    live: boolean
    ceiling: number
    kinds: ReceiptKind[]
  }
  const jobs: Sim[] = []
  const receiptKind = new Map<string, ReceiptKind>()
  let now = Date.now()
  let admitted = 0
  let refusedAdmission = 0
  let crashes = 0

  const admit = () => {
    const requester = rnd.pick(requesters)
    const proBono = rnd.next() < 0.1
    const inputBytes = 20 + rnd.int(400)
    const maxTokensOut = 1 + rnd.int(1500)
    const ceiling = proBono ? 0 : book.ceilingFor(inputBytes, maxTokensOut)
    const n = jobs.length
    const expiresAt = new Date(now + 3600_000).toISOString()
    const auth = { $type: ids.ComputePaymentAuthorization, exchange: EXCHANGE, ceiling: { amount: ceiling, currency: 'CC' }, scope: 'singleJob', nonce: nonce(), expiresAt, createdAt: new Date(now).toISOString() }
    const authRef = { uri: `at://${requester}/${ids.ComputePaymentAuthorization}/a${n}`, cid: cidOf(`auth${n}`) }
    const job = { $type: ids.ComputeJob, model: 'm', inputCommitment: hex32(), maxTokensOut, priceCeiling: { amount: ceiling, currency: 'CC' }, acceptedTrustLevel: 'self-attested', paymentAuthorization: authRef, nonce: nonce(), expiresAt, createdAt: new Date(now).toISOString() }
    const records: JobRecords = { auth: authRef, job: { uri: `at://${requester}/${ids.ComputeJob}/j${n}`, cid: cidOf(`job${n}`) }, authRecord: auth, jobRecord: job, publish: async () => undefined }
    try {
      book.admit({ requesterDid: requester, model: 'm', records, proBono, inputBytes, maxTokensOut, ceiling, expiresAt })
      admitted++
      jobs.push({ uri: records.job.uri, requester, machine: null, live: true, ceiling, kinds: [] })
    } catch (err) {
      if (!(err instanceof AdmissionError)) throw err
      refusedAdmission++
    }
  }

  const liveJobs = () => jobs.filter((j) => j.live)
  const stepJob = () => {
    const j = rnd.pick(liveJobs())
    const row = book.get(j.uri)!
    const r = rnd.next()
    if (row.state === 'admitted' || (row.state === 'running' && r < 0.15)) {
      // Sent (again, on a failover) to a machine; a requester's own machine now and then.
      const m = rnd.next() < 0.1 ? requesterMachine.get(j.requester)! : rnd.pick(machines)
      j.machine = m
      book.dispatched(j.uri, { did: m.did, machine: `${m.did} key`, recordUri: `at://${m.did}/${ids.ComputeProvider}/r`, attestationKey: Buffer.from(m.signer.rawPublicKey()).toString('base64') })
      return
    }
    if (row.state === 'running') {
      const relayed = { chunks: 1 + rnd.int(30), bytes: rnd.int(2000) }
      if (r < 0.7) {
        const liar = !j.machine!.honest
        book.completed(j.uri, { in: liar ? 10 ** 8 : rnd.int(row.inputBytes + 1), out: liar ? 10 ** 9 : rnd.int(relayed.bytes + 1) }, relayed)
        if (rnd.next() < 0.9) book.recorded(j.uri)
      } else if (r < 0.8) book.ended(j.uri, 'cancelled', relayed)
      else if (r < 0.9) book.ended(j.uri, 'failed', relayed)
      else book.ended(j.uri, 'unstarted', relayed)
      j.live = false
      return
    }
    j.live = false
  }

  const publishReceipt = () => {
    const withMachine = jobs.filter((j) => j.machine)
    if (!withMachine.length) return
    // Mostly the jobs waiting for a receipt, so that most honest receipts are ones that can be paid.
    const waiting = withMachine.filter((j) => ['completed', 'cancelled'].includes(book.get(j.uri)!.state))
    const j = rnd.pick(waiting.length && rnd.next() < 0.7 ? waiting : withMachine)
    const row = book.get(j.uri)!
    const bounds = tokenBounds(row)
    // While the job runs its bounds can still grow, so a lie is only told (and judged a lie) against final ones.
    // A pro bono receipt counts no tokens at all: its lie would be a charge (refused as pro-bono-charged by the suite on the network).
    const final = row.state !== 'admitted' && row.state !== 'running' && !row.proBono
    const kinds: ReceiptKind[] = final ? ['honest', 'honest', 'honest', 'inflated-out', 'inflated-in', 'over-rate', 'wrong-machine', 'bystander', 'requester'] : ['honest', 'wrong-machine', 'bystander', 'requester']
    const kind: ReceiptKind = j.kinds.length && rnd.next() < 0.2 ? 'duplicate' : rnd.pick(kinds)
    let signerOf: Machine = j.machine!
    if (kind === 'wrong-machine') signerOf = rnd.pick(machines.filter((m) => m.did !== j.machine!.did))
    if (kind === 'bystander') signerOf = bystander
    if (kind === 'requester') signerOf = requesterMachine.get(j.requester)!
    const tokens = { in: Math.max(0, Math.min(bounds.in, row.reportedIn ?? bounds.in)), out: Math.max(0, Math.min(bounds.out, rnd.int(bounds.out + 1))) }
    if (kind === 'inflated-out') tokens.out = bounds.out + 1 + rnd.int(10 ** 6)
    if (kind === 'inflated-in') tokens.in = bounds.in + 1 + rnd.int(10 ** 6)
    if (row.proBono) {
      tokens.in = 0
      tokens.out = 0
    }
    let price = row.proBono ? 0 : Math.min(row.ceiling, maxPrice(POLICY, tokens))
    if (kind === 'over-rate') price = maxPrice(POLICY, tokens) + 1
    const body = receiptRecord(signerOf.signer, {
      job: { uri: row.jobUri, cid: row.jobCid },
      requester: row.requesterDid,
      attestation: signerOf.attestation,
      inputCommitment: (row.jobRecord as { inputCommitment: string }).inputCommitment,
      model: 'm',
      price,
      tokens,
      ...(row.proBono ? { proBono: true } : {}),
    })
    const n = receiptKind.size
    const uri = `at://${signerOf.did}/${ids.ComputeReceipt}/r${n}`
    index.add({ uri, cid: cidOf(`receipt${n}`), did: signerOf.did, collection: ids.ComputeReceipt, body })
    receiptKind.set(uri, kind)
    j.kinds.push(kind)
  }

  const check = (where: string) => {
    expect(ledger.total(), where).toBe(0)
    expect(ledger.unbalanced(), where).toEqual([])
    expect(ledger.drift(), where).toEqual([])
    expect(ledger.heldTotal(), where).toBe(book.holdsTotal())
    expect(db.$client.prepare("SELECT account FROM ledger_balances WHERE substr(account, 1, 1) != '@' AND (balance < 0 OR held < 0 OR balance - held < 0)").all(), where).toEqual([])
    expect(db.$client.prepare("SELECT job_uri FROM exchange_jobs WHERE state NOT IN ('admitted', 'running', 'completed', 'cancelled') AND hold != 0").all(), where).toEqual([])
    const settled = db.$client
      .prepare("SELECT s.receipt_uri AS receipt, s.job_uri AS job, s.provider_did AS provider, s.amount, j.provider_did AS sentTo, j.ceiling FROM settlements s LEFT JOIN exchange_jobs j ON j.job_uri = s.job_uri WHERE s.outcome = 'settled'")
      .all() as { receipt: string; job: string; provider: string; amount: number; sentTo: string; ceiling: number }[]
    expect(new Set(settled.map((s) => s.job)).size, where).toBe(settled.length)
    for (const s of settled) {
      expect(s.provider, where).toBe(s.sentTo)
      expect(s.amount, where).toBeLessThanOrEqual(s.ceiling)
      // Lies never pay; a receipt from another repo pays only if the job was (re)sent there, as checked above.
      expect(['inflated-out', 'inflated-in', 'over-rate', 'bystander'], `${where}: ${s.receipt} settled`).not.toContain(receiptKind.get(s.receipt))
    }
  }

  const steps: [number, () => void][] = [
    [0.25, admit],
    [0.35, () => liveJobs().length && stepJob()],
    [0.22, publishReceipt],
    [0.16, () => void settler.pass()],
    // An hour or two passes: jobs admitted before it are past their deadline (expiry + the grace).
    [0.005, () => (now += (1 + rnd.int(2)) * 3600_000, void book.expire(now))],
    [0.015, () => {
      // Killed: the process's memory (the jobs it was running, the settler's ready set) is gone.
      db.$client.close()
      for (const j of jobs) j.live = false
      crashes++
      boot()
    }],
  ]
  for (let i = 0; admitted < JOBS; i++) {
    let r = rnd.next()
    const step = steps.find(([p]) => (r -= p) < 0)?.[1] ?? steps[0]![1]
    step()
    check(`step ${i}`)
  }
  // Every receipt looked at once more, deadlines passed: nothing held, nothing decided twice.
  settler!.pass()
  book!.expire(now + 10 * 3600_000)
  check('end')
  expect(ledger!.heldTotal()).toBe(0)
  const outcomes = db!.$client.prepare('SELECT outcome, COUNT(*) AS n FROM settlements GROUP BY outcome').all() as { outcome: string; n: number }[]
  const count = (o: string) => outcomes.find((x) => x.outcome === o)?.n ?? 0
  if (process.env.COCORE_BOOKS_DEBUG) console.log(db!.$client.prepare('SELECT outcome, finding_code, MAX(finding_message) AS m, COUNT(*) AS n FROM settlements GROUP BY 1, 2').all(), { admitted, refusedAdmission, crashes })
  // The run exercised what it claims to: settlements, refusals, crashes, refused admissions.
  expect(count('settled')).toBeGreaterThan(10)
  expect(count('refused')).toBeGreaterThan(10)
  expect(crashes).toBeGreaterThan(5)
  expect(refusedAdmission + admitted).toBeGreaterThanOrEqual(JOBS)
  // A dishonest receipt (inflated, over the rate, from another repo) never settled, checked after every step above.
  db!.$client.close()
  // Long runs check the whole book after every step: their time grows with the jobs.
}, Math.max(120_000, JOBS * 400))
