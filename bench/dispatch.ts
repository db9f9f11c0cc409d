/**
 * `npm run bench:dispatch`: time to first token (TTFT) and tokens/s of a
 * streamed chat completion through the exchange, against the same provider
 * engine called directly, in the same run.
 *
 *  - DIRECT (the baseline): the client → the engine server (BuiltinEngine
 *    served as an OpenAI-compatible HTTP API, src/provider/engine-server.ts).
 *  - VIA EXCHANGE: the client → the console's `/v1/chat/completions` (API key,
 *    admission, routing, the job records published on the requester's PDS
 *    through her OAuth session, the prompt sealed to the provider) → WebSocket
 *    → the provider agent (opens the prompt, checks the commitment) → the SAME
 *    engine server over HTTP → each piece sealed back → opened by the console
 *    → SSE to the client. The agent then writes a signed receipt.
 *
 * Layout, on loopback, as deployed: four processes, this one (the client and
 * the orchestration), the network (PLC + PDS, dev-env), the exchange (AppView
 * + console) and the provider (agent + engine server). `--single-process`
 * runs them all in this one instead: then the client's reading of the first
 * chunk waits behind the console and the agent working through the rest of
 * the stream on the same event loop, which a real client does not. The
 * console runs without the ledger (no exchange account configured): no
 * admission-floor lookup, no settlement pipeline in the background.
 *
 * Both paths use the same client code (the `openai` package, or raw fetch
 * with `--client fetch`), the same prompts and the same engine, alternately
 * (direct first in even rounds, the exchange first in odd ones), so machine
 * noise hits both. After each batch the bench waits, untimed, until the
 * exchange path's background work has settled (the agent's receipt written,
 * the AppView caught up with the PDS): every batch starts on a quiet machine
 * and the direct path is not charged for the exchange's writes. Every reply
 * through the exchange must be the one the engine gives directly to the same
 * prompt.
 *
 * TTFT: from the call until the first chunk with non-empty content.
 * tokens/s: content chunks after the first / time from the first to the last.
 * total: from the call until the stream has ended.
 *
 * Options: --requests N (per path per run, default 200), --warmup W (per
 * path, default 20), --runs R (default 1; each figure is the median over
 * runs), --concurrency C (requests in flight per path, default 1),
 * --token-delay-ms D (BuiltinEngine pause before each piece, default 0: pure
 * overhead), --max-tokens M (default 64), --client openai|fetch,
 * --single-process.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { availableParallelism, cpus, loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import OpenAI from 'openai'
import { setLogLevel } from '../src/logger.ts'
import { AppView } from '../appview/index.ts'
import { ApiKeys } from '../console/api-keys.ts'
import { startConsole } from '../console/index.ts'
import { LocalNetwork } from '../src/dev/network.ts'
import { ProviderAgent } from '../src/provider/agent.ts'
import { BuiltinEngine, OpenAIUpstreamEngine } from '../src/provider/engine.ts'
import { startEngineServer } from '../src/provider/engine-server.ts'
import { toWs } from '../src/config.ts'
import { launchBrowser } from '../test/fixture/browser.ts'
import { serveRole, startRole as startRoleOf, type Role } from './roles.ts'
import { consoleOpts, signInWithBrowser } from '../test/fixture/console.ts'

// The logger reads COCORE_LOG_LEVEL when first imported: set the level here (the child processes inherit the variable).
process.env.COCORE_LOG_LEVEL ??= 'error'
setLogLevel(process.env.COCORE_LOG_LEVEL)

const TARGET_ADDED_TTFT_MS = 5
const MODEL = 'builtin'
const HANDLES = { requester: 'alice.test', provider: 'rig.test', exchange: 'market.test' } as const

const { values: args } = parseArgs({
  options: {
    requests: { type: 'string', default: '200' },
    warmup: { type: 'string', default: '20' },
    runs: { type: 'string', default: '1' },
    concurrency: { type: 'string', default: '1' },
    'token-delay-ms': { type: 'string', default: '0' },
    'max-tokens': { type: 'string', default: '64' },
    client: { type: 'string', default: 'openai' },
    'single-process': { type: 'boolean', default: false },
    /** Internal: this process is one of the bench's child processes. */
    role: { type: 'string' },
    help: { type: 'boolean', short: 'h', default: false },
  },
})

