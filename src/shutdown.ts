/**
 * Ctrl-C / SIGTERM for the entry points: run the given steps once, in order
 * (services drain before what they depend on closes), then exit.
 */
import { devLogger as log } from './logger.ts'

export function shutdownOn(signals: NodeJS.Signals[], steps: (() => Promise<unknown> | unknown)[]): void {
  let stopping = false
  const run = async (signal: string) => {
    if (stopping) return
    stopping = true
    log.info('shutting down', { signal })
    for (const step of steps) {
      try {
        await step()
      } catch (err) {
        log.error('shutdown step failed', { err: err as Error })
      }
    }
    process.exit(0)
  }
  for (const s of signals) process.on(s, () => void run(s))
}
