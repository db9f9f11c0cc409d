/**
 * What the stress run counts, in bounded memory however long it runs:
 * latencies in log-scale histograms (1% wide buckets, so a percentile is
 * within 1% of the exact one), errors by kind (a capped number of kinds and
 * of sample messages), RSS of each process sampled once a second.
 */
import { readFileSync } from 'node:fs'

/** Latencies from 10 µs to ~30 min, 1% per bucket. */
const MIN_MS = 0.01
const GROWTH = 1.01
const BUCKETS = Math.ceil(Math.log(30 * 60_000 / MIN_MS) / Math.log(GROWTH)) + 1

export class Histogram {
  readonly counts = new Uint32Array(BUCKETS)
  count = 0
  max = 0

  add(ms: number): void {
    const b = ms <= MIN_MS ? 0 : Math.min(BUCKETS - 1, Math.ceil(Math.log(ms / MIN_MS) / Math.log(GROWTH)))
    this.counts[b]!++
    this.count++
    if (ms > this.max) this.max = ms
  }

  /** The upper edge of the bucket holding the p-th percentile (NaN when empty). */
  percentile(p: number): number {
    if (this.count === 0) return NaN
    const rank = Math.max(1, Math.ceil((p / 100) * this.count))
    let seen = 0
    for (let b = 0; b < BUCKETS; b++) {
      seen += this.counts[b]!
      if (seen >= rank) return Math.min(this.max, MIN_MS * GROWTH ** b)
    }
    return this.max
  }
}

/** Requests served and latencies, per endpoint; errors by kind. */
export class Tally {
  readonly latency = new Map<string, Histogram>()
  readonly served = new Map<string, number>()
  readonly errors = new Map<string, number>()
  readonly samples: string[] = []
  private static readonly MAX_KINDS = 200
  private static readonly MAX_SAMPLES = 20

  /** A request of `kind` (what the report counts: read, chat...) answered correctly, after `ms`, on `endpoint`. */
  ok(kind: string, endpoint: string, ms: number): void {
    this.served.set(kind, (this.served.get(kind) ?? 0) + 1)
    this.time(endpoint, ms)
  }

  /** A latency that is not a request of its own (a chat's time to first token). */
  time(endpoint: string, ms: number): void {
    let h = this.latency.get(endpoint)
    if (!h) this.latency.set(endpoint, (h = new Histogram()))
    h.add(ms)
  }

  /** A valid request that failed: its kind is `<endpoint> <status or error class>/<code>`. */
  error(kind: string, detail: string, count = 1): void {
    const k = this.errors.has(kind) || this.errors.size < Tally.MAX_KINDS ? kind : 'other'
    this.errors.set(k, (this.errors.get(k) ?? 0) + count)
    if (this.samples.length < Tally.MAX_SAMPLES) this.samples.push(`${kind}: ${detail.slice(0, 300)}`)
  }

  get errorCount(): number {
    let n = 0
    for (const v of this.errors.values()) n += v
    return n
  }
}

/** CPU seconds (user + system) a process has used, from /proc; NaN when it is gone. */
export function procCpuSec(pid: number): number {
  try {
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th, in USER_HZ (100 on Linux).
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(f[11]) + Number(f[12])) / 100
  } catch {
    return NaN
  }
}

/** VmRSS and VmHWM (peak) of a process, in bytes, from /proc; null when it is gone. */
export function procRss(pid: number): { rss: number; peak: number } | null {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8')
    const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN) * 1024
    return { rss: kb('VmRSS'), peak: kb('VmHWM') }
  } catch {
    return null
  }
}

export interface MemoryReport {
  pid: number
  /** Highest VmHWM seen: the process's peak RSS. */
  peakMB: number
  startMB: number
  endMB: number
  /** RSS at each whole minute of the run (and at its end). */
  perMinuteMB: { atSec: number; rssMB: number }[]
  /** Mean RSS over the middle and the last third of the run. */
  middleThirdMB: number
  lastThirdMB: number
  /** Least-squares slope of RSS over the last two thirds, MB per minute. */
  slopeMBPerMin: number
  /** 'bounded' unless the last third is above the middle third by more than 10% + 16 MB. */
  verdict: 'bounded' | 'growing'
  /** CPU time used between the first and the last sample, and as a share of one core. */
  cpuSec: number
  cpuPercent: number
  /** V8 heap in use at each whole minute: what a leak in JavaScript shows as, whatever the allocator keeps. */
  heapPerMinuteMB: { atSec: number; heapMB: number }[]
  /** How late the event loop ran a 10 ms timer while the load ran (a long synchronous task shows here). */
  loopDelayP99Ms: number
  loopDelayMaxMs: number
}

