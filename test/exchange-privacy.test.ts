/**
 * The privacy policy's promise that the exchange never sees a prompt or a
 * reply in clear, shown end to end: the AppView and the console (the
 * exchange) run in their own process behind a recording proxy; a requester
 * chats in a real browser on the console's chat page, and through the
 * OpenAI-compatible API; the reference provider agent (built-in engine) runs
 * the jobs and publishes signed receipts. Then every byte the console
 * received or sent, everything it logged (at debug level) and every file it
 * stored are searched for the prompts and the replies: they are nowhere. The
 * receipt of the browser's job reaches the AppView through the firehose and
 * verifies.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { readdirSync, readFileSync, statSync } from 'node:fs'
import { createServer, connect, type Server } from 'node:net'
import { join } from 'node:path'
import OpenAI from 'openai'
import type { Browser } from 'playwright-core'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { ApiKeys } from '../console/api-keys.ts'
import { openDb } from '../src/db/index.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { ids } from '../src/lexicon/generated/ids.ts'
import type { ProviderAgent } from '../src/provider/agent.ts'
import { launchBrowser, screenshot } from './fixture/browser.ts'
import { consoleOpts, signInWithBrowser } from './fixture/console.ts'
import { waitFor } from './fixture/wait.ts'
import { startBuiltinAgent } from './fixture/agent.ts'

let net: LocalNetwork
let alice: LocalAccount
let rig: LocalAccount
let market: LocalAccount
let child: ChildProcess
let proxy: Server
let browser: Browser
let agent: ProviderAgent
let dataDir: string
let consoleUrl: string
let appviewUrl: string
/** Every byte through the proxy, both ways. */
const wire: Buffer[] = []
const logs: Buffer[] = []
/** The provider's frames to the console, unmasked. */
const unmaskedFromProviders: Buffer[] = []

/**
 * WebSocket frames a client sends are XOR-masked (RFC 6455 §5.3): to search
 * what a provider sent, the recorder unmasks them. Returns the payloads of
 * the complete frames in `buf` and what is left over.
 */
function unmaskFrames(buf: Buffer): { payloads: Buffer[]; rest: Buffer } {
  const payloads: Buffer[] = []
  let at = 0
  while (buf.length - at >= 2) {
    let len = buf[at + 1]! & 0x7f
    let head = 2
    if (len === 126) {
      if (buf.length - at < 4) break
      len = buf.readUInt16BE(at + 2)
      head = 4
    } else if (len === 127) {
      if (buf.length - at < 10) break
      len = Number(buf.readBigUInt64BE(at + 2))
      head = 10
    }
    const masked = (buf[at + 1]! & 0x80) !== 0
    const total = head + (masked ? 4 : 0) + len
    if (buf.length - at < total) break
    const key = masked ? buf.subarray(at + head, at + head + 4) : null
    const payload: Buffer = Buffer.from(buf.subarray(at + total - len, at + total))
    if (key) for (let i = 0; i < payload.length; i++) payload[i]! ^= key[i % 4]!
    payloads.push(payload)
    at += total
  }
  return { payloads, rest: buf.subarray(at) }
}

