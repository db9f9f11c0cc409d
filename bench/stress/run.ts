/**
 * The stress run: boots the system on loopback, one process per role
 * (roles.ts), puts every kind of load on it at once for a bounded time
 * (load.ts), and returns what it saw (stats.ts): requests served, errors by
 * kind, latency percentiles per endpoint, the replay indexer's lag, RSS of
 * each process over time.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { availableParallelism, loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { launchBrowser } from '../../test/fixture/browser.ts'
import { signInWithBrowser, sessionCookie } from '../../test/fixture/console.ts'
import { DEFAULT_EVENTS } from '../record-firehose.ts'
import { chatter, createKey, keyCalls, reader, readTargets, signIns, type LoadContext } from './load.ts'
import { DEFAULT_DIR, startRole as startRoleProcess, vitals, type RelayProgress, type RoleName, type Vitals } from './roles.ts'
import { RssSeries, Tally, procRss, type MemoryReport } from './stats.ts'

export interface StressOpts {
  /** Seconds of load (default 60). */
  durationSec: number
  /** Firehose events per second replayed into the second indexer (default 2000). */
  firehoseRate: number
  /** Concurrent XRPC readers (default 200). */
  readers: number
  /** Concurrent streamed chat completions (default 50). */
  chats: number
  /** Requester accounts, each signed in with its own OAuth session; the chats' keys are spread over them (default 4). */
  requesters: number
  /** Provider agents, one account each (default 4). */
  providers: number
  /** The built-in engine's pause before each piece, so streams last a while (default 10 ms). */
  tokenDelayMs: number
  maxTokens: number
  /** One browser sign-in every this many seconds (default 5). */
  signInEverySec: number
  /** Concurrent API-key loops (default 2). */
  keyLoops: number
  /** Where the recorded firehose is (recorded there first when missing). */
  recordingDir: string
  recordEvents: number
  /** Processes to run under V8's CPU profiler (`--cpu-prof`); their profiles are written to `cpuProfileDir` as they exit. */
  cpuProfile?: RoleName[]
  cpuProfileDir?: string
  /** Ends the load early (SIGINT). */
  signal?: AbortSignal
  log?: (msg: string) => void
}

export const DEFAULTS: StressOpts = {
  durationSec: 60,
  firehoseRate: 2000,
  readers: 200,
  chats: 50,
  requesters: 4,
  providers: 4,
  tokenDelayMs: 10,
  maxTokens: 64,
  signInEverySec: 5,
  keyLoops: 2,
  recordingDir: DEFAULT_DIR,
  recordEvents: DEFAULT_EVENTS,
}

export interface LatencyRow {
  count: number
  p50Ms: number
  p99Ms: number
  maxMs: number
}

export interface StressReport {
  settings: Omit<StressOpts, 'signal' | 'log' | 'cpuProfile' | 'cpuProfileDir'>
  environment: { node: string; cores: number; loadAvgStart: number; loadAvgEnd: number }
  /** Seconds the load actually ran. */
  ranSec: number
  /** Ended early by the signal (Ctrl-C). */
  interrupted: boolean
  /** Requests answered correctly, per kind: xrpc read, chat, sign-in, api-key. */
  served: Record<string, number>
  /** Valid requests that failed, by kind (`<endpoint> <status>/<code>`); must be empty. */
  errors: Record<string, number>
  errorCount: number
  errorSamples: string[]
  latency: Record<string, LatencyRow>
  firehose: {
    rate: number
    recordingFrames: number
    /** Frames the relay sent while the load ran (and before it, from the indexer's start). */
    sent: number
    sentPerSec: number
    /** At the end of the load: last seq sent, the indexer's cursor, and the distance. */
    lastSeqSent: number
    indexedSeq: number
    lagEvents: number
    /** How long ago the first event not yet indexed was sent (0 when caught up). */
    lagSec: number
    /** After the relay stopped: seconds until the indexer had everything (null: not within the bound). */
    drainedAfterSec: number | null
    indexer: Record<string, number>
    /** Records the indexer refused, by reason: the recording holds only valid ones, so each is an error. */
    rejections: Record<string, number>
  }
  /** The exchange's AppView against its PDS at the end of the load. */
  exchangeIndexer: { pdsSeq: number; indexedSeq: number; lagEvents: number; stats: Record<string, number>; rejections: Record<string, number> }
  memory: Record<string, MemoryReport>
  /** No errors, and (for a run of 5 minutes or more) no process whose RSS grows. */
  ok: boolean
}

