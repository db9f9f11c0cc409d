/** The AppView's non-XRPC surface and error shapes. */
import { describe, expect, it } from 'vitest'
import { openDb } from '../src/db/index.ts'
import { IndexStore } from '../appview/indexer/store.ts'
import { createApp } from '../appview/server.ts'
import { tempDbPath } from './fixture/appview.ts'

const db = openDb(tempDbPath('http'))
const app = createApp({ db, store: new IndexStore(db), publicUrl: 'https://appview.example.com', validateOutput: true })

describe('appview http', () => {
  it('serves health with rejection counts', async () => {
    const res = await app.request('/health')
    expect(res.status).toBe(200)
    expect(await res.json()).toMatchObject({ status: 'ok', rejections: [] })
  })
  it('serves its did:web document', async () => {
    const doc = (await (await app.request('/.well-known/did.json')).json()) as { id: string; service: { serviceEndpoint: string }[] }
    expect(doc.id).toBe('did:web:appview.example.com')
    expect(doc.service[0]!.serviceEndpoint).toBe('https://appview.example.com')
  })
  it('answers JSON errors, never HTML or stack traces', async () => {
    const notFound = await app.request('/nope')
    expect(notFound.status).toBe(404)
    expect(await notFound.json()).toEqual({ error: 'NotFound', message: 'Not found' })
    const post = await app.request('/xrpc/dev.cocore.compute.listProviders', { method: 'POST' })
    expect(post.status).toBe(400)
    expect(((await post.json()) as { error: string }).error).toBe('InvalidRequest')
    const unknown = await app.request('/xrpc/dev.cocore.compute.doesNotExist')
    expect(unknown.status).toBe(501)
    expect(((await unknown.json()) as { error: string }).error).toBe('MethodNotImplemented')
  })
  it('says how long it took to answer an XRPC call, errors included (Server-Timing)', async () => {
    for (const path of ['/xrpc/dev.cocore.compute.listProviders', '/xrpc/dev.cocore.compute.listJobs']) {
      const res = await app.request(path)
      expect(res.headers.get('server-timing')).toMatch(/^app;dur=\d+\.\d\d$/)
      // The CORS header of the same middleware chain is still there.
      expect(res.headers.get('access-control-allow-origin')).toBe('*')
    }
  })
})
