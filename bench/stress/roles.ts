/**
 * The processes of the stress run, each a role of bench/roles.ts started by
 * forking this file with `--role <name>`:
 *  - network: PLC + PDS (dev-env) and the accounts;
 *  - exchange: an AppView indexing the PDS, and the console with the exchange
 *    and its ledger (settlements published on the exchange's repo);
 *  - relay: a recorded firehose served at a steady rate, looped, speaking
 *    subscribeRepos (bench/replay-server.ts);
 *  - indexer: a second AppView, consuming the relay, serving reads;
 *  - provider: several reference agents (one account each) on the built-in engine.
 */
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { join } from 'node:path'
import { AppView } from '../../appview/index.ts'
import { startConsole } from '../../console/index.ts'
import { toWs } from '../../src/config.ts'
import { ProviderAgent } from '../../src/provider/agent.ts'
import { BuiltinEngine } from '../../src/provider/engine.ts'
import { consoleOpts } from '../../test/fixture/console.ts'
import { DEFAULT_DIR, loadRecording, recordFirehose } from '../record-firehose.ts'
import { startReplayServer } from '../replay-server.ts'
import { serveRole, startRole as startRoleOf, type Role } from '../roles.ts'

export const MODEL = 'builtin'

export interface Account {
  did: string
  handle: string
  password: string
}

export type NetworkInfo = { plcUrl: string; pdsUrl: string; exchange: Account; requesters: Account[]; providers: Account[] }

async function networkRole(p: { requesters: string[]; providers: string[]; exchange: string }): Promise<Role<NetworkInfo, { seq(): Promise<number> }>> {
  const { LocalNetwork } = await import('../../src/dev/network.ts')
  const net = await LocalNetwork.create()
  const account = async (handle: string): Promise<Account> => {
    const a = await net.createAccount(handle)
    return { did: a.did, handle: a.handle, password: a.password }
  }
  const exchange = await account(p.exchange)
  const requesters: Account[] = []
  for (const h of p.requesters) requesters.push(await account(h))
  const providers: Account[] = []
  for (const h of p.providers) providers.push(await account(h))
  return {
    info: { plcUrl: net.plcUrl, pdsUrl: net.pdsUrl, exchange, requesters, providers },
    methods: { seq: async () => (await net.net.pds.ctx.sequencer.curr()) ?? 0 },
    close: () => net.close(),
  }
}

/** The run's readers share one address, and measure answers computed, not ones served again: no limit, no cache. */
const LOAD_READS = { ratePerMinute: 0, cacheEntries: 0 }

export type ExchangeParams = { plcUrl: string; pdsUrl: string; exchange: Account }
export type IndexerReport = { stats: AppView['indexer']['stats']; rejections: { reason: string; collection: string; count: number }[] }
export type ExchangeMethods = { cursor(): Promise<number>; attested(): Promise<number>; indexerStats(): Promise<IndexerReport> }

async function exchangeRole(p: ExchangeParams): Promise<Role<{ consoleUrl: string; appviewUrl: string }, ExchangeMethods>> {
  const dir = mkdtempSync(join(tmpdir(), 'exchange-'))
  // As test/fixture/appview.ts starts it: the PDS keeps its whole log, so the AppView replays it from seq 0.
  const av = await new AppView({ dbPath: join(dir, 'appview.sqlite'), sources: [toWs(p.pdsUrl)], plcUrl: p.plcUrl, allowHttp: true, handlesViaPds: p.pdsUrl, port: 0, replayFromStart: true, publicReads: LOAD_READS }).start()
  const svc = await startConsole(
    consoleOpts(null, av.url, {
      plcUrl: p.plcUrl,
      pdsUrl: p.pdsUrl,
      index: av.consoleIndex(),
      exchangeDid: p.exchange.did,
      // The ledger on, as `npm start` runs it: admission, settlements on the exchange's repo.
      exchangeAccount: { pdsUrl: p.pdsUrl, identifier: p.exchange.handle, password: p.exchange.password },
      // The per-key and per-address rates and the daily token quota are set above what the run asks: every request it makes is a valid one.
      // Its simulated clients share one address, whose revoked-key checks would pass the refused-key limit.
      apiKeyRatePerMinute: 1e9,
      apiKeyIpRatePerMinute: 1e9,
      apiKeyIpFailuresPerMinute: 1e9,
      dailyTokenLimit: 1e15,
      loginRatePerMinute: 1e6,
    }),
  )
  return {
    info: { consoleUrl: svc.url, appviewUrl: av.url },
    methods: {
      cursor: async () => Object.values(av.indexer.cursors())[0] ?? -1,
      attested: async () => [...svc.gateway!.providers.values()].filter((x) => x.attested).length,
      indexerStats: async () => indexerReport(av),
    },
    close: async () => {
      await svc.close()
      await av.stop()
    },
  }
}