const HANDLES = {
  exchange: 'market.test',
  requesters: ['alice.test', 'bob.test', 'carol.test', 'dave.test'],
  providers: ['rig.test', 'gpu-host.test', 'souk.test', 'erin.test', 'fay.test', 'gus.test', 'amy.test', 'ben.test'],
}

/** The indexer's reason for a commit whose rev is not newer than the repo's last one. */
const STALE_REV = 'stale-rev'

/** A run of this length or more is a soak: RSS still growing in its last third fails it. */
export const SOAK_SEC = 300

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function waitFor(what: string, cond: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  for (const deadline = Date.now() + timeoutMs; !(await cond()); ) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(50)
  }
}

export async function runStress(partial: Partial<StressOpts> = {}): Promise<StressReport> {
  const opts: StressOpts = { ...DEFAULTS, ...partial }
  if (opts.providers > HANDLES.providers.length) throw new Error(`at most ${HANDLES.providers.length} providers`)
  if (opts.requesters < 1 || opts.requesters > HANDLES.requesters.length) throw new Error(`1 to ${HANDLES.requesters.length} requesters`)
  const log = opts.log ?? ((msg: string) => process.stderr.write(`[stress] ${msg}\n`))
  const loadAvgStart = loadavg()[0]!
  // Every file of every process (PDS, databases, keys, the browser's profile) goes under it.
  const tmp = mkdtempSync(join(tmpdir(), 'cocore-stress-'))
  const prevTmp = process.env.TMPDIR
  process.env.TMPDIR = tmp
  // Children inherit it; quiet unless something is wrong.
  const prevLevel = process.env.COCORE_LOG_LEVEL
  process.env.COCORE_LOG_LEVEL ??= 'error'
  const started: { close(): Promise<void> }[] = []
  const profileDir = opts.cpuProfileDir ?? join(process.cwd(), 'data', 'stress-profiles')
  /** Forks a role's process, under the CPU profiler when asked (the child takes NODE_OPTIONS from the environment it is forked with). */
  const startRole: typeof startRoleProcess = (name, params) => {
    if (!opts.cpuProfile?.includes(name)) return startRoleProcess(name, params)
    const prev = process.env.NODE_OPTIONS
    process.env.NODE_OPTIONS = `${prev ?? ''} --cpu-prof --cpu-prof-dir=${profileDir} --cpu-prof-name=${name}.cpuprofile`.trim()
    try {
      // fork copies the environment before its first await.
      return startRoleProcess(name, params)
    } finally {
      if (prev === undefined) delete process.env.NODE_OPTIONS
      else process.env.NODE_OPTIONS = prev
    }
  }
  const series = new Map<string, RssSeries>()
  let sampler: NodeJS.Timeout | null = null
  let browser: Awaited<ReturnType<typeof launchBrowser>> | null = null
  // Set once the load starts: ends it (also when the run fails half-way, so no loop outlives it).
  let endLoad = () => {}
  try {
    log('starting the network (PLC + PDS) and the exchange (AppView + console, ledger on)')
    const network = await startRole('network', { exchange: HANDLES.exchange, requesters: HANDLES.requesters.slice(0, opts.requesters), providers: HANDLES.providers.slice(0, opts.providers) })
    started.push(network)
    const { plcUrl, pdsUrl, requesters, providers, exchange: exchangeAccount } = network.info
    const exchange = await startRole('exchange', { plcUrl, pdsUrl, exchange: exchangeAccount })
    started.push(exchange)
    const { consoleUrl, appviewUrl } = exchange.info

    log(`starting ${opts.providers} provider agents (built-in engine, ${opts.tokenDelayMs} ms per piece)`)
    const provider = await startRole('provider', {
      pdsUrl,
      accounts: providers,
      consoleUrl,
      exchangeDid: exchangeAccount.did,
      tokenDelayMs: opts.tokenDelayMs,
      // Enough room that no chat is refused for want of a free provider.
      maxConcurrent: Math.max(4, Math.ceil((2 * opts.chats) / opts.providers)),
    })
    started.push(provider)
    await waitFor('the providers to answer their attestation challenges', async () => (await exchange.methods.attested()) >= opts.providers, 60_000)

    log('signing the requesters in through chromium; creating the chats\' API keys')
    // Ctrl-C is ours: the load ends, and everything closes in order.
    browser = await launchBrowser({ handleSIGINT: false })
    const cookies = new Map<string, string>()
    for (const r of requesters) {
      const context = await browser.newContext()
      try {
        cookies.set(r.did, await sessionCookie(await signInWithBrowser(context, consoleUrl, r.handle, r.password)))
      } finally {
        await context.close()
      }
    }
    const tally = new Tally()
    let stopped = false
    let overNow!: () => void
    const over = new Promise<void>((r) => (overNow = r))
    endLoad = () => {
      stopped = true
      overNow()
    }
    const ctx: LoadContext = { tally, stopped: () => stopped, over }
    const chatKeys: string[] = []
    for (let i = 0; i < opts.chats; i++) {
      const r = requesters[i % requesters.length]!
      const key = await createKey(ctx, consoleUrl, cookies.get(r.did)!, `stress-chat-${i}`, ['inference'])
      if (!key) throw new Error(`could not create an API key: ${tally.samples.join('; ')}`)
      chatKeys.push(key.secret)
    }

    log(`starting the relay (recorded firehose, looped, ${opts.firehoseRate} events/s) and the second indexer`)
    const relay = await startRole('relay', { rate: opts.firehoseRate, recordingDir: opts.recordingDir, recordEvents: opts.recordEvents })
    started.push(relay)
    const indexer = await startRole('indexer', { relayUrl: relay.info.url, relayHttpUrl: relay.info.httpUrl })
    started.push(indexer)

    const processes: Record<string, { pid: number; vitals(reset?: boolean): Promise<Vitals> }> = {
      driver: { pid: process.pid, vitals: async (reset) => vitals(reset) },
      network: { pid: network.pid, vitals: network.methods.vitals },
      exchange: { pid: exchange.pid, vitals: exchange.methods.vitals },
      provider: { pid: provider.pid, vitals: provider.methods.vitals },
      relay: { pid: relay.pid, vitals: relay.methods.vitals },
      indexer: { pid: indexer.pid, vitals: indexer.methods.vitals },
    }
    const t0 = performance.now()
    for (const [name, p] of Object.entries(processes)) series.set(name, new RssSeries(p.pid, t0))
    // RSS from /proc every second; the heap (over IPC) every 10 s, kept once a minute.
    const sampleHeaps = (reset = false) =>
      Promise.all(
        Object.entries(processes).map(async ([name, p]) => {
          const v = await p.vitals(reset).catch(() => null)
          if (v) series.get(name)!.sampleHeap(performance.now(), v.heapUsedMB)
          return [name, v] as const
        }),
      )
    let tick = 0
    const sampleAll = () => {
      const now = performance.now()
      for (const s of series.values()) s.sample(now)
      if (tick++ % 10 === 0) void sampleHeaps()
    }
    // The event-loop delay is measured from here.
    await sampleHeaps(true)
    sampleAll()
    sampler = setInterval(sampleAll, 1000)

    // ---- the load ---------------------------------------------------------------------
    const targets = [
      ...readTargets('exchange', appviewUrl, { requesters: requesters.map((r) => r.did), subjects: providers.map((p) => p.did), exchangeData: true }),
      ...readTargets('replay', indexer.info.appviewUrl, { requesters: [], subjects: relay.info.dids, exchangeData: false }),
    ]
    log(`load for ${opts.durationSec} s: ${opts.readers} readers over ${targets.length} lists, ${opts.chats} chats, a sign-in every ${opts.signInEverySec} s, ${opts.keyLoops} API-key loops`)
    const loadStart = performance.now()
    const sentAtStart = (await relay.methods.progress(-1)).sent
    const loops: Promise<void>[] = [
      ...Array.from({ length: opts.readers }, (_, i) => reader(ctx, targets, i)),
      ...chatKeys.map((apiKey, loop) => chatter(ctx, { baseURL: `${consoleUrl}/v1`, apiKey, loop, maxTokens: opts.maxTokens })),
      signIns(ctx, { browser, consoleUrl, accounts: requesters, everyMs: opts.signInEverySec * 1000, onCookie: (did, c) => cookies.set(did, c) }),
      ...Array.from({ length: opts.keyLoops }, (_, loop) => keyCalls(ctx, { consoleUrl, loop, session: (i) => cookies.get(requesters[(i + loop) % requesters.length]!.did)! })),
    ]
    const timer = setTimeout(endLoad, opts.durationSec * 1000)
    if (opts.signal?.aborted) endLoad()
    opts.signal?.addEventListener('abort', endLoad, { once: true })
    let lastReport = performance.now()
    const progress = setInterval(() => {
      if (performance.now() - lastReport < 30_000) return
      lastReport = performance.now()
      const mem = [...series.entries()].map(([n, s]) => `${n} ${s.report().endMB}`).join(', ')
      const errors = [...tally.errors.entries()].sort((a, b) => b[1] - a[1]).slice(0, 5).map(([k, v]) => `${k} ${v}`)
      log(`${Math.round((lastReport - loadStart) / 1000)} s: ${[...tally.served.entries()].map(([k, v]) => `${k} ${v}`).join(', ')}; errors ${tally.errorCount}${errors.length ? ` (${errors.join(', ')})` : ''}; RSS MB ${mem}`)
    }, 1000)
    await over
    clearTimeout(timer)
    clearInterval(progress)
    const ranSec = (performance.now() - loadStart) / 1000

    // Lag as the load ends, before anything else moves.
    const indexedSeq = await indexer.methods.cursor()
    const relayAtEnd: RelayProgress = await relay.methods.progress(indexedSeq)
    const [pdsSeq, exchangeSeq] = await Promise.all([network.methods.seq(), exchange.methods.cursor()])
    log('load over: letting the requests in flight finish')
    // The loops end after their request in hand; each request is bounded by its own timeout.
    await Promise.all(loops)
    clearInterval(sampler)
    sampler = null
    sampleAll()
    for (const [name, v] of await sampleHeaps()) if (v) series.get(name)!.loopDelay(v.loopDelayP99Ms, v.loopDelayMaxMs)

    // The relay stops: how long until the indexer has everything it was sent.
    await relay.close()
    started.splice(started.indexOf(relay), 1)
    const drainStart = performance.now()
    let drainedAfterSec: number | null = null
    try {
      await waitFor('the indexer to catch up', async () => (await indexer.methods.cursor()) >= relayAtEnd.lastSeq, 60_000)
      drainedAfterSec = (performance.now() - drainStart) / 1000
    } catch {
      drainedAfterSec = null
    }
    const indexerStats = await indexer.methods.stats()
    const exchangeStats = await exchange.methods.indexerStats()
    // Everything the PDS and the recording hold is valid: a refused record or commit is an error. Except one
    // reason, by construction of the loop: the replay's later passes carry the recorded commits again, which
    // the indexer verifies and then refuses as stale (their revs are not newer).
    const byReason = (rs: { reason: string; collection: string; count: number }[]) => Object.fromEntries(rs.map((r) => [`${r.reason} ${r.collection}`.trim(), r.count]))
    for (const [name, r] of [['replay indexer', indexerStats], ['exchange indexer', exchangeStats]] as const) {
      for (const x of r.rejections) {
        if (name === 'replay indexer' && x.reason === STALE_REV) continue
        tally.error(`${name} refused/${x.reason}`, `${x.count} ${x.collection || 'commits'} refused`, x.count)
      }
    }

    const latency: Record<string, LatencyRow> = {}
    for (const [endpoint, h] of [...tally.latency.entries()].sort(([a], [b]) => a.localeCompare(b))) {
      latency[endpoint] = { count: h.count, p50Ms: round(h.percentile(50)), p99Ms: round(h.percentile(99)), maxMs: round(h.max) }
    }
    const memory = Object.fromEntries([...series.entries()].map(([n, s]) => [n, s.report()]))
    const soak = ranSec >= SOAK_SEC
    const errorCount = tally.errorCount
    const { signal: _s, log: _l, cpuProfile: _c, cpuProfileDir: _d, ...settings } = opts
    return {
      settings,
      environment: { node: process.version, cores: availableParallelism(), loadAvgStart, loadAvgEnd: loadavg()[0]! },
      ranSec: round(ranSec),
      interrupted: opts.signal?.aborted ?? false,
      served: Object.fromEntries(tally.served),
      errors: Object.fromEntries(tally.errors),
      errorCount,
      errorSamples: tally.samples,
      latency,
      firehose: {
        rate: opts.firehoseRate,
        recordingFrames: relay.info.frames,
        sent: relayAtEnd.sent,
        sentPerSec: Math.round((relayAtEnd.sent - sentAtStart) / ranSec),
        lastSeqSent: relayAtEnd.lastSeq,
        indexedSeq,
        lagEvents: Math.max(0, relayAtEnd.lastSeq - indexedSeq),
        lagSec: round(relayAtEnd.behindMs / 1000),
        drainedAfterSec: drainedAfterSec === null ? null : round(drainedAfterSec),
        indexer: { ...indexerStats.stats },
        rejections: byReason(indexerStats.rejections),
      },
      exchangeIndexer: { pdsSeq, indexedSeq: exchangeSeq, lagEvents: Math.max(0, pdsSeq - exchangeSeq), stats: { ...exchangeStats.stats }, rejections: byReason(exchangeStats.rejections) },
      memory,
      ok: errorCount === 0 && (!soak || Object.values(memory).every((m) => m.verdict === 'bounded')),
    }
  } finally {
    endLoad()
    if (sampler) clearInterval(sampler)
    await browser?.close().catch(() => undefined)
    // Providers first (they finish their receipt writes), then the exchange, then the network.
    for (const r of started.reverse()) await r.close().catch(() => undefined)
    if (prevTmp === undefined) delete process.env.TMPDIR
    else process.env.TMPDIR = prevTmp
    if (prevLevel === undefined) delete process.env.COCORE_LOG_LEVEL
    else process.env.COCORE_LOG_LEVEL = prevLevel
    rmSync(tmp, { recursive: true, force: true })
  }
}

