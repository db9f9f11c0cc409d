/**
 * npm run backfill: fetch every repo with dev.cocore records from the
 * configured sources (COCORE_RELAY_URL / COCORE_PDS_URLS, or the running dev
 * stack), verify it, and index it. Safe to run any number of times, also
 * while the AppView runs.
 */
import { AppView } from '../appview/index.ts'
import { backfill } from '../appview/indexer/backfill.ts'
import { loadConfig, toWs } from '../src/config.ts'
import { readStack } from '../src/dev/stack.ts'

const config = loadConfig()
let sources = config.firehoseSources
let plcUrl = config.plcUrl
let dev = false
if (sources.length === 0 && config.mode === 'dev') {
  const stack = readStack(config.dataDir)
  if (!stack) {
    console.error('no sources configured (COCORE_RELAY_URL / COCORE_PDS_URLS) and no running dev stack (npm start)')
    process.exit(2)
  }
  sources = [toWs(stack.pdsUrl)]
  plcUrl = stack.plcUrl
  dev = true
}

const av = new AppView({ dbPath: config.appviewDbPath, sources, plcUrl, allowHttp: dev, handlesViaPds: dev ? sources[0]!.replace(/^ws/, 'http') : undefined, index: false })
const tty = process.stderr.isTTY
let lastShown = -1
const started = Date.now()
const result = await backfill({
  store: av.store,
  indexer: av.indexer,
  idResolver: av.idResolver,
  sources,
  onProgress: (p) => {
    const pct = p.total ? Math.floor((p.done / p.total) * 100) : 100
    const width = 30
    const bar = '#'.repeat(Math.round((pct / 100) * width)).padEnd(width, '.')
    const line = `[${bar}] ${pct}% ${p.done}/${p.total} repos, ${p.records} records, ${p.failed} failed`
    if (tty) process.stderr.write(`\r${line}`)
    else if (pct >= lastShown + 10 || p.done === p.total) {
      process.stderr.write(line + '\n')
      lastShown = pct
    }
  },
})
if (tty) process.stderr.write('\n')
console.log(`backfilled ${result.done - result.failed}/${result.total} repos, ${result.records} records in ${((Date.now() - started) / 1000).toFixed(1)} s into ${config.appviewDbPath}`)
await av.stop()
process.exitCode = result.failed > 0 ? 1 : 0
