/**
 * A short stress run (`npm run stress` with little load for a few seconds):
 * every kind of load is served, with no error for any valid request, and the
 * report carries each figure the full run prints. The full run is `npm run
 * stress` (60 s) and the soak `npm run stress -- --duration 600`.
 */
import { existsSync, mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { framesPath } from '../bench/record-firehose.ts'
import { DEFAULT_DIR } from '../bench/stress/roles.ts'
import { formatReport, runStress } from '../bench/stress/run.ts'

it('serves every kind of load at once with no error, and reports served, errors, latency, lag and memory', async () => {
  // The saved recording when there is one (bench:ingest and stress keep it); else a small one, recorded now.
  const saved = existsSync(framesPath(DEFAULT_DIR))
  const report = await runStress({
    durationSec: 8,
    firehoseRate: 500,
    readers: 10,
    chats: 4,
    requesters: 2,
    providers: 2,
    signInEverySec: 2,
    keyLoops: 1,
    recordingDir: saved ? DEFAULT_DIR : mkdtempSync(join(tmpdir(), 'cocore-stress-recording-')),
    recordEvents: 600,
    log: () => undefined,
  })
  expect(report.errorSamples).toEqual([])
  expect(report.errorCount).toBe(0)
  expect(report.ok).toBe(true)
  for (const kind of ['xrpc read', 'chat', 'sign-in', 'api-key']) expect(report.served[kind], kind).toBeGreaterThan(0)
  // Each read method of both AppViews, each API-key call, and the chats were timed.
  for (const endpoint of ['exchange: compute.listJobs', 'exchange: compute.listReceipts', 'replay: account.listFriendEdges', 'createApiKey', 'GET /v1/private/models, revoked key (401)', 'chat TTFT', 'sign-in (browser, PDS OAuth)']) {
    const row = report.latency[endpoint]
    expect(row, endpoint).toBeDefined()
    expect(row!.count).toBeGreaterThan(0)
    expect(row!.p99Ms).toBeGreaterThanOrEqual(row!.p50Ms)
  }
  expect(report.latency['chat completion (stream end)']!.count).toBe(report.served.chat)
  // The AppViews' own time for each read (their Server-Timing header), beside the readers' time.
  for (const endpoint of ['exchange: compute.listJobs', 'replay: account.listFriendEdges']) expect(report.latency[`${endpoint} (in server)`]?.count, endpoint).toBe(report.latency[endpoint]!.count)
  // The replay reached the second indexer, which indexed the dev.cocore records in it.
  expect(report.firehose.sent).toBeGreaterThan(0)
  expect(report.firehose.indexedSeq).toBeGreaterThan(0)
  expect(report.firehose.indexer.recordsWritten).toBeGreaterThan(0)
  expect(report.firehose.drainedAfterSec).not.toBeNull()
  // The chats' job records and receipts reached the exchange's AppView through the PDS.
  expect(report.exchangeIndexer.stats.recordsWritten).toBeGreaterThan(report.served.chat!)
  for (const name of ['driver', 'network', 'exchange', 'provider', 'relay', 'indexer']) {
    const m = report.memory[name]
    expect(m, name).toBeDefined()
    expect(m!.peakMB).toBeGreaterThan(0)
    expect(m!.peakMB).toBeGreaterThanOrEqual(m!.endMB)
    // Each process answered for its own heap and event loop.
    expect(m!.heapPerMinuteMB.length).toBeGreaterThan(0)
    expect(m!.loopDelayMaxMs).toBeGreaterThan(0)
  }
  const printed = formatReport(report)
  for (const heading of ['requests served', 'errors: 0', 'latency per endpoint', 'indexer lag at the end', 'memory (RSS, MB)']) expect(printed).toContain(heading)
})
