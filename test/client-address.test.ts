/**
 * The client address behind reverse proxies (src/net/client-address.ts):
 * X-Forwarded-For is read only from a trusted proxy, from the right, up to the
 * first address that is not a trusted proxy. End to end, over real TCP
 * connections from different loopback addresses: two clients behind one
 * trusted proxy get separate limits, while a peer that is not a trusted proxy
 * cannot leave its limit by sending a different X-Forwarded-For each time.
 *
 *   npx vitest run test/client-address.test.ts
 */
import { request } from 'node:http'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { generateKey } from '../console/api-keys.ts'
import type { ConsoleService } from '../console/index.ts'
import { loadConfig } from '../src/config.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { clientAddress, InvalidCidrError, normalizeAddress, resolveClientAddress, TrustedProxies } from '../src/net/client-address.ts'
import { startTestConsole } from './fixture/console.ts'

const proxies = new TrustedProxies(['10.0.0.0/8', '2001:db8:ffff::/48', '192.0.2.1'])
const resolve = (peer: string | undefined, xff?: string) => resolveClientAddress(peer, xff, proxies)

describe('resolveClientAddress', () => {
  it('ignores X-Forwarded-For from a peer that is not a trusted proxy', () => {
    expect(resolve('203.0.113.9', '198.51.100.1')).toBe('203.0.113.9')
    expect(resolve('203.0.113.9', '10.0.0.1')).toBe('203.0.113.9')
    expect(resolveClientAddress('10.0.0.2', '198.51.100.1', TrustedProxies.none)).toBe('10.0.0.2')
  })

  it('takes the rightmost address that is not a trusted proxy, so what the client wrote to its left is never read', () => {
    expect(resolve('10.0.0.2', '198.51.100.1')).toBe('198.51.100.1')
    // The client sent "X-Forwarded-For: 1.1.1.1"; the proxy appended its real address.
    expect(resolve('10.0.0.2', '1.1.1.1, 198.51.100.1')).toBe('198.51.100.1')
    // Two proxies of ours in a row.
    expect(resolve('10.0.0.2', '1.1.1.1, 198.51.100.1, 10.1.1.1')).toBe('198.51.100.1')
    expect(resolve('192.0.2.1', '198.51.100.1,192.0.2.1')).toBe('198.51.100.1')
    // Repeated headers arrive joined with commas.
    expect(clientAddress({ headers: { 'x-forwarded-for': ['1.1.1.1', '198.51.100.4'] as unknown as string }, socket: { remoteAddress: '10.9.9.9' } }, proxies)).toBe('198.51.100.4')
    expect(clientAddress({ headers: { 'x-forwarded-for': '198.51.100.5' }, socket: { remoteAddress: '::ffff:10.0.0.3' } }, proxies)).toBe('198.51.100.5')
  })

  it('uses the peer when a trusted proxy sends no header, and the leftmost hop when every hop is trusted', () => {
    expect(resolve('10.0.0.2')).toBe('10.0.0.2')
    expect(resolve('10.0.0.2', '  ')).toBe('10.0.0.2')
    expect(resolve('10.0.0.2', '10.0.0.7, 10.0.0.8')).toBe('10.0.0.7')
  })

  it('reads IPv6: peers, hops, brackets, ports, zones, IPv4-mapped addresses', () => {
    expect(resolve('2001:db8:ffff:1::2', '2001:DB8:1::77')).toBe('2001:db8:1::77')
    expect(resolve('2001:db8:ffff::1', '[2001:db8:1::77]:4711')).toBe('2001:db8:1::77')
    expect(resolve('2001:db8:ffff::1', '198.51.100.1:4711')).toBe('198.51.100.1')
    expect(resolve('2001:db8:ffff::1', 'fe80::1%eth0')).toBe('fe80::1')
    // A dual-stack listener reports IPv4 peers as IPv4-mapped IPv6; they match IPv4 ranges.
    expect(resolve('::ffff:10.0.0.2', '2001:db8:1::77')).toBe('2001:db8:1::77')
    expect(resolve('::ffff:203.0.113.9', '198.51.100.1')).toBe('203.0.113.9')
    // Outside the trusted /48: the header is not read.
    expect(resolve('2001:db8:fffe::1', '198.51.100.1')).toBe('2001:db8:fffe::1')
  })

  it('stops at a malformed hop: the trusted proxy that wrote it answers for the request', () => {
    expect(resolve('10.0.0.2', 'unknown')).toBe('10.0.0.2')
    expect(resolve('10.0.0.2', '198.51.100.1, garbage')).toBe('10.0.0.2')
    expect(resolve('10.0.0.2', '198.51.100.1, , 10.0.0.5')).toBe('10.0.0.5')
    expect(resolve('10.0.0.2', '999.1.1.1')).toBe('10.0.0.2')
    // A malformed entry left of the client's own address is never read.
    expect(resolve('10.0.0.2', 'garbage, 198.51.100.1')).toBe('198.51.100.1')
    expect(resolve(undefined, '198.51.100.1')).toBeUndefined()
  })

  it('normalizes addresses and refuses what is not one', () => {
    expect(normalizeAddress('::FFFF:203.0.113.7')).toBe('203.0.113.7')
    expect(normalizeAddress('[::1]')).toBe('::1')
    for (const bad of ['', 'localhost', '1.2.3', '1.2.3.4.5', '[1.2.3.4', '::g', '1.2.3.4:99999']) expect(normalizeAddress(bad), bad).toBeUndefined()
  })
})

