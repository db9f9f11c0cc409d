/**
 * The AppView's public reads around their handlers: Cache-Control and ETag
 * on every answer, 304 to a matching If-None-Match, identical answers served
 * again only while the index is unchanged (or, for answers that depend on
 * the time, for a moment), and a limit per client address (429 with
 * Retry-After) that counts each address alone and the AppView's own methods
 * only.
 */
import { describe, expect, it } from 'vitest'
import { TID } from '@atproto/common-web'
import { CID } from 'multiformats/cid'
import { create as digest } from 'multiformats/hashes/digest'
import { sha256 } from '@noble/hashes/sha2.js'
import { createApp } from '../appview/server.ts'
import { IndexStore } from '../appview/indexer/store.ts'
import type { PublicReadOpts } from '../appview/api/public-reads.ts'
import { openDb } from '../src/db/index.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import { tempDbPath } from './fixture/appview.ts'

const DID = 'did:plc:publicreadszzzzzzzzzzzzz'

function world(publicReads: Partial<PublicReadOpts> = {}) {
  const db = openDb(tempDbPath('reads'))
  const store = new IndexStore(db)
  const app = createApp({ db, store, validateOutput: true, publicReads })
  const profile = (displayName: string) => {
    const record = { $type: ids.AccountProfile, displayName, createdAt: new Date().toISOString() }
    store.tx(() => store.applyCommit(DID, TID.nextStr(), [{ action: 'create', uri: `at://${DID}/${ids.AccountProfile}/self`, did: DID, collection: ids.AccountProfile, rkey: 'self', cid: cidOf(displayName), record }]))
  }
  /** A request as the Node adapter hands it over, from `address`. */
  const from = (address: string, path: string, headers: Record<string, string> = {}) => app.request(path, { headers }, { incoming: { socket: { remoteAddress: address }, headers: {} } })
  return { db, store, app, profile, from }
}

/** A valid CID per text (what the store compares to tell a rewrite from a replay). */
const cidOf = (text: string) => CID.createV1(0x71, digest(0x12, sha256(new TextEncoder().encode(text)))).toString()

const PROFILES = `/xrpc/${ids.AccountListProfiles}?limit=5`