const round = (x: number) => (Number.isFinite(x) ? Math.round(x * 100) / 100 : x)

// ---- the printed report ---------------------------------------------------------------

export function formatReport(r: StressReport): string {
  const table = (rows: string[][]) => {
    const widths = rows[0]!.map((_, c) => Math.max(...rows.map((row) => (row[c] ?? '').length)))
    return rows.map((row) => row.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  ')).join('\n')
  }
  const ms = (x: number) => (Number.isFinite(x) ? `${x.toFixed(1)} ms` : 'n/a')
  const s = r.settings
  const f = r.firehose
  const out: string[] = [
    `environment: node ${r.environment.node}, ${r.environment.cores} cores, load average ${r.environment.loadAvgStart.toFixed(2)} at start, ${r.environment.loadAvgEnd.toFixed(2)} at the end`,
    `settings: ${s.durationSec} s; firehose ${s.firehoseRate} events/s; ${s.readers} readers; ${s.chats} chats (${s.requesters} requesters, ${s.providers} providers, ${s.tokenDelayMs} ms per piece, max_tokens ${s.maxTokens}); a sign-in every ${s.signInEverySec} s; ${s.keyLoops} API-key loops`,
    `ran ${r.ranSec.toFixed(1)} s${r.interrupted ? ' (interrupted)' : ''}`,
    '',
    'requests served',
    table([['kind', 'served', 'per s'], ...Object.entries(r.served).map(([k, v]) => [k, String(v), (v / r.ranSec).toFixed(1)])]),
    '',
    `errors: ${r.errorCount}`,
    ...Object.entries(r.errors).map(([k, v]) => `  ${k}: ${v}`),
    ...(r.errorSamples.length ? ['first errors:', ...r.errorSamples.map((x) => `  ${x}`)] : []),
    '',
    'latency per endpoint',
    table([['endpoint', 'count', 'p50', 'p99', 'max'], ...Object.entries(r.latency).map(([k, v]) => [k, String(v.count), ms(v.p50Ms), ms(v.p99Ms), ms(v.maxMs)])]),
    '',
    `firehose replay: ${f.sent} events sent (${f.sentPerSec}/s during the load; recording of ${f.recordingFrames} frames, looped)`,
    `indexer lag at the end: ${f.lagEvents} events (seq ${f.indexedSeq} indexed of ${f.lastSeqSent} sent), ${Number.isFinite(f.lagSec) ? f.lagSec.toFixed(2) : 'n/a'} s behind; ${f.drainedAfterSec === null ? 'NOT caught up within 60 s after the relay stopped' : `caught up ${f.drainedAfterSec.toFixed(2)} s after the relay stopped`}`,
    `  indexer: ${Object.entries(f.indexer).map(([k, v]) => `${k} ${v}`).join(', ')}; refused: ${Object.entries(f.rejections).map(([k, v]) => `${k} ${v}`).join(', ') || 'none'}`,
    `exchange AppView: ${r.exchangeIndexer.lagEvents} events behind its PDS at the end (seq ${r.exchangeIndexer.indexedSeq} of ${r.exchangeIndexer.pdsSeq}); ${Object.entries(r.exchangeIndexer.stats).map(([k, v]) => `${k} ${v}`).join(', ')}`,
    '',
    `memory (RSS, MB) and CPU (% of one core) of each process while the load ran${r.ranSec < SOAK_SEC ? ` (growth is judged on runs of ${SOAK_SEC / 60} min or more: start-up and warm-up dominate a shorter one)` : ''}`,
    table([
      ['process', 'pid', 'peak', 'start', 'end', 'mid 1/3', 'last 1/3', 'MB/min', 'verdict', 'cpu s', 'cpu %', 'loop delay p99', 'max'],
      ...Object.entries(r.memory).map(([k, m]) => [k, String(m.pid), m.peakMB.toFixed(1), m.startMB.toFixed(1), m.endMB.toFixed(1), m.middleThirdMB.toFixed(1), m.lastThirdMB.toFixed(1), m.slopeMBPerMin.toFixed(2), r.ranSec < SOAK_SEC ? '-' : m.verdict, m.cpuSec.toFixed(1), `${m.cpuPercent}`, ms(m.loopDelayP99Ms), ms(m.loopDelayMaxMs)]),
    ]),
  ]
  if (r.ranSec >= 120) {
    out.push('', 'RSS per minute (MB)')
    const names = Object.keys(r.memory)
    const minutes = Math.max(...names.map((n) => r.memory[n]!.perMinuteMB.length))
    out.push(table([['t', ...names], ...Array.from({ length: minutes }, (_, i) => [`${r.memory[names[0]!]!.perMinuteMB[i]?.atSec ?? '?'} s`, ...names.map((n) => r.memory[n]!.perMinuteMB[i]?.rssMB.toFixed(1) ?? '')])]))
    out.push('', 'V8 heap used per minute (MB)')
    const heapRows = Math.max(...names.map((n) => r.memory[n]!.heapPerMinuteMB.length))
    out.push(table([['t', ...names], ...Array.from({ length: heapRows }, (_, i) => [`${r.memory[names[0]!]!.heapPerMinuteMB[i]?.atSec ?? '?'} s`, ...names.map((n) => r.memory[n]!.heapPerMinuteMB[i]?.heapMB.toFixed(1) ?? '')])]))
  }
  out.push('', r.ok ? 'OK: no errors' + (r.ranSec >= SOAK_SEC ? ', memory bounded' : '') : `FAILED: ${r.errorCount} errors${r.ranSec >= SOAK_SEC && Object.values(r.memory).some((m) => m.verdict === 'growing') ? '; memory growing' : ''}`)
  return out.join('\n')
}
