/**
 * `npm run bench:ingest`: firehose ingest throughput of the AppView indexer.
 *
 *  1. Records (or loads from `data/bench/`) a firehose of ~20,000 frames from
 *     a local PDS, of which ~1 commit in 100 touches dev.cocore.*.
 *  2. BASELINE: decodes every frame in-process (header + body, two CBOR
 *     values, with cborg and the atproto decode options) and checks the op
 *     paths for dev.cocore. — the floor of any consumer.
 *  3. SYSTEM: an AppView indexer (no HTTP) on a fresh SQLite DB reads the
 *     recording from a local replay server; timed from start until its cursor
 *     reaches the last seq of the recording. Run twice per round: as it runs
 *     (commits of other collections told from the raw frame bytes) and with
 *     the library decoding every frame (`rawCommitFilter: false`, the slow
 *     path). Both must end with the same index: rows, repos' sync state,
 *     rejections and counters; the run fails otherwise.
 *
 * The machine is shared: each round measures the baseline and both systems
 * one after the other, and besides wall time each reports the CPU time of the
 * thread doing the work (the indexer's main thread; the replay server runs on
 * its own), so "per CPU second" figures are what one core does.
 *
 * Options: --events N (use the first N frames; records N if the saved
 * recording is shorter), --runs R (default 3, median reported), --rerecord.
 * Writes the figures to data/bench/ingest.json.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { availableParallelism, loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { decodeFirst } from 'cborg'
import { decodeOptions } from '@atproto/lex-cbor'
import { AppView } from '../appview/index.ts'
import { COCORE_PREFIX, DEFAULT_DIR, DEFAULT_EVENTS, loadRecording, recordFirehose, type Recording } from './record-firehose.ts'
import { diffLines, indexState } from './index-state.ts'
import { startReplayWorker, type ReplayHandle } from './replay-worker.ts'

const TARGET_EVENTS_PER_SEC = 50_000

const { values: args } = parseArgs({
  options: {
    events: { type: 'string' },
    runs: { type: 'string', default: '3' },
    rerecord: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  },
})
if (args.help) {
  process.stdout.write('usage: npm run bench:ingest -- [--events N] [--runs R] [--rerecord]\n')
  process.exit(0)
}
const eventsArg = args.events === undefined ? undefined : Number(args.events)
if (eventsArg !== undefined && !(Number.isSafeInteger(eventsArg) && eventsArg > 0)) throw new Error(`--events: expected a positive integer, got ${args.events}`)
const runs = Number(args.runs)
if (!(Number.isSafeInteger(runs) && runs > 0)) throw new Error(`--runs: expected a positive integer, got ${args.runs}`)

const log = (msg: string) => process.stderr.write(`[bench] ${msg}\n`)
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}
const mb = (bytes: number) => Math.round(bytes / 1e5) / 10

/** Samples RSS every few ms; the peak since `reset`. */
class RssSampler {
  peak = 0
  private timer: NodeJS.Timeout | null = null
  start() {
    this.peak = process.memoryUsage.rss()
    this.timer = setInterval(() => {
      const r = process.memoryUsage.rss()
      if (r > this.peak) this.peak = r
    }, 10)
    return this
  }
  stop() {
    if (this.timer) clearInterval(this.timer)
    const r = process.memoryUsage.rss()
    if (r > this.peak) this.peak = r
    return this.peak
  }
}

interface FrameBody {
  seq?: number
  repo?: string
  ops?: { action: string; path: string; cid: unknown }[]
}

/** What the frames hold: commits touching dev.cocore.*, and the dev.cocore records alive at the end. */
function scan(frames: Buffer[]) {
  let commits = 0
  let cocoreCommits = 0
  let cocoreOps = 0
  const live = new Set<string>()
  const kinds: Record<string, number> = {}
  for (const f of frames) {
    const [header, rest] = decodeFirst(f, decodeOptions) as [{ t?: string }, Uint8Array]
    const [body] = decodeFirst(rest, decodeOptions) as [FrameBody, Uint8Array]
    const t = header.t ?? '?'
    kinds[t] = (kinds[t] ?? 0) + 1
    if (t !== '#commit') continue
    commits++
    let touched = false
    for (const op of body.ops ?? []) {
      if (!op.path.startsWith(COCORE_PREFIX)) continue
      touched = true
      cocoreOps++
      const uri = `at://${body.repo}/${op.path}`
      if (op.action === 'delete') live.delete(uri)
      else live.add(uri)
    }
    if (touched) cocoreCommits++
  }
  return { commits, cocoreCommits, cocoreOps, cocoreRecords: live.size, kinds }
}