/** The indexer's counters, and what it refused, by reason. */
const indexerReport = (av: AppView): IndexerReport => ({ stats: { ...av.indexer.stats }, rejections: av.store.rejectionCounts() })

export type RelayParams = { rate: number; recordingDir: string; recordEvents: number }
export type RelayInfo = { url: string; httpUrl: string; frames: number; dids: string[]; recorded: boolean }
export type RelayProgress = { sent: number; lastSeq: number; behindMs: number }
export type RelayMethods = { progress(cursor: number): Promise<RelayProgress> }

async function relayRole(p: RelayParams): Promise<Role<RelayInfo, RelayMethods>> {
  let recording = loadRecording(p.recordingDir)
  let recorded = false
  if (!recording) {
    // Once per machine (data/bench is kept): a few minutes for the default 20,000 frames.
    process.stderr.write(`[stress] no recorded firehose in ${p.recordingDir}: recording ${p.recordEvents} frames from a local PDS\n`)
    const res = await recordFirehose({ events: p.recordEvents, dir: p.recordingDir, progress: true })
    await res.close()
    recording = res.recording
    recorded = true
  }
  const { accounts, didDocs } = recording.meta
  const server = await startReplayServer({
    frames: recording.frames,
    seqs: recording.seqs,
    didDocs,
    handles: Object.fromEntries(accounts.map((a) => [a.handle, a.did])),
    rate: p.rate,
    loop: true,
  })
  return {
    info: { url: server.url, httpUrl: server.httpUrl, frames: recording.frames.length, dids: accounts.map((a) => a.did), recorded },
    methods: {
      /** Frames sent on the latest subscription, and how long ago the first frame past `cursor` was sent. */
      progress: async (cursor) => {
        const conn = server.connections.at(-1)
        if (!conn) return { sent: 0, lastSeq: -1, behindMs: 0 }
        const at = cursor < conn.lastSeq ? conn.sentAt(cursor + 1) : undefined
        return { sent: conn.sent, lastSeq: conn.lastSeq, behindMs: cursor >= conn.lastSeq ? 0 : at === undefined ? NaN : performance.now() - at }
      },
    },
    close: () => server.close(),
  }
}

export type IndexerParams = { relayUrl: string; relayHttpUrl: string }
export type IndexerMethods = { cursor(): Promise<number>; stats(): Promise<IndexerReport> }

async function indexerRole(p: IndexerParams): Promise<Role<{ appviewUrl: string }, IndexerMethods>> {
  const dir = mkdtempSync(join(tmpdir(), 'indexer-'))
  // The recording's DIDs are in no running PLC: the relay serves their recorded documents and handles.
  const av = await new AppView({ dbPath: join(dir, 'appview.sqlite'), sources: [p.relayUrl], plcUrl: p.relayHttpUrl, allowHttp: true, handlesViaPds: p.relayHttpUrl, port: 0, replayFromStart: true, publicReads: LOAD_READS }).start()
  return {
    info: { appviewUrl: av.url },
    methods: {
      cursor: async () => Object.values(av.indexer.cursors())[0] ?? -1,
      stats: async () => indexerReport(av),
    },
    close: () => av.stop(),
  }
}

