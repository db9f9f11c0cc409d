/**
 * Runs the replay server in a worker thread, so that sending the recording
 * does not compete with the indexer for the main thread's event loop: the
 * indexer is measured on a core of its own, as it would run against a remote
 * relay.
 */
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads'
import { DEFAULT_DIR, loadRecording } from './record-firehose.ts'
import { startReplayServer } from './replay-server.ts'

interface Init {
  dir: string
  /** Serve the first n frames. */
  n: number
}

export interface ReplayHandle {
  url: string
  httpUrl: string
  close(): Promise<void>
}

/** Starts the replay server on its own thread, serving the saved recording in `dir`. */
export async function startReplayWorker(n: number, dir = DEFAULT_DIR): Promise<ReplayHandle> {
  const worker = new Worker(new URL(import.meta.url), { workerData: { dir, n } satisfies Init })
  const { url, httpUrl } = await new Promise<{ url: string; httpUrl: string }>((resolve, reject) => {
    worker.once('message', resolve)
    worker.once('error', reject)
  })
  return {
    url,
    httpUrl,
    async close() {
      worker.postMessage('close')
      await new Promise((r) => worker.once('exit', r))
    },
  }
}

if (!isMainThread && parentPort) {
  const { dir, n } = workerData as Init
  const recording = loadRecording(dir)
  if (!recording) throw new Error(`no saved recording in ${dir}`)
  const { accounts, didDocs } = recording.meta
  const server = await startReplayServer({
    frames: recording.frames.slice(0, n),
    seqs: recording.seqs.slice(0, n),
    didDocs,
    handles: Object.fromEntries(accounts.map((a) => [a.handle, a.did])),
  })
  parentPort.postMessage({ url: server.url, httpUrl: server.httpUrl })
  parentPort.once('message', () => void server.close().then(() => process.exit(0)))
}