/** CPU seconds of the calling thread. */
const threadCpu = () => {
  const c = process.threadCpuUsage()
  return (c.user + c.system) / 1e6
}

/** BASELINE: decode header + body of every frame and look for dev.cocore. ops. */
function baseline(frames: Buffer[]): { seconds: number; cpuSeconds: number; matched: number } {
  const t0 = performance.now()
  const c0 = threadCpu()
  let matched = 0
  for (const f of frames) {
    const [, rest] = decodeFirst(f, decodeOptions)
    const [body] = decodeFirst(rest, decodeOptions) as [FrameBody, Uint8Array]
    const ops = body.ops
    if (ops && ops.some((op) => op.path.startsWith(COCORE_PREFIX))) matched++
  }
  return { seconds: (performance.now() - t0) / 1000, cpuSeconds: threadCpu() - c0, matched }
}

interface SystemRun {
  seconds: number
  /** From start() until the first events were applied. */
  startupSeconds: number
  /** Events/s from the first applied event to the last (start-up excluded). */
  steadyEventsPerSec: number
  events: number
  records: number
  cpuSeconds: number
  /** CPU time of the indexer's thread alone. */
  threadCpuSeconds: number
  /** Events per CPU second of the indexer's thread from the first applied event to the last (start-up excluded). */
  steadyEventsPerThreadCpuSec: number
  peakRss: number
  rssAtStart: number
  stats: AppView['indexer']['stats']
  rejections: { reason: string; collection: string; count: number }[]
  /** The index at the end (see indexState), to compare the two paths. */
  state: string
}

async function system(opts: { source: string; plcUrl: string; handlesViaPds: string; lastSeq: number; tmp: string; timeoutMs: number; rawCommitFilter: boolean }): Promise<SystemRun> {
  const dbDir = mkdtempSync(join(opts.tmp, 'db-'))
  global.gc?.()
  const rss = new RssSampler().start()
  const rssAtStart = rss.peak
  const av = new AppView({
    dbPath: join(dbDir, 'appview.sqlite'),
    sources: [opts.source],
    plcUrl: opts.plcUrl,
    allowHttp: true,
    handlesViaPds: opts.handlesViaPds,
    replayFromStart: true,
    rawCommitFilter: opts.rawCommitFilter,
  })
  try {
    const cpu0 = process.cpuUsage()
    const thread0 = threadCpu()
    const t0 = performance.now()
    let tFirst = 0
    let firstSeq = 0
    let cpuFirst = 0
    await av.start()
    await new Promise<void>((resolve, reject) => {
      const deadline = t0 + opts.timeoutMs
      const timer = setInterval(() => {
        const c = av.indexer.cursors()[opts.source]
        // Start-up (database, migrations, connection) ends when the first events are applied.
        if (!tFirst && c !== undefined && c > 0) {
          tFirst = performance.now()
          firstSeq = c
          cpuFirst = threadCpu()
        }
        if (c !== undefined && c >= opts.lastSeq) {
          clearInterval(timer)
          resolve()
        } else if (performance.now() > deadline) {
          clearInterval(timer)
          reject(new Error(`indexer cursor at ${c} after ${opts.timeoutMs} ms, expected ${opts.lastSeq}`))
        }
      }, 2)
    })
    const tEnd = performance.now()
    const threadCpuEnd = threadCpu()
    const threadCpuSeconds = threadCpuEnd - thread0
    const seconds = (tEnd - t0) / 1000
    const cpu = process.cpuUsage(cpu0)
    // Stopped before reading the index: cursors and heads kept in memory are written on the way out.
    await av.indexer.stop()
    const records = av.db.$client.prepare('SELECT count(*) FROM records').pluck().get() as number
    return {
      seconds,
      startupSeconds: (tFirst - t0) / 1000,
      steadyEventsPerSec: (opts.lastSeq - firstSeq) / ((tEnd - tFirst) / 1000),
      events: av.indexer.stats.events,
      records,
      cpuSeconds: (cpu.user + cpu.system) / 1e6,
      threadCpuSeconds,
      steadyEventsPerThreadCpuSec: (opts.lastSeq - firstSeq) / (threadCpuEnd - cpuFirst),
      peakRss: rss.stop(),
      rssAtStart,
      stats: { ...av.indexer.stats },
      rejections: av.store.rejectionCounts(),
      state: indexState(av.db, { cursors: true }),
    }
  } finally {
    rss.stop()
    await av.stop()
    rmSync(dbDir, { recursive: true, force: true })
  }
}

