/**
 * The dispatch book's admission on its own: the daily token limit reserved at
 * admission and reconciled at completion, so jobs admitted together cannot
 * overshoot it; the hold and the floor; the ledger's CHECK behind them.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeEach, describe, expect, it } from 'vitest'
import { UsageCounters } from '../console/api-keys.ts'
import { AdmissionError } from '../console/exchange/admission.ts'
import { DispatchBook } from '../console/exchange/dispatch-book.ts'
import { InsufficientFundsError, ISSUANCE, Ledger } from '../console/exchange/ledger.ts'
import { DEFAULT_POLICY } from '../console/exchange/policy.ts'
import type { JobRecords } from '../console/publisher.ts'
import { openDb, type Db } from '../src/db/index.ts'

const dir = mkdtempSync(join(tmpdir(), 'cocore-book-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

const ALICE = 'did:plc:aliceaaaaaaaaaaaaaaaaaaa'
const policy = { ...DEFAULT_POLICY, floor: 10, tokenRate: { inputPerMTok: 1_000_000, outputPerMTok: 1_000_000 } }
let db: Db
let ledger: Ledger
let usage: UsageCounters
let n = 0

const records = (): JobRecords => {
  n++
  const expiresAt = new Date(Date.now() + 3600_000).toISOString()
  return {
    auth: { uri: `at://${ALICE}/dev.cocore.compute.paymentAuthorization/a${n}`, cid: `a${n}` },
    job: { uri: `at://${ALICE}/dev.cocore.compute.job/j${n}`, cid: `j${n}` },
    authRecord: { expiresAt },
    jobRecord: { expiresAt },
    publish: async () => undefined,
  }
}

function admitted(book: DispatchBook, inputBytes: number, maxTokensOut: number) {
  const r = records()
  try {
    book.admit({ requesterDid: ALICE, model: 'm', records: r, proBono: false, inputBytes, maxTokensOut, ceiling: book.ceilingFor(inputBytes, maxTokensOut), expiresAt: r.jobRecord.expiresAt as string })
    return r.job.uri
  } catch (err) {
    if (err instanceof AdmissionError) return null
    throw err
  }
}

beforeEach(() => {
  db = openDb(join(dir, `${++n}.sqlite`))
  ledger = new Ledger(db)
  usage = new UsageCounters(db)
  ledger.post('grant', 'grant:welcome', [{ account: ALICE, amount: 1_000 }, { account: ISSUANCE, amount: -1_000 }])
})

describe('the daily token limit', () => {
  it('is reserved at admission: jobs admitted together cannot use more than is left today', () => {
    const book = new DispatchBook({ db, policy, ledger: null, usage, dailyTokenLimit: 1_000 })
    usage.add(ALICE, null, { tokensIn: 100, tokensOut: 100 })
    // 800 left: two jobs that may use 300 each fit, a third does not.
    expect(admitted(book, 100, 200)).toBeTruthy()
    expect(admitted(book, 100, 200)).toBeTruthy()
    expect(admitted(book, 100, 200)).toBeNull()
    expect(admitted(book, 50, 100)).toBeTruthy()
  })

  it('is reconciled at completion: what a job did not use is free again', () => {
    const book = new DispatchBook({ db, policy, ledger: null, usage, dailyTokenLimit: 1_000 })
    const first = admitted(book, 100, 800)!
    expect(admitted(book, 100, 800)).toBeNull()
    book.dispatched(first, { did: 'did:plc:p', machine: 'k', recordUri: 'at://p/r/1', attestationKey: null })
    book.completed(first, { in: 40, out: 60 }, { chunks: 3, bytes: 60 })
    usage.add(ALICE, null, { tokensIn: 40, tokensOut: 60 })
    expect(book.get(first)!.reserved).toBe(0)
    expect(admitted(book, 100, 800)).toBeTruthy()
  })
})

describe('holds', () => {
  it('cover the ceiling of every job in flight and never exceed the balance; the floor applies to what is left', () => {
    const book = new DispatchBook({ db, policy, ledger, usage, dailyTokenLimit: 1e9 })
    // Ceilings of 400: two fit in 1,000; the third would leave the account below zero.
    const a = admitted(book, 100, 300)!
    expect(admitted(book, 100, 300)).toBeTruthy()
    expect(admitted(book, 100, 300)).toBeNull()
    expect(ledger.held(ALICE)).toBe(800)
    // 200 available: ceilings of 150 and then 45 fit; with 5 left the floor (10) is not met.
    expect(admitted(book, 50, 100)).toBeTruthy()
    expect(admitted(book, 20, 25)).toBeTruthy()
    expect(ledger.available(ALICE)).toBe(5)
    expect(admitted(book, 1, 1)).toBeNull() // under the floor
    // A job that never started gives its hold back at once.
    book.ended(a, 'unstarted', { chunks: 0, bytes: 0 })
    expect(ledger.available(ALICE)).toBe(405)
    expect(ledger.heldTotal()).toBe(book.holdsTotal())
  })

  it('are backed by a CHECK: no code path can hold or spend more than is available', () => {
    expect(() => db.$client.transaction(() => ledger.hold(ALICE, 1_001))()).toThrow(InsufficientFundsError)
    ledger.hold(ALICE, 600)
    expect(() => ledger.post('settlement', 'x', [{ account: ALICE, amount: -401 }, { account: 'did:plc:p', amount: 401 }])).toThrow(InsufficientFundsError)
    expect(() => db.$client.prepare('UPDATE ledger_balances SET balance = -5 WHERE account = ?').run(ALICE)).toThrow(/CHECK/)
    expect(() => db.$client.prepare('DELETE FROM ledger_entries').run()).toThrow(/append-only/)
    expect(ledger.balance(ALICE)).toBe(1_000)
  })
})
