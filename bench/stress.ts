/**
 * `npm run stress`: the whole system under every kind of load at once, on
 * loopback, bounded in time: a recorded firehose replayed at 2,000 events/s
 * into a second indexer, 200 XRPC readers paging through lists, 50 streamed
 * chat completions through the exchange to local providers, browser sign-ins
 * and API-key calls in the background. Prints requests served, errors by kind
 * (exit code 1 if any), p50/p99 latency per endpoint (for XRPC reads also the
 * AppView's own time, from its Server-Timing header: the rest is the time the
 * request waited to be read), the indexer's lag at the
 * end and the RSS of each process; `--duration 600` is the memory soak
 * (fails if a process's RSS is still growing in the last third).
 *
 * Options: --duration S (60), --firehose-rate N (2000), --readers N (200),
 * --chats N (50), --requesters N (4), --providers N (4), --token-delay-ms D (10), --max-tokens M
 * (64), --signin-every S (5), --key-loops N (2), --json FILE (the report),
 * --cpu-prof exchange,network,... (those processes run under V8's CPU
 * profiler; profiles in data/stress-profiles/).
 * The processes and the load are in bench/stress/.
 */
import { writeFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { DEFAULTS, formatReport, runStress } from './stress/run.ts'

const { values: args } = parseArgs({
  options: {
    duration: { type: 'string', default: String(DEFAULTS.durationSec) },
    'firehose-rate': { type: 'string', default: String(DEFAULTS.firehoseRate) },
    readers: { type: 'string', default: String(DEFAULTS.readers) },
    chats: { type: 'string', default: String(DEFAULTS.chats) },
    requesters: { type: 'string', default: String(DEFAULTS.requesters) },
    providers: { type: 'string', default: String(DEFAULTS.providers) },
    'token-delay-ms': { type: 'string', default: String(DEFAULTS.tokenDelayMs) },
    'max-tokens': { type: 'string', default: String(DEFAULTS.maxTokens) },
    'signin-every': { type: 'string', default: String(DEFAULTS.signInEverySec) },
    'key-loops': { type: 'string', default: String(DEFAULTS.keyLoops) },
    json: { type: 'string' },
    'cpu-prof': { type: 'string' },
    help: { type: 'boolean', short: 'h', default: false },
  },
})
if (args.help) {
  process.stdout.write('usage: npm run stress -- [--duration S] [--firehose-rate N] [--readers N] [--chats N] [--requesters N] [--providers N] [--token-delay-ms D] [--max-tokens M] [--signin-every S] [--key-loops N] [--json FILE] [--cpu-prof ROLE,...]\n')
  process.exit(0)
}
const num = (name: keyof typeof args, min: number): number => {
  const v = Number(args[name])
  if (!(Number.isFinite(v) && v >= min)) throw new Error(`--${name}: expected a number >= ${min}, got ${String(args[name])}`)
  return v
}

const controller = new AbortController()
// First Ctrl-C: end the load now and shut everything down cleanly; a second one: leave at once.
process.once('SIGINT', () => {
  process.stderr.write('[stress] interrupted: ending the load, shutting down\n')
  controller.abort()
  process.once('SIGINT', () => process.exit(130))
})

const report = await runStress({
  durationSec: num('duration', 1),
  firehoseRate: num('firehose-rate', 1),
  readers: num('readers', 0),
  chats: num('chats', 0),
  requesters: num('requesters', 1),
  providers: num('providers', 1),
  tokenDelayMs: num('token-delay-ms', 0),
  maxTokens: num('max-tokens', 1),
  signInEverySec: num('signin-every', 0),
  keyLoops: num('key-loops', 0),
  cpuProfile: args['cpu-prof'] ? (args['cpu-prof'].split(',') as never) : undefined,
  signal: controller.signal,
})
const argv = process.argv.slice(2)
process.stdout.write(`command: npm run stress${argv.length ? ` -- ${argv.join(' ')}` : ''}\n${formatReport(report)}\n`)
if (args.json) writeFileSync(args.json, JSON.stringify(report, null, 2) + '\n')
if (!report.ok) process.exitCode = 1