const mb = (bytes: number) => Math.round(bytes / 1e5) / 10

/** RSS of a process once a second: one number per second, so 10 minutes is 600 numbers. */
export class RssSeries {
  readonly pid: number
  private readonly t0: number
  private readonly times: number[] = []
  private readonly rss: number[] = []
  private peak = 0
  private cpu: number[] = []
  private readonly heap: { atSec: number; heapMB: number }[] = []
  private loop = { p99: NaN, max: NaN }

  constructor(pid: number, t0: number) {
    this.pid = pid
    this.t0 = t0
  }

  sample(now: number, value?: { rss: number; peak: number } | null): void {
    const v = value === undefined ? procRss(this.pid) : value
    if (!v || !Number.isFinite(v.rss)) return
    const cpu = procCpuSec(this.pid)
    if (Number.isFinite(cpu)) this.cpu[this.cpu.length ? 1 : 0] = cpu
    this.times.push((now - this.t0) / 1000)
    this.rss.push(v.rss)
    if (v.peak > this.peak) this.peak = v.peak
    if (v.rss > this.peak) this.peak = v.rss
  }

  /** The process's own heap figure, once a minute is kept (the last one replaced until the minute turns). */
  sampleHeap(now: number, heapMB: number): void {
    const atSec = Math.round((now - this.t0) / 1000)
    const last = this.heap.at(-1)
    if (last && Math.floor(last.atSec / 60) === Math.floor(atSec / 60) && this.heap.length > 1) this.heap[this.heap.length - 1] = { atSec, heapMB }
    else this.heap.push({ atSec, heapMB })
  }

  loopDelay(p99: number, max: number): void {
    this.loop = { p99, max }
  }

  report(): MemoryReport {
    const n = this.rss.length
    const mean = (a: number[]) => (a.length ? a.reduce((s, x) => s + x, 0) / a.length : NaN)
    const middle = this.rss.slice(Math.floor(n / 3), Math.floor((2 * n) / 3))
    const last = this.rss.slice(Math.floor((2 * n) / 3))
    // Least squares over the last two thirds (the first third is start-up and warm-up).
    const from = Math.floor(n / 3)
    const xs = this.times.slice(from)
    const ys = this.rss.slice(from)
    const mx = mean(xs)
    const my = mean(ys)
    let sxy = 0
    let sxx = 0
    for (let i = 0; i < xs.length; i++) {
      sxy += (xs[i]! - mx) * (ys[i]! - my)
      sxx += (xs[i]! - mx) ** 2
    }
    const slope = sxx > 0 ? (sxy / sxx) * 60 : NaN
    const perMinute: { atSec: number; rssMB: number }[] = []
    for (let i = 0; i < n; i++) {
      const minute = Math.floor(this.times[i]! / 60)
      if (i === n - 1 || Math.floor(this.times[i + 1]! / 60) > minute) perMinute.push({ atSec: Math.round(this.times[i]!), rssMB: mb(this.rss[i]!) })
    }
    const cpuSec = this.cpu.length === 2 ? this.cpu[1]! - this.cpu[0]! : NaN
    const span = n > 1 ? this.times[n - 1]! - this.times[0]! : NaN
    const midMean = mean(middle)
    const lastMean = mean(last)
    return {
      pid: this.pid,
      peakMB: mb(this.peak),
      startMB: mb(this.rss[0] ?? NaN),
      endMB: mb(this.rss[n - 1] ?? NaN),
      perMinuteMB: perMinute,
      middleThirdMB: mb(midMean),
      lastThirdMB: mb(lastMean),
      slopeMBPerMin: Math.round((slope / 1e6) * 100) / 100,
      verdict: lastMean > midMean * 1.1 + 16e6 ? 'growing' : 'bounded',
      cpuSec: Math.round(cpuSec * 10) / 10,
      cpuPercent: Math.round((100 * cpuSec) / span),
      heapPerMinuteMB: this.heap,
      loopDelayP99Ms: this.loop.p99,
      loopDelayMaxMs: this.loop.max,
    }
  }
}