// ---- the roles (each in its own process, or all in this one) -----------------

interface Account {
  did: string
  handle: string
  password: string
}

type NetworkInfo = { plcUrl: string; pdsUrl: string; accounts: Record<keyof typeof HANDLES, Account> }

async function networkRole(): Promise<Role<NetworkInfo, { seq(): Promise<number> }>> {
  const net = await LocalNetwork.create()
  const accounts = {} as NetworkInfo['accounts']
  for (const [k, handle] of Object.entries(HANDLES)) {
    const a = await net.createAccount(handle)
    accounts[k as keyof typeof HANDLES] = { did: a.did, handle: a.handle, password: a.password }
  }
  return {
    info: { plcUrl: net.plcUrl, pdsUrl: net.pdsUrl, accounts },
    methods: { seq: async () => (await net.net.pds.ctx.sequencer.curr()) ?? 0 },
    close: () => net.close(),
  }
}

type ExchangeParams = { plcUrl: string; pdsUrl: string; exchangeDid: string }
type ExchangeMethods = { createKey(did: string): Promise<string>; cursor(): Promise<number>; attested(): Promise<number> }

async function exchangeRole(p: ExchangeParams): Promise<Role<{ consoleUrl: string }, ExchangeMethods>> {
  const dir = mkdtempSync(join(tmpdir(), 'exchange-'))
  // As test/fixture/appview.ts starts it: the PDS keeps its whole log, so the AppView replays it from seq 0.
  const av = await new AppView({ dbPath: join(dir, 'appview.sqlite'), sources: [toWs(p.pdsUrl)], plcUrl: p.plcUrl, allowHttp: true, handlesViaPds: p.pdsUrl, port: 0, replayFromStart: true }).start()
  // The default key rate (600/min) is below what the bench asks.
  const svc = await startConsole(consoleOpts(null, av.url, { plcUrl: p.plcUrl, pdsUrl: p.pdsUrl, index: av.consoleIndex(), exchangeDid: p.exchangeDid, apiKeyRatePerMinute: 1e9, apiKeyIpRatePerMinute: 1e9 }))
  return {
    info: { consoleUrl: svc.url },
    methods: {
      createKey: async (did) => new ApiKeys(svc.db).create(did, 'bench', ['inference']).secret,
      cursor: async () => Object.values(av.indexer.cursors())[0] ?? -1,
      attested: async () => [...svc.gateway!.providers.values()].filter((x) => x.attested).length,
    },
    close: async () => {
      await svc.close()
      await av.stop()
    },
  }
}

type ProviderParams = { pdsUrl: string; account: Account; consoleUrl: string; exchangeDid: string; tokenDelayMs: number; maxConcurrent: number }

async function providerRole(p: ProviderParams): Promise<Role<{ engineUrl: string }, { idle(): Promise<void> }>> {
  const engineServer = await startEngineServer({ engine: new BuiltinEngine({ delayMs: p.tokenDelayMs }), models: [MODEL] })
  const agent = new ProviderAgent({
    pdsUrl: p.pdsUrl,
    identifier: p.account.handle,
    password: p.account.password,
    exchangeUrl: p.consoleUrl,
    exchangeDid: p.exchangeDid,
    keyFile: join(mkdtempSync(join(tmpdir(), 'agent-')), 'key.json'),
    engine: new OpenAIUpstreamEngine(engineServer.url),
    models: [MODEL],
    maxConcurrent: p.maxConcurrent,
    reconnect: { initialMs: 100, maxMs: 500 },
  })
  const registered = new Promise<void>((resolve) => agent.once('registered', () => resolve()))
  await agent.start()
  await registered
  return {
    info: { engineUrl: engineServer.url },
    methods: { idle: () => agent.jobs.idle() },
    close: async () => {
      await agent.stop()
      await engineServer.close()
    },
  }
}

const ROLES = { network: networkRole, exchange: exchangeRole, provider: providerRole } as const
type RoleName = keyof typeof ROLES

/** Starts a role in a child process running this script, or in this one. */
const startRole = <N extends RoleName>(name: N, params: unknown, inProcess: boolean) => startRoleOf(import.meta.filename, ROLES, name, params, inProcess)

if (args.role !== undefined) {
  if (!(args.role in ROLES)) throw new Error(`--role: one of ${Object.keys(ROLES).join(', ')}`)
  await serveRole(ROLES, args.role)
} else {
  await main()
}

