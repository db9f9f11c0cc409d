/**
 * API-key limits per client address, against the real console (an exchange,
 * so both the XRPC methods and the OpenAI-compatible `/v1` API are served),
 * over real TCP connections from different loopback addresses (127.0.0.x):
 * the address the console sees is the socket's peer, as in production.
 *
 * - Refused keys (unknown, checksum-broken, revoked, expired, malformed, none)
 *   from one address reach its limit, on XRPC and /v1 together; beyond it
 *   every key request from that address gets 429 with Retry-After in the
 *   protocol's error shape, the same bytes for a live key as for a guessed
 *   one, and the live key is not admitted (nothing counted for it).
 * - Another address is not affected.
 * - One address using several live keys is bounded by the per-address limit.
 * - Retry-After is honest: after waiting it, requests pass again; and, on the
 *   gate itself with an injected clock, it is the least whole number of
 *   seconds that works (rounded up, never down) for each of the three limits.
 * - IPv6 clients are limited by their /64.
 *
 *   npx vitest run test/api-key-ip-limit.test.ts
 */
import { request } from 'node:http'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ApiKeys, generateKey, KeyGate, limitedAddress, type ApiKey, type KeyRefusal } from '../console/api-keys.ts'
import type { ConsoleService } from '../console/index.ts'
import type { LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { startStack, type Stack } from './fixture/stack.ts'

/** Small limits, so the tests reach them in a few hundred local requests and Retry-After is one second. */
const FAILURES_PER_MIN = 60
const CALLS_PER_MIN = 120
/** Requests a limit may let through beyond its burst, refilled while the loop runs (five to ten seconds of refill at these rates). */
const SLACK = 10

let stack: Stack
let svc: ConsoleService
let alice: LocalAccount
let keys: ApiKeys

beforeAll(async () => {
  stack = await startStack({
    accounts: ['alice.test', 'market.test'],
    browser: false,
    console: ([, market], av) => ({
      index: av.consoleIndex(),
      exchangeDid: market.did,
      // Far above what any one key sends here: every 429 below is the address's.
      apiKeyRatePerMinute: 10_000,
      apiKeyIpRatePerMinute: CALLS_PER_MIN,
      apiKeyIpFailuresPerMinute: FAILURES_PER_MIN,
    }),
  })
  svc = stack.svc
  alice = stack.accounts[0]!
  keys = new ApiKeys(svc.db)
}, 120_000)
afterAll(async () => {
  await stack?.close()
})

const liveKey = (name: string) => keys.create(alice.did, name, ['keys:manage', 'inference'])

/** What a client sees of an answer: status, headers but Date, and the body. */
type Seen = { status: number; headers: Record<string, string>; body: string; json: any }

/** A GET from a given local source address (a real TCP connection from it). */
function from(address: string, path: string, authorization?: string): Promise<Seen> {
  const url = new URL(path, svc.localUrl)
  return new Promise((resolve, reject) => {
    const req = request(url, { localAddress: address, agent: false, headers: authorization === undefined ? {} : { authorization } }, (res) => {
      const parts: Buffer[] = []
      res.on('data', (b: Buffer) => parts.push(b))
      res.on('end', () => {
        const body = Buffer.concat(parts).toString('utf8')
        const { date: _date, ...headers } = res.headers as Record<string, string>
        resolve({ status: res.statusCode!, headers, body, json: JSON.parse(body) })
      })
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end()
  })
}

const XRPC = `/xrpc/${ids.AccountListApiKeys}`
// /v1/models is public (as on the network): the keyed listing is per tier.
const V1 = '/v1/private/models'
const bearer = (k: string) => `Bearer ${k}`

const usageOf = (keyId: string) => svc.db.$client.prepare('SELECT coalesce(sum(requests), 0) FROM usage_daily WHERE key_id = ?').pluck().get(keyId) as number

const sleepSec = (s: number) => new Promise((r) => setTimeout(r, s * 1000))

/** Sends `send(i)` until a 429 or `max` requests; the answers, in order. */
async function until429(send: (i: number) => Promise<Seen>, max: number): Promise<Seen[]> {
  const out: Seen[] = []
  for (let i = 0; i < max; i++) {
    const r = await send(i)
    out.push(r)
    if (r.status === 429) break
  }
  return out
}

describe('API-key limits per client address', () => {
  it('refused keys from one address reach its limit on XRPC and /v1, then every key request from it gets the same 429', async () => {
    const A = '127.0.0.2'
    const revoked = liveKey('revoked')
    keys.revoke(alice.did, revoked.key.id)
    const expired = keys.create(alice.did, 'expired', ['keys:manage', 'inference'], new Date(Date.now() - 60_000).toISOString())
    const live = liveKey('live')
    const broken = live.secret.slice(0, -1) + (live.secret.endsWith('A') ? 'B' : 'A')
    // Every kind of refused key, alternating between the two APIs: both count against one limit.
    const failing: (string | undefined)[] = [bearer(generateKey()), bearer(broken), bearer(revoked.secret), bearer(expired.secret), 'Basic YWxpY2U6cHc=', 'Bearer cocore_short']
    const attempts = await until429((i) => {
      const auth = failing[i % failing.length]
      // The OpenAI API also counts a request without any key; XRPC takes that as a request for a session.
      return i % 2 ? from(A, V1, i % 12 === 11 ? undefined : auth) : from(A, XRPC, auth)
    }, FAILURES_PER_MIN + SLACK)

    const refused = attempts.slice(0, FAILURES_PER_MIN)
    expect(refused.filter((r, i) => (i % 2 ? r.json.error?.code === 'invalid_api_key' : r.json.error === 'AuthRequired') && r.status === 401)).toHaveLength(FAILURES_PER_MIN)
    const last = attempts.at(-1)!
    expect(last.status).toBe(429)
    expect(attempts.length).toBeGreaterThan(FAILURES_PER_MIN)

    // Blocked: a live key gets byte for byte what a guessed key gets, on each API, and is not admitted.
    const before = usageOf(live.key.id)
    const xGuess = await from(A, XRPC, bearer(generateKey()))
    const xLive = await from(A, XRPC, bearer(live.secret))
    const vGuess = await from(A, V1, bearer(generateKey()))
    const vLive = await from(A, V1, bearer(live.secret))
    expect(xGuess.status).toBe(429)
    expect(xGuess.json.error).toBe('RateLimitExceeded')
    expect(xGuess.headers['retry-after']).toBe('1')
    expect(xLive).toEqual(xGuess)
    expect(vGuess.status).toBe(429)
    expect(vGuess.json.error).toMatchObject({ type: 'rate_limit_error', code: 'rate_limit_exceeded' })
    expect(vGuess.headers['retry-after']).toBe('1')
    expect(vLive).toEqual(vGuess)
    expect(usageOf(live.key.id)).toBe(before)

    // Another address is not affected: its refused keys are refused, its live key works.
    const B = '127.0.0.3'
    expect((await from(B, XRPC, bearer(generateKey()))).status).toBe(401)
    expect((await from(B, V1, bearer(generateKey()))).status).toBe(401)
    const xOther = await from(B, XRPC, bearer(live.secret))
    expect(xOther.status).toBe(200)
    expect(xOther.json.keys.some((k: { id: string }) => k.id === live.key.id)).toBe(true)
    expect((await from(B, V1, bearer(live.secret))).json.object).toBe('list')

    // Retry-After is honest: after waiting it, the live key passes from the blocked address again.
    await sleepSec(Number(vLive.headers['retry-after']))
    const again = await from(A, XRPC, bearer(live.secret))
    expect(again.status).toBe(200)
    // Counted: the two calls from B and this one.
    expect(usageOf(live.key.id)).toBe(before + 3)
  })

  it('bounds one address using several live keys by its call limit, whatever the keys', async () => {
    const C = '127.0.0.4'
    const several = [liveKey('one'), liveKey('two'), liveKey('three'), liveKey('four')]
    const fresh = liveKey('unused')
    const calls = await until429((i) => from(C, i % 2 ? V1 : XRPC, bearer(several[i % several.length]!.secret)), CALLS_PER_MIN + SLACK)
    expect(calls.slice(0, CALLS_PER_MIN).every((r) => r.status === 200)).toBe(true)
    expect(calls.length).toBeGreaterThan(CALLS_PER_MIN)
    // No key came near its own limit (10,000 a minute): the address's limit answered.
    for (const k of several) expect(usageOf(k.key.id)).toBeLessThanOrEqual(Math.ceil((CALLS_PER_MIN + SLACK) / several.length))
    const limited = calls.at(-1)!
    expect(limited.status).toBe(429)

    // A key this address never used gets the same bytes as a guessed one: the keys play no part.
    const xFresh = await from(C, XRPC, bearer(fresh.secret))
    expect(xFresh.status).toBe(429)
    expect(xFresh.json.error).toBe('RateLimitExceeded')
    expect(await from(C, XRPC, bearer(generateKey()))).toEqual(xFresh)
    const vFresh = await from(C, V1, bearer(fresh.secret))
    expect(vFresh.status).toBe(429)
    expect(vFresh.json.error.type).toBe('rate_limit_error')
    expect(await from(C, V1, bearer(generateKey()))).toEqual(vFresh)
    expect(usageOf(fresh.key.id)).toBe(0)

    // The same keys from another address work.
    expect((await from('127.0.0.5', XRPC, bearer(several[0]!.secret))).status).toBe(200)
    expect((await from('127.0.0.5', V1, bearer(fresh.secret))).status).toBe(200)

    // After Retry-After, the address may call again.
    await sleepSec(Number(vFresh.headers['retry-after']))
    expect((await from(C, V1, bearer(fresh.secret))).status).toBe(200)
  })
})

describe('Retry-After, on the gate with its clock in hand', () => {
  const refusal = (r: ApiKey | KeyRefusal) => ('refused' in r ? r : null)
  /** The answer `admit` gives `retryAfterSec` whole seconds later, and one second less than that. */
  const honest = (gate: KeyGate, auth: string, ip: string, at: number, retryAfterSec: number) => ({
    early: refusal(gate.admit(auth, ip, at + (retryAfterSec - 1) * 1000))?.refused,
    onTime: refusal(gate.admit(auth, ip, at + retryAfterSec * 1000))?.refused,
  })

  // Rates whose refill is not a whole number of seconds: the advice must be rounded up, never down.
  for (const perMinute of [7, 20, 45]) {
    it(`is the least whole number of seconds after which a request passes (${perMinute} a minute)`, () => {
      const live = bearer(liveKey(`clock-${perMinute}`).secret)
      const hash = (ip: string | undefined) => (ip ? `h:${ip}` : null)
      const t0 = 1_000_000
      const open = { perKeyPerMinute: 1e6, perAddressPerMinute: 1e6, failuresPerAddressPerMinute: 1e6 }
      // Each limit in turn: filled within a second (partly refilled meanwhile), then the live key is refused.
      const cases = [
        { limits: { ...open, failuresPerAddressPerMinute: perMinute }, fill: () => bearer(generateKey()), filled: 'invalid', refused: 'address' },
        { limits: { ...open, perAddressPerMinute: perMinute }, fill: () => live, filled: undefined, refused: 'address' },
        { limits: { ...open, perKeyPerMinute: perMinute }, fill: () => live, filled: undefined, refused: 'key' },
      ] as const
      for (const c of cases) {
        const gate = new KeyGate(keys, c.limits, hash)
        for (let i = 0; i < perMinute; i++) expect(refusal(gate.admit(c.fill(), '10.0.0.1', t0 + i * 10))?.refused).toBe(c.filled)
        const at = t0 + perMinute * 10
        const r = refusal(gate.admit(live, '10.0.0.1', at))
        expect(r?.refused).toBe(c.refused)
        expect(honest(gate, live, '10.0.0.1', at, (r as { retryAfterSec: number }).retryAfterSec)).toEqual({ early: c.refused, onTime: undefined })
      }
    })
  }
})

describe('limitedAddress', () => {
  it('keys IPv4 (and IPv4-mapped) addresses whole and IPv6 addresses by their /64', () => {
    expect(limitedAddress('203.0.113.7')).toBe('203.0.113.7')
    expect(limitedAddress('::ffff:203.0.113.7')).toBe('203.0.113.7')
    expect(limitedAddress('203.0.113.8')).not.toBe(limitedAddress('203.0.113.7'))
    // One /64, however written.
    const net64 = limitedAddress('2001:db8:a:b::1')
    expect(net64).toBe('2001:db8:a:b::/64')
    for (const a of ['2001:db8:a:b:ffff:ffff:ffff:ffff', '2001:0db8:000a:000b:0:0:0:2', '2001:db8:a:b::1.2.3.4', '2001:db8:a:b::1%eth0']) {
      expect(limitedAddress(a)).toBe(net64)
    }
    expect(limitedAddress('2001:db8:a:c::1')).not.toBe(net64)
    expect(limitedAddress('::1')).toBe('0:0:0:0::/64')
    expect(limitedAddress(undefined)).toBeUndefined()
  })
})