export type ProviderParams = { pdsUrl: string; accounts: Account[]; consoleUrl: string; exchangeDid: string; tokenDelayMs: number; maxConcurrent: number }

async function providerRole(p: ProviderParams): Promise<Role<{ agents: number }, { idle(): Promise<void> }>> {
  const agents = p.accounts.map(
    (account, i) =>
      new ProviderAgent({
        pdsUrl: p.pdsUrl,
        identifier: account.handle,
        password: account.password,
        exchangeUrl: p.consoleUrl,
        exchangeDid: p.exchangeDid,
        keyFile: join(mkdtempSync(join(tmpdir(), 'agent-')), 'key.json'),
        engine: new BuiltinEngine({ delayMs: p.tokenDelayMs }),
        models: [MODEL],
        label: `stress-${i}`,
        maxConcurrent: p.maxConcurrent,
        reconnect: { initialMs: 100, maxMs: 500 },
      }),
  )
  await Promise.all(
    agents.map(async (agent) => {
      const registered = new Promise<void>((resolve) => agent.once('registered', () => resolve()))
      await agent.start()
      await registered
    }),
  )
  return {
    info: { agents: agents.length },
    methods: { idle: async () => void (await Promise.all(agents.map((a) => a.jobs.idle()))) },
    close: async () => void (await Promise.all(agents.map((a) => a.stop()))),
  }
}

/** What a process says of itself: its V8 heap and how late its event loop ran timers (since the last reset). */
export type Vitals = { heapUsedMB: number; loopDelayP50Ms: number; loopDelayP99Ms: number; loopDelayMaxMs: number }
const loopDelay = monitorEventLoopDelay({ resolution: 10 })
loopDelay.enable()

export function vitals(reset = false): Vitals {
  const ms = (ns: number) => Math.round(ns / 1e4) / 100
  const v = {
    heapUsedMB: Math.round(process.memoryUsage().heapUsed / 1e5) / 10,
    loopDelayP50Ms: ms(loopDelay.percentile(50)),
    loopDelayP99Ms: ms(loopDelay.percentile(99)),
    loopDelayMaxMs: ms(loopDelay.max),
  }
  if (reset) loopDelay.reset()
  return v
}

/** Every role also answers `vitals`. */
const withVitals =
  <P, I, M extends Record<string, (...a: never[]) => Promise<unknown>>>(start: (p: P) => Promise<Role<I, M>>) =>
  async (p: P): Promise<Role<I, M & { vitals(reset?: boolean): Promise<Vitals> }>> => {
    const role = await start(p)
    return { ...role, methods: { ...role.methods, vitals: async (reset?: boolean) => vitals(reset) } }
  }

export const ROLES = {
  network: withVitals(networkRole),
  exchange: withVitals(exchangeRole),
  relay: withVitals(relayRole),
  indexer: withVitals(indexerRole),
  provider: withVitals(providerRole),
} as const
export type RoleName = keyof typeof ROLES

/** Starts a role in its own process (this file, forked). */
export const startRole = <N extends RoleName>(name: N, params: Parameters<(typeof ROLES)[N]>[0]) => startRoleOf(import.meta.filename, ROLES, name, params, false)

export { DEFAULT_DIR }

// Forked as a role's process.
if (process.argv[1] === import.meta.filename) {
  const at = process.argv.indexOf('--role')
  const name = process.argv[at + 1]
  if (at < 0 || !name || !(name in ROLES)) throw new Error(`--role: one of ${Object.keys(ROLES).join(', ')}`)
  // Ctrl-C reaches the whole process group: the orchestrator ends the load and closes each role in order.
  process.on('SIGINT', () => undefined)
  await serveRole(ROLES, name)
}