async function main() {
  // Our own temp files (AppView DBs) live in a private dir, removed at the end.
  const tmp = mkdtempSync(join(tmpdir(), 'cocore-bench-ingest-'))
  let closeNetwork: (() => Promise<void>) | null = null
  let replay: ReplayHandle | null = null
  try {
    // (a) the recording
    let recording: Recording | null = args.rerecord ? null : loadRecording()
    const wanted = eventsArg ?? DEFAULT_EVENTS
    if (recording && recording.frames.length < wanted) {
      log(`saved recording has ${recording.frames.length} frames, fewer than the ${wanted} wanted: recording again`)
      recording = null
    }
    let identity: { plcUrl: string; handlesViaPds: string } | null = null
    let source: 'recorded now (live network)' | 'saved recording' = 'saved recording'
    if (recording) {
      log(`using saved recording ${DEFAULT_DIR}/firehose.frames (${recording.frames.length} frames, recorded ${recording.meta.createdAt}; --rerecord to make a new one)`)
    } else {
      log(`recording a firehose of ~${wanted} frames from a local PDS (takes a few minutes; saved for later runs)`)
      const res = await recordFirehose({ events: wanted, progress: true })
      recording = res.recording
      closeNetwork = res.close
      identity = { plcUrl: res.network.plcUrl, handlesViaPds: res.network.pdsUrl }
      source = 'recorded now (live network)'
    }
    const n = Math.min(eventsArg ?? recording.frames.length, recording.frames.length)
    const frames = recording.frames.slice(0, n)
    const seqs = recording.seqs.slice(0, n)
    const lastSeq = Math.max(...seqs)
    const bytes = frames.reduce((a, f) => a + f.length, 0)
    const mix = scan(frames)
    const full = n === recording.frames.length
    log(`${n} frames (${mb(bytes)} MB), ${mix.commits} commits, ${mix.cocoreCommits} touching dev.cocore.* (${mix.cocoreOps} ops), last seq ${lastSeq}`)

    // (b) BASELINE and (c) SYSTEM, round after round: load from others on the machine hits all three alike.
    baseline(frames.slice(0, Math.min(n, 2000))) // warm-up
    replay = await startReplayWorker(n)
    // A saved recording's DIDs are not in any running PLC: the replay server serves their recorded documents.
    identity ??= { plcUrl: replay.httpUrl, handlesViaPds: replay.httpUrl }
    const base: ReturnType<typeof baseline>[] = []
    const fast: SystemRun[] = []
    const slow: SystemRun[] = []
    const describe = (run: SystemRun) =>
      `${Math.round(n / run.seconds)} events/s wall (steady ${Math.round(run.steadyEventsPerSec)}/s after ${(run.startupSeconds * 1000).toFixed(0)} ms start-up), ` +
      `${Math.round(n / run.threadCpuSeconds)} per indexer-thread CPU s (steady ${Math.round(run.steadyEventsPerThreadCpuSec)}), ${run.records} records, process cpu ${Math.round((100 * run.cpuSeconds) / run.seconds)}%, peak RSS ${mb(run.peakRss)} MB`
    for (let r = 0; r < runs; r++) {
      const b = baseline(frames)
      base.push(b)
      log(`round ${r + 1}/${runs} baseline: ${Math.round(n / b.seconds)} frames/s wall, ${Math.round(n / b.cpuSeconds)} per CPU s (matched ${b.matched} commits)`)
      for (const rawCommitFilter of r % 2 ? [false, true] : [true, false]) {
        const run = await system({ source: replay.url, ...identity, lastSeq, tmp, timeoutMs: 600_000, rawCommitFilter })
        ;(rawCommitFilter ? fast : slow).push(run)
        log(`round ${r + 1}/${runs} ${rawCommitFilter ? 'system' : 'slow path'}: ${describe(run)}`)
      }
    }
    const summary = (sys: SystemRun[]) => {
      const seconds = median(sys.map((s) => s.seconds))
      return {
        seconds: Number(seconds.toFixed(3)),
        eventsPerSec: Math.round(n / seconds),
        eventsPerThreadCpuSec: Math.round(median(sys.map((s) => n / s.threadCpuSeconds))),
        recordsPerSec: Math.round(sys[0]!.records / seconds),
        runsEventsPerSec: sys.map((s) => Math.round(n / s.seconds)),
        runsEventsPerThreadCpuSec: sys.map((s) => Math.round(n / s.threadCpuSeconds)),
        steadyEventsPerThreadCpuSec: Math.round(median(sys.map((s) => s.steadyEventsPerThreadCpuSec))),
        steadyEventsPerSec: Math.round(median(sys.map((s) => s.steadyEventsPerSec))),
        startupMs: Math.round(1000 * median(sys.map((s) => s.startupSeconds))),
        cpuPercent: Math.round(100 * median(sys.map((s) => s.cpuSeconds / s.seconds))),
        recordsIndexed: sys[sys.length - 1]!.records,
        indexerStats: sys[sys.length - 1]!.stats,
        rejections: sys[sys.length - 1]!.rejections,
        peakRssMB: mb(Math.max(...sys.map((s) => s.peakRss))),
        rssAtStartMB: mb(median(sys.map((s) => s.rssAtStart))),
      }
    }
    const baseFps = median(base.map((b) => n / b.seconds))
    const baseFpcs = median(base.map((b) => n / b.cpuSeconds))
    const system_ = summary(fast)
    const slowPath = summary(slow)
    const recordsOk = fast.every((s) => s.records === mix.cocoreRecords) && (!full || mix.cocoreRecords === recording.meta.writer.cocoreRecords)
    // The same index, whichever path: the slow path is today's reference.
    const reference = slow[0]!.state
    const sameIndex = [...fast, ...slow].every((s) => s.state === reference)
    // Every counter but the one that says which path a commit took.
    const counters = (s: SystemRun) => JSON.stringify({ ...s.stats, rawForeignCommits: 0 })
    const sameCounters = [...fast, ...slow].every((s) => counters(s) === counters(slow[0]!))
    const ok = recordsOk && sameIndex && sameCounters

    const result = {
      at: new Date().toISOString(),
      node: process.version,
      load: { loadavg1m: Number(loadavg()[0]!.toFixed(2)), cpus: availableParallelism() },
      recording: {
        source,
        file: `${DEFAULT_DIR}/firehose.frames`,
        framesUsed: n,
        framesInRecording: recording.frames.length,
        bytes,
        lastSeq,
        frameKinds: mix.kinds,
        commits: mix.commits,
        cocoreCommits: mix.cocoreCommits,
        cocoreOps: mix.cocoreOps,
        writer: recording.meta.writer,
      },
      runs,
      baseline: {
        framesPerSec: Math.round(baseFps),
        framesPerCpuSec: Math.round(baseFpcs),
        runsFramesPerSec: base.map((b) => Math.round(n / b.seconds)),
        runsFramesPerCpuSec: base.map((b) => Math.round(n / b.cpuSeconds)),
        matchedCommits: base[0]!.matched,
      },
      system: {
        ...system_,
        recordsExpectedFromFrames: mix.cocoreRecords,
        recordsWrittenByRecorder: full ? recording.meta.writer.cocoreRecords : null,
        recordsMatch: recordsOk,
      },
      slowPath,
      sameIndexAsSlowPath: sameIndex,
      sameCountersAsSlowPath: sameCounters,
      ratioSystemToBaseline: Number((system_.eventsPerSec / baseFps).toFixed(4)),
      ratioSystemToBaselinePerCpuSec: Number((system_.eventsPerThreadCpuSec / baseFpcs).toFixed(4)),
      ratioSystemToBaselinePerCpuSecSteady: Number((system_.steadyEventsPerThreadCpuSec / baseFpcs).toFixed(4)),
      ratioSystemToSlowPath: Number((system_.eventsPerSec / slowPath.eventsPerSec).toFixed(4)),
      targetEventsPerSec: TARGET_EVENTS_PER_SEC,
      ratioSystemToTarget: Number((system_.eventsPerSec / TARGET_EVENTS_PER_SEC).toFixed(4)),
      ratioSystemToTargetPerCpuSec: Number((system_.eventsPerThreadCpuSec / TARGET_EVENTS_PER_SEC).toFixed(4)),
      ratioSystemToTargetPerCpuSecSteady: Number((system_.steadyEventsPerThreadCpuSec / TARGET_EVENTS_PER_SEC).toFixed(4)),
      processMaxRssMB: mb(process.resourceUsage().maxRSS * 1024),
    }

    const rows: [string, string][] = [
      ['frames (events)', `${n}  (${mb(bytes)} MB, last seq ${lastSeq})`],
      ['commits / touching dev.cocore.*', `${mix.commits} / ${mix.cocoreCommits}  (${mix.cocoreOps} cocore ops)`],
      ['recording', source],
      ['load', `1-min load average ${result.load.loadavg1m} on ${result.load.cpus} cores at the end`],
      [`baseline decode (median of ${runs})`, `${result.baseline.framesPerSec} frames/s wall, ${result.baseline.framesPerCpuSec} per CPU s`],
      [`system indexer (median of ${runs})`, `${system_.eventsPerSec} events/s wall, ${system_.eventsPerThreadCpuSec} per indexer-thread CPU s  (${system_.seconds} s wall incl. start-up, process cpu ${system_.cpuPercent}% incl. replay thread)`],
      ['  steady (start-up excluded)', `${system_.steadyEventsPerSec} events/s wall, ${system_.steadyEventsPerThreadCpuSec} per indexer-thread CPU s, after ${system_.startupMs} ms start-up`],
      ['  raw-frame path', `${system_.indexerStats.rawForeignCommits} of ${system_.indexerStats.events} events never decoded`],
      [`slow path, every frame decoded (median of ${runs})`, `${slowPath.eventsPerSec} events/s wall, ${slowPath.eventsPerThreadCpuSec} per indexer-thread CPU s (steady ${slowPath.steadyEventsPerThreadCpuSec})`],
      ['indexed records/s', `${system_.recordsPerSec}`],
      ['records indexed / expected', `${system_.recordsIndexed} / ${mix.cocoreRecords}${full ? ` (recorder wrote ${recording.meta.writer.cocoreRecords})` : ''}  ${recordsOk ? 'OK' : 'MISMATCH'}`],
      ['index and counters = slow path', `${sameIndex ? 'same index' : 'INDEX DIFFERS'}, ${sameCounters ? 'same counters' : 'COUNTERS DIFFER'}`],
      ['ratio system / baseline', `${result.ratioSystemToBaseline} wall, ${result.ratioSystemToBaselinePerCpuSec} per CPU s (steady ${result.ratioSystemToBaselinePerCpuSecSteady})`],
      ['ratio system / slow path', `${result.ratioSystemToSlowPath} wall`],
      [`vs target ${TARGET_EVENTS_PER_SEC} events/s`, `${result.ratioSystemToTarget}x wall, ${result.ratioSystemToTargetPerCpuSec}x per indexer-thread CPU s (steady ${result.ratioSystemToTargetPerCpuSecSteady}x), ${(system_.steadyEventsPerSec / TARGET_EVENTS_PER_SEC).toFixed(4)}x steady wall`],
      ['peak RSS during system runs', `${system_.peakRssMB} MB (at start ${system_.rssAtStartMB} MB; process max ${result.processMaxRssMB} MB)`],
    ]
    const w = Math.max(...rows.map((r) => r[0].length))
    process.stdout.write('\n' + rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join('\n') + '\n')
    mkdirSync(DEFAULT_DIR, { recursive: true })
    writeFileSync(join(DEFAULT_DIR, 'ingest.json'), JSON.stringify(result, null, 2) + '\n')
    process.stdout.write(`\nwritten ${DEFAULT_DIR}/ingest.json\n`)
    if (!sameIndex) process.stderr.write(`index differs from the slow path's:\n${diffLines(reference, fast.concat(slow).find((s) => s.state !== reference)!.state)}\n`)
    if (!ok) process.exitCode = 1
  } finally {
    await replay?.close()
    await closeNetwork?.()
    rmSync(tmp, { recursive: true, force: true })
  }
}

await main()