describe('TrustedProxies', () => {
  it('takes IPv4 and IPv6 CIDRs and bare addresses, and refuses anything else', () => {
    expect(proxies.has('10.255.0.1')).toBe(true)
    expect(proxies.has('11.0.0.1')).toBe(false)
    expect(proxies.has('192.0.2.1')).toBe(true)
    expect(proxies.has('192.0.2.2')).toBe(false)
    expect(proxies.has('2001:db8:ffff:abcd::1')).toBe(true)
    expect(TrustedProxies.none.has('127.0.0.1')).toBe(false)
    for (const bad of ['10.0.0.0/33', '2001:db8::/129', 'example.com/8', '10.0.0.0/8/8', '10.0.0.0/', '10.0.0.0/-1', ' /8']) {
      expect(() => new TrustedProxies([bad]), bad).toThrow(InvalidCidrError)
    }
  })

  it('is the COCORE_TRUSTED_PROXIES setting, empty by default and checked at start', () => {
    expect(loadConfig({}).trustedProxies).toEqual([])
    expect(loadConfig({ COCORE_TRUSTED_PROXIES: '10.0.0.0/8, 2001:db8::/32' }).trustedProxies).toEqual(['10.0.0.0/8', '2001:db8::/32'])
    expect(() => loadConfig({ COCORE_TRUSTED_PROXIES: '10.0.0.0/8,nonsense' })).toThrow(/COCORE_TRUSTED_PROXIES: not a CIDR: "nonsense"/)
  })
})

describe('behind a trusted reverse proxy, end to end', () => {
  const PROXY = '127.0.0.10'
  const FAILURES_PER_MIN = 5
  let svc: ConsoleService

  beforeAll(async () => {
    svc = await startTestConsole(null, 'http://127.0.0.1:1', { trustedProxies: [`${PROXY}/32`], apiKeyIpFailuresPerMinute: FAILURES_PER_MIN, loginRatePerMinute: 2 })
  })
  afterAll(async () => {
    await svc?.close()
  })

  /** A request over a real TCP connection from a given local address, with the headers given. */
  const from = (address: string, path: string, headers: Record<string, string>, method = 'GET', body = ''): Promise<number> =>
    new Promise((done, fail) => {
      const req = request(new URL(path, svc.localUrl), { method, localAddress: address, agent: false, headers }, (res) => {
        res.resume()
        res.on('end', () => done(res.statusCode!))
      })
      req.on('error', fail)
      req.end(body)
    })
  const guess = (address: string, xff?: string) => from(address, `/xrpc/${ids.AccountListApiKeys}`, { authorization: `Bearer ${generateKey()}`, ...(xff ? { 'x-forwarded-for': xff } : {}) })

  it('gives two clients behind one proxy their own API-key limits', async () => {
    const first: number[] = []
    for (let i = 0; i <= FAILURES_PER_MIN; i++) first.push(await guess(PROXY, '198.51.100.1'))
    expect(first).toEqual([...Array<number>(FAILURES_PER_MIN).fill(401), 429])
    // The other client, through the same proxy, is not limited by the first one's guesses.
    expect(await guess(PROXY, '198.51.100.2')).toBe(401)
    // The first client cannot leave its limit by writing another address to the left of its own.
    expect(await guess(PROXY, '198.51.100.3, 198.51.100.1')).toBe(429)
  })

  it('does not let a peer that is not a trusted proxy escape its limit with X-Forwarded-For', async () => {
    const SPOOFER = '127.0.0.11'
    const seen: number[] = []
    for (let i = 0; i <= FAILURES_PER_MIN + 2; i++) seen.push(await guess(SPOOFER, `203.0.113.${i + 1}`))
    expect(seen).toEqual([...Array<number>(FAILURES_PER_MIN).fill(401), 429, 429, 429])
  })

  it('limits sign-in attempts per client behind the proxy too', async () => {
    const login = (xff: string) =>
      from(PROXY, '/login', { origin: svc.url, 'content-type': 'application/x-www-form-urlencoded', 'x-forwarded-for': xff }, 'POST', 'identifier=nobody.invalid')
    expect([await login('198.51.100.20'), await login('198.51.100.20'), await login('198.51.100.20')]).toEqual([400, 400, 429])
    expect(await login('198.51.100.21')).toBe(400)
  })
})