/** A TCP proxy in front of the console that records everything; its target is set once the console listens. */
async function recordingProxy(): Promise<{ server: Server; port: number; target: (port: number) => void }> {
  let targetPort = 0
  const server = createServer((client) => {
    const upstream = connect(targetPort, '127.0.0.1')
    // After a WebSocket upgrade, the client's frames are also recorded unmasked.
    let pending: Buffer = Buffer.alloc(0)
    let ws: 'no' | 'headers' | 'frames' | null = null
    client.on('data', (d) => {
      wire.push(Buffer.from(d))
      if (ws === null) ws = d.subarray(0, 16).toString().startsWith('GET /v1/agent') ? 'headers' : 'no'
      if (ws === 'no') return
      pending = Buffer.concat([pending, d])
      if (ws === 'headers') {
        const end = pending.indexOf('\r\n\r\n')
        if (end < 0) return
        pending = pending.subarray(end + 4)
        ws = 'frames'
      }
      const { payloads, rest } = unmaskFrames(pending)
      wire.push(...payloads)
      unmaskedFromProviders.push(...payloads)
      pending = rest
    })
    upstream.on('data', (d) => wire.push(Buffer.from(d)))
    client.pipe(upstream)
    upstream.pipe(client)
    client.on('error', () => upstream.destroy())
    upstream.on('error', () => client.destroy())
    client.on('close', () => upstream.destroy())
    upstream.on('close', () => client.destroy())
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return { server, port: (server.address() as { port: number }).port, target: (p) => (targetPort = p) }
}

beforeAll(async () => {
  net = await LocalNetwork.create()
  alice = await net.createAccount('alice.test')
  rig = await net.createAccount('rig.test')
  market = await net.createAccount('market.test')
  const p = await recordingProxy()
  proxy = p.server
  consoleUrl = `http://127.0.0.1:${p.port}`
  const opts = consoleOpts(net, 'http://unused', { exchangeDid: market.did, publicUrl: consoleUrl })
  dataDir = opts.dataDir
  child = spawn(process.execPath, ['test/fixture/exchange-process.ts', JSON.stringify({ appviewDbPath: join(dataDir, 'appview.sqlite'), pdsUrl: net.pdsUrl, plcUrl: net.plcUrl, console: opts })], {
    env: { ...process.env, COCORE_LOG_LEVEL: 'debug' },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  child.stderr!.on('data', (d) => logs.push(Buffer.from(d)))
  const ready = await new Promise<{ appviewUrl: string; consoleUrl: string }>((resolve, reject) => {
    let out = ''
    child.stdout!.on('data', (d: Buffer) => {
      logs.push(Buffer.from(d))
      out += d.toString()
      const line = out.split('\n').find((l) => l.startsWith('{"appviewUrl"'))
      if (line) resolve(JSON.parse(line))
    })
    child.once('exit', (code) => reject(new Error(`exchange process exited ${code}: ${Buffer.concat(logs).toString().slice(-2000)}`)))
  })
  appviewUrl = ready.appviewUrl
  p.target(Number(new URL(ready.consoleUrl).port))

  agent = await startBuiltinAgent(net.pdsUrl, rig, { url: consoleUrl, did: market.did })
  browser = await launchBrowser()
}, 120_000)

afterAll(async () => {
  await browser?.close()
  await agent?.stop()
  if (child && child.exitCode === null) {
    child.kill('SIGTERM')
    await new Promise((r) => child.once('exit', r))
  }
  proxy?.close()
  await net?.close()
})

/** verifyReceipt's answer once the receipt (and the job it names) reached the AppView through the firehose. */
async function verifiedReceipt(uri: string): Promise<unknown> {
  let last: unknown
  return waitFor(async () => {
    const res = await fetch(`${appviewUrl}/xrpc/${ids.ComputeVerifyReceipt}?uri=${encodeURIComponent(uri)}`)
    last = await res.json()
    return res.ok && (last as { ok: boolean }).ok ? last : null
  }, 'receipt indexed and verified').catch(() => last)
}

/** Every file under `dir`, concatenated. */
const filesUnder = (dir: string): Buffer =>
  Buffer.concat(
    readdirSync(dir).map((name) => {
      const path = join(dir, name)
      return statSync(path).isDirectory() ? filesUnder(path) : readFileSync(path)
    }),
  )

/** The ways a secret could sit in captured bytes: UTF-8, UTF-16, and base64 at each alignment. */
function encodings(secret: string): Buffer[] {
  const utf8 = Buffer.from(secret)
  const b64 = [0, 1, 2].map((skip) => {
    const s = utf8.subarray(skip).toString('base64')
    return Buffer.from(s.slice(4, s.length - 4))
  })
  return [utf8, Buffer.from(secret, 'utf16le'), ...b64]
}

it('a chat in the browser and a call through the OpenAI API leave no prompt or reply on the wire, in the logs or in storage', async () => {
  const browserPrompt = `quartz zebra ${randomBytes(6).toString('hex')} lantern`
  const apiPrompt = `amber walrus ${randomBytes(6).toString('hex')} sextant`

  // The browser: sign in through the PDS, open the chat, send a prompt.
  const page = await signInWithBrowser(browser, consoleUrl, alice.handle, alice.password)
  await page.goto(`${consoleUrl}/chat`)
  await page.locator('select[name=model] option[value=builtin]').waitFor({ state: 'attached' })
  await page.locator('textarea[name=prompt]').fill(browserPrompt)
  await page.getByRole('button', { name: 'Send' }).click()
  await page.locator('#chat[data-state=done]').waitFor({ timeout: 20_000 })
  const browserReply = (await page.locator('p.msg.assistant').first().textContent()) ?? ''
  await screenshot(page, 'chat')
  expect(browserReply).toContain(`You said: ${browserPrompt}`)
  expect(browserReply.length).toBeGreaterThan(browserPrompt.length + 40)
  const receiptUri = await page.locator('#chat').getAttribute('data-receipt')
  expect(receiptUri).toMatch(new RegExp(`^at://${rig.did}/${ids.ComputeReceipt}/`))

  // The receipt: on the provider's PDS, through the firehose to the AppView, and verified there.
  expect(await verifiedReceipt(receiptUri!)).toMatchObject({ ok: true })

  // The OpenAI-compatible API, with a key of Alice's (plaintext arrives, by the nature of that API).
  const db = openDb(join(dataDir, 'console.sqlite'))
  const key = new ApiKeys(db).create(alice.did, 'privacy', ['inference']).secret
  db.$client.close()
  const client = new OpenAI({ baseURL: `${consoleUrl}/v1`, apiKey: key, maxRetries: 0 })
  const res = await client.chat.completions.create({ model: 'builtin', messages: [{ role: 'user', content: apiPrompt }] })
  const apiReply = res.choices[0]!.message.content!
  expect(apiReply).toContain(`You said: ${apiPrompt}`)
  // openai client -> exchange -> provider -> receipt on its PDS -> firehose -> AppView -> verifyReceipt.
  const apiReceipt = (res as unknown as { cocore: { receipt: string; job: string } }).cocore
  expect(apiReceipt.receipt).toMatch(new RegExp(`^at://${rig.did}/${ids.ComputeReceipt}/`))
  expect(await verifiedReceipt(apiReceipt.receipt)).toMatchObject({ ok: true })
  const streamed = await client.chat.completions.create({ model: 'builtin', messages: [{ role: 'user', content: apiPrompt }], stream: true })
  for await (const _ of streamed);

  // Stop the exchange, so everything it would write is on disk.
  await agent.jobs.idle()
  child.kill('SIGTERM')
  await new Promise((r) => child.once('exit', r))

  const wireBytes = Buffer.concat(wire)
  const logBytes = Buffer.concat(logs)
  const stored = filesUnder(dataDir)
  // Positive controls: the captures are real (the sealed dispatch and the registration went through the proxy, the logs speak, the databases hold rows).
  expect(wireBytes.includes(Buffer.from(ids.InferenceDispatch))).toBe(true)
  expect(wireBytes.includes(Buffer.from('"inference_request"'))).toBe(true)
  expect(Buffer.concat(unmaskedFromProviders).includes(Buffer.from('"inference_chunk"'))).toBe(true)
  expect(logBytes.includes(Buffer.from('provider registered'))).toBe(true)
  expect(stored.includes(Buffer.from(alice.did))).toBe(true)
  // The API prompt did cross the wire in clear to the console (the OpenAI API takes plaintext): the search finds what is there.
  expect(wireBytes.includes(Buffer.from(apiPrompt))).toBe(true)

  // The browser's prompt and reply crossed the wire only sealed.
  for (const secret of [browserPrompt, browserReply, browserReply.slice(-40)]) {
    for (const enc of encodings(secret)) expect(wireBytes.includes(enc), `on the wire: ${secret}`).toBe(false)
  }
  // Nothing of either chat in the logs or the stored files.
  for (const secret of [browserPrompt, browserReply, apiPrompt, apiReply, apiReply.slice(-40)]) {
    for (const enc of encodings(secret)) {
      expect(logBytes.includes(enc), `in the logs: ${secret}`).toBe(false)
      expect(stored.includes(enc), `in storage: ${secret}`).toBe(false)
    }
  }
  // Nor on the requester's PDS, where the job records carry a commitment only.
  const repo = Buffer.from((await alice.agent.com.atproto.sync.getRepo({ did: alice.did })).data)
  expect(repo.includes(Buffer.from(ids.ComputeJob))).toBe(true)
  for (const secret of [browserPrompt, apiPrompt]) expect(repo.includes(Buffer.from(secret))).toBe(false)
}, 120_000)
