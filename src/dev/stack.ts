/**
 * `data/dev/stack.json`: where the running dev stack is, for scripts
 * (`npm run backfill` in dev mode, benchmarks) and for people.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

export interface StackInfo {
  plcUrl: string
  pdsUrl: string
  appviewUrl: string
  consoleUrl: string
  accounts: { handle: string; did: string; password: string; role: string }[]
  startedAt: string
}

export const stackFile = (dataDir: string) => join(dataDir, 'dev', 'stack.json')

export function readStack(dataDir: string): StackInfo | null {
  try {
    return JSON.parse(readFileSync(stackFile(dataDir), 'utf8')) as StackInfo
  } catch {
    return null
  }
}