describe('public reads: caching', () => {
  it('answers with Cache-Control and an ETag, and 304 with no body to a matching If-None-Match', async () => {
    const w = world()
    w.profile('one')
    const first = await w.app.request(PROFILES)
    expect(first.status).toBe(200)
    expect(first.headers.get('cache-control')).toBe('public, max-age=5')
    const etag = first.headers.get('etag')!
    expect(etag).toMatch(/^"[0-9a-z.]+"$/)
    const body = await first.text()

    const again = await w.app.request(PROFILES, { headers: { 'If-None-Match': etag } })
    expect(again.status).toBe(304)
    expect(await again.text()).toBe('')
    expect(again.headers.get('etag')).toBe(etag)
    // A list of tags, or a weak form of the same one, matches too; another tag does not.
    expect((await w.app.request(PROFILES, { headers: { 'If-None-Match': `"x", W/${etag}` } })).status).toBe(304)
    const other = await w.app.request(PROFILES, { headers: { 'If-None-Match': '"x"' } })
    expect(other.status).toBe(200)
    expect(await other.text()).toBe(body)
  })

  it('serves an answer again only while the index is unchanged: a write gives a new answer and a new ETag', async () => {
    const w = world()
    w.profile('before')
    const a = await w.app.request(PROFILES)
    const etag = a.headers.get('etag')!
    expect(((await a.json()) as { profiles: { body: { displayName: string } }[] }).profiles[0]!.body.displayName).toBe('before')
    w.profile('after')
    const b = await w.app.request(PROFILES, { headers: { 'If-None-Match': etag } })
    expect(b.status).toBe(200)
    expect(b.headers.get('etag')).not.toBe(etag)
    expect(((await b.json()) as { profiles: { body: { displayName: string } }[] }).profiles[0]!.body.displayName).toBe('after')
    // Hiding the account changes answers too.
    const c = await w.app.request(PROFILES)
    w.store.setStatus(DID, false, 'deactivated')
    const d = await w.app.request(PROFILES)
    expect(d.headers.get('etag')).not.toBe(c.headers.get('etag'))
    expect(((await d.json()) as { profiles: unknown[] }).profiles).toEqual([])
  })

  it('keeps an answer that depends on the time for timedTtlMs only', async () => {
    const w = world({ timedTtlMs: 50 })
    const path = `/xrpc/${ids.ComputeModelActivity}`
    const a = await w.app.request(path)
    const b = await w.app.request(path)
    expect(b.headers.get('etag')).toBe(a.headers.get('etag'))
    expect(await b.text()).toBe(await a.text())
    await new Promise((r) => setTimeout(r, 60))
    const c = await w.app.request(path)
    expect(c.headers.get('etag')).not.toBe(a.headers.get('etag'))
  })

  it('caches nothing when told so, still naming each answer', async () => {
    const w = world({ cacheEntries: 0 })
    w.profile('one')
    const a = await w.app.request(PROFILES)
    expect((await w.app.request(PROFILES, { headers: { 'If-None-Match': a.headers.get('etag')! } })).status).toBe(304)
  })

  it('answers a CORS preflight, and every answer to any page', async () => {
    const w = world()
    const pre = await w.app.request(PROFILES, { method: 'OPTIONS', headers: { Origin: 'https://example.com', 'Access-Control-Request-Method': 'GET' } })
    expect(pre.status).toBe(204)
    expect(pre.headers.get('access-control-allow-origin')).toBe('*')
    expect(pre.headers.get('access-control-allow-methods')).toBe('GET,HEAD,OPTIONS')
    const res = await w.app.request(PROFILES)
    expect(res.headers.get('access-control-allow-origin')).toBe('*')
    expect(res.headers.get('server-timing')).toMatch(/^app;dur=\d+\.\d\d$/)
    expect(res.headers.get('content-type')).toBe('application/json')
  })

  it('leaves errors uncached and unnamed', async () => {
    const w = world()
    const res = await w.app.request(`/xrpc/${ids.AccountGetProfile}?did=${DID}`)
    expect(res.status).toBe(404)
    expect(res.headers.get('etag')).toBeNull()
  })
})

describe('public reads: limit per client address', () => {
  it('refuses an address past its rate with 429 and Retry-After, each address on its own', async () => {
    const w = world({ ratePerMinute: 3 })
    for (let i = 0; i < 3; i++) expect((await w.from('192.0.2.1', PROFILES)).status).toBe(200)
    const refused = await w.from('192.0.2.1', PROFILES)
    expect(refused.status).toBe(429)
    expect(refused.headers.get('retry-after')).toBe('20')
    expect(((await refused.json()) as { error: string }).error).toBe('RateLimitExceeded')
    // CORS headers stay on the refusal, so a page can read it.
    expect(refused.headers.get('access-control-allow-origin')).toBe('*')
    expect((await w.from('192.0.2.2', PROFILES)).status).toBe(200)
    // An IPv6 client is one address per /64.
    for (let i = 0; i < 3; i++) expect((await w.from(`2001:db8::${i + 1}`, PROFILES)).status).toBe(200)
    expect((await w.from('2001:db8::99', PROFILES)).status).toBe(429)
    // Requests made in process (no client address) are not counted.
    expect((await w.app.request(PROFILES)).status).toBe(200)
  })

  it('counts the AppView’s own methods only', async () => {
    const w = world({ ratePerMinute: 1 })
    expect((await w.from('192.0.2.3', PROFILES)).status).toBe(200)
    expect((await w.from('192.0.2.3', '/xrpc/_health')).status).toBe(200)
    expect((await w.from('192.0.2.3', PROFILES)).status).toBe(429)
  })

  it('has no limit at 0', async () => {
    const w = world({ ratePerMinute: 0 })
    for (let i = 0; i < 20; i++) expect((await w.from('192.0.2.4', PROFILES)).status).toBe(200)
  })
})