// ---- the benchmark -------------------------------------------------------------

async function main(): Promise<void> {
  if (args.help) {
    process.stdout.write('usage: npm run bench:dispatch -- [--requests N] [--warmup W] [--runs R] [--concurrency C] [--token-delay-ms D] [--max-tokens M] [--client openai|fetch] [--single-process]\n')
    return
  }
  const int = (name: keyof typeof args, min: number): number => {
    const v = Number(args[name])
    if (!(Number.isSafeInteger(v) && v >= min)) throw new Error(`--${name}: expected an integer >= ${min}, got ${String(args[name])}`)
    return v
  }
  const REQUESTS = int('requests', 1)
  const WARMUP = int('warmup', 0)
  const RUNS = int('runs', 1)
  const CONCURRENCY = int('concurrency', 1)
  const TOKEN_DELAY_MS = int('token-delay-ms', 0)
  const MAX_TOKENS = int('max-tokens', 1)
  const CLIENT = args.client
  if (CLIENT !== 'openai' && CLIENT !== 'fetch') throw new Error(`--client: openai or fetch, got ${CLIENT}`)
  const SINGLE = args['single-process']!

  const log = (msg: string) => process.stderr.write(`[bench] ${msg}\n`)

  // ---- the client (the same code for both paths) -------------------------------

  interface Sample {
    ttftMs: number
    tokensPerSec: number
    totalMs: number
    tokens: number
    text: string
  }
  type Path = 'direct' | 'exchange'
  interface Target {
    baseURL: string
    apiKey: string
    openai: OpenAI
  }
  const target = (baseURL: string, apiKey: string): Target => ({ baseURL, apiKey, openai: new OpenAI({ baseURL, apiKey, maxRetries: 0 }) })
  const messagesFor = (i: number) => [{ role: 'user' as const, content: `benchmark prompt ${i}: tell me about rivers` }]

  /** Content pieces of a stream, as the OpenAI client yields them. */
  async function* openaiPieces(t: Target, i: number): AsyncGenerator<string> {
    const stream = await t.openai.chat.completions.create({ model: MODEL, messages: messagesFor(i), max_tokens: MAX_TOKENS, stream: true })
    for await (const chunk of stream) {
      const c = chunk.choices[0]?.delta?.content
      if (c) yield c
    }
  }

  /** Content pieces of a stream, from fetch and a minimal SSE parser. */
  async function* fetchPieces(t: Target, i: number): AsyncGenerator<string> {
    const res = await fetch(`${t.baseURL}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${t.apiKey}`, accept: 'text/event-stream' },
      body: JSON.stringify({ model: MODEL, messages: messagesFor(i), max_tokens: MAX_TOKENS, stream: true }),
    })
    if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}: ${await res.text()}`)
    let buf = ''
    for await (const text of res.body.pipeThrough(new TextDecoderStream())) {
      buf += text
      for (let end = buf.indexOf('\n\n'); end >= 0; end = buf.indexOf('\n\n')) {
        const event = buf.slice(0, end)
        buf = buf.slice(end + 2)
        if (!event.startsWith('data: ')) continue
        const data = event.slice(6)
        if (data === '[DONE]') return
        const chunk = JSON.parse(data) as { error?: { message: string }; choices?: { delta?: { content?: string } }[] }
        if (chunk.error) throw new Error(chunk.error.message)
        const c = chunk.choices?.[0]?.delta?.content
        if (c) yield c
      }
    }
  }

  async function request(t: Target, i: number): Promise<Sample> {
    const t0 = performance.now()
    let tFirst = 0
    let tLast = 0
    let tokens = 0
    let text = ''
    for await (const piece of CLIENT === 'openai' ? openaiPieces(t, i) : fetchPieces(t, i)) {
      const now = performance.now()
      if (tokens === 0) tFirst = now
      tLast = now
      tokens++
      text += piece
    }
    const totalMs = performance.now() - t0
    if (tokens === 0) throw new Error(`request ${i}: no content`)
    return { ttftMs: tFirst - t0, tokensPerSec: tokens > 1 && tLast > tFirst ? ((tokens - 1) * 1000) / (tLast - tFirst) : NaN, totalMs, tokens, text }
  }

  // ---- the system ----------------------------------------------------------------

  // Other work on the machine shows in every figure: said with them.
  const loadAtStart = loadavg()[0]!
  const tmp = mkdtempSync(join(tmpdir(), 'cocore-bench-dispatch-'))
  // Every file of every process (PDS, databases, keys, the browser's profile) goes under it.
  process.env.TMPDIR = tmp
  const started: { close(): Promise<void> }[] = []
  try {
    log(`starting the network (PLC + PDS), the exchange (AppView + console) and the provider (agent + engine server)${SINGLE ? ', in this process' : ', each in its own process'}`)
    const network = await startRole('network', {}, SINGLE)
    started.push(network)
    const { plcUrl, pdsUrl, accounts } = network.info
    const exchange = await startRole('exchange', { plcUrl, pdsUrl, exchangeDid: accounts.exchange.did } satisfies ExchangeParams, SINGLE)
    started.push(exchange)
    const { consoleUrl } = exchange.info

    // The requester signs in through her PDS in a browser: the console holds her OAuth session, which publishes her job records.
    log('signing the requester in through chromium')
    const browser = await launchBrowser()
    try {
      await (await signInWithBrowser(browser, consoleUrl, accounts.requester.handle, accounts.requester.password)).close()
    } finally {
      await browser.close()
    }
    const apiKey = await exchange.methods.createKey(accounts.requester.did)

    const provider = await startRole(
      'provider',
      { pdsUrl, account: accounts.provider, consoleUrl, exchangeDid: accounts.exchange.did, tokenDelayMs: TOKEN_DELAY_MS, maxConcurrent: Math.max(4, CONCURRENCY) } satisfies ProviderParams,
      SINGLE,
    )
    started.push(provider)
    // Registered, then challenged: the provider is routable once it has answered.
    for (const deadline = Date.now() + 20_000; (await exchange.methods.attested()) < 1; ) {
      if (Date.now() > deadline) throw new Error('the provider did not answer its attestation challenge')
      await new Promise((r) => setTimeout(r, 20))
    }

    const targets: Record<Path, Target> = {
      direct: target(`${provider.info.engineUrl}/v1`, 'unused'),
      exchange: target(`${consoleUrl}/v1`, apiKey),
    }

    /** Untimed: the agent's receipt writes done, and the AppView caught up with everything the PDS sequenced. */
    const settle = async () => {
      await provider.methods.idle()
      const want = await network.methods.seq()
      for (const deadline = Date.now() + 30_000; (await exchange.methods.cursor()) < want; ) {
        if (Date.now() > deadline) throw new Error(`the AppView did not reach seq ${want}`)
        await new Promise((r) => setTimeout(r, 2))
      }
    }

    /** The first reply to prompt i (either path's): the other path's must be the same. */
    const expected = new Map<number, string>()
    let mismatches = 0
    let seq = 0

    /** Rounds of C concurrent requests on each path; which path goes first alternates. */
    async function measure(n: number): Promise<Record<Path, Sample[]>> {
      const out: Record<Path, Sample[]> = { direct: [], exchange: [] }
      for (let round = 0; out.direct.length < n; round++) {
        const ids = Array.from({ length: Math.min(CONCURRENCY, n - out.direct.length) }, () => seq++)
        const order: Path[] = round % 2 === 0 ? ['direct', 'exchange'] : ['exchange', 'direct']
        for (const path of order) {
          const samples = await Promise.all(ids.map((i) => request(targets[path], i)))
          samples.forEach((s, k) => {
            const i = ids[k]!
            const want = expected.get(i)
            if (want === undefined) expected.set(i, s.text)
            else if (want !== s.text) mismatches++
            else expected.delete(i)
          })
          out[path].push(...samples)
          await settle()
        }
      }
      return out
    }

    log(`warm-up: ${WARMUP} requests per path`)
    if (WARMUP > 0) await measure(WARMUP)

    interface Stats {
      ttft: [number, number, number]
      tps: number
      total: number
      tokens: number
    }
    const runs: Record<Path, Stats>[] = []
    for (let r = 0; r < RUNS; r++) {
      log(`run ${r + 1}/${RUNS}: ${REQUESTS} requests per path, concurrency ${CONCURRENCY}`)
      const s = await measure(REQUESTS)
      const stats = (p: Path): Stats => ({
        ttft: [50, 90, 99].map((q) => percentile(s[p].map((x) => x.ttftMs), q)) as Stats['ttft'],
        tps: median(s[p].map((x) => x.tokensPerSec)),
        total: median(s[p].map((x) => x.totalMs)),
        tokens: median(s[p].map((x) => x.tokens)),
      })
      runs.push({ direct: stats('direct'), exchange: stats('exchange') })
      log(`run ${r + 1}: TTFT p50 direct ${runs[r]!.direct.ttft[0].toFixed(2)} ms, via exchange ${runs[r]!.exchange.ttft[0].toFixed(2)} ms`)
    }
    if (mismatches > 0) throw new Error(`${mismatches} replies through the exchange differ from the engine's direct reply to the same prompt`)

    // ---- report ------------------------------------------------------------------
    const med = (f: (r: Record<Path, Stats>) => number) => median(runs.map(f))
    const ms = (x: number) => (Number.isFinite(x) ? `${x.toFixed(2)} ms` : 'n/a')
    const rate = (x: number) => (Number.isFinite(x) ? `${x.toFixed(0)}/s` : 'n/a')
    const row = (label: string, p: Path) => [label, ms(med((r) => r[p].ttft[0])), ms(med((r) => r[p].ttft[1])), ms(med((r) => r[p].ttft[2])), rate(med((r) => r[p].tps)), ms(med((r) => r[p].total)), String(med((r) => r[p].tokens))]
    const table = [['', 'TTFT p50', 'TTFT p90', 'TTFT p99', 'tokens/s p50', 'total p50', 'tokens p50'], row('direct (engine server)', 'direct'), row('via exchange', 'exchange')]
    const widths = table[0]!.map((_, c) => Math.max(...table.map((r) => r[c]!.length)))
    const line = (r: string[]) => r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  ')
    const addedP50 = med((r) => r.exchange.ttft[0] - r.direct.ttft[0])
    const addedP90 = med((r) => r.exchange.ttft[1] - r.direct.ttft[1])
    const argv = process.argv.slice(2)
    console.log(
      [
        `command: npm run bench:dispatch${argv.length ? ` -- ${argv.join(' ')}` : ''}`,
        `environment: node ${process.version}, ${availableParallelism()} cores (${cpus()[0]?.model.trim() ?? 'unknown CPU'}), ${process.platform}/${process.arch}, load average ${loadAtStart.toFixed(2)} at start, ${loadavg()[0]!.toFixed(2)} at the end`,
        `layout: loopback, ${SINGLE ? 'everything in one process' : 'one process each: client | PLC + PDS | AppView + console | agent + engine server'}`,
        `settings: ${REQUESTS} requests per path${RUNS > 1 ? ` per run, ${RUNS} runs (each figure: the median over runs)` : ''}, after ${WARMUP} warm-up; concurrency ${CONCURRENCY}, max_tokens ${MAX_TOKENS}, token delay ${TOKEN_DELAY_MS} ms, client ${CLIENT}`,
        '',
        line(table[0]!),
        ...table.slice(1).map(line),
        '',
        `added TTFT (exchange - direct): p50 ${ms(addedP50)}, p90 ${ms(addedP90)}`,
        `target: under ${TARGET_ADDED_TTFT_MS} ms added at the median: ${addedP50 < TARGET_ADDED_TTFT_MS ? 'met' : 'NOT met'}`,
        ...(RUNS > 1 ? [`added TTFT p50 of each run: ${runs.map((r) => (r.exchange.ttft[0] - r.direct.ttft[0]).toFixed(2)).join(', ')} ms`] : []),
        'replies: every reply through the exchange equals the direct reply to the same prompt',
      ].join('\n'),
    )
  } finally {
    // Provider first (it finishes its receipt writes), then the exchange, then the network.
    for (const r of started.reverse()) await r.close()
    rmSync(tmp, { recursive: true, force: true })
  }
}

// ---- statistics ------------------------------------------------------------------

/** Linear interpolation between the closest ranks (p50 is the median); NaN values are left out. */
function percentile(xs: number[], p: number): number {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b)
  if (s.length === 0) return NaN
  const at = (s.length - 1) * (p / 100)
  const lo = Math.floor(at)
  const hi = Math.ceil(at)
  return s[lo]! + (s[hi]! - s[lo]!) * (at - lo)
}

function median(xs: number[]): number {
  return percentile(xs, 50)
}
