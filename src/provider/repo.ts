/**
 * The provider's writes to its own repo. Every record is validated against
 * our lexicons before it leaves (the PDS does not know them, so its own
 * validation is off), and transient failures are retried a few times.
 */
import type { AtpAgent } from '@atproto/api'
import { setTimeout as sleep } from 'node:timers/promises'
import { validateRecord } from '../lexicon/validate.ts'

export interface StrongRef {
  uri: string
  cid: string
}

export class InvalidRecordError extends Error {
  override name = 'InvalidRecordError'
}

const xrpcError = (err: unknown): string | undefined => (err as { error?: string } | null)?.error

export class RepoWriter {
  readonly agent: AtpAgent
  readonly did: string

  constructor(agent: AtpAgent, did: string) {
    this.agent = agent
    this.did = did
  }

  /** The record at `collection/rkey`, or null when there is none. */
  async get<T = Record<string, unknown>>(collection: string, rkey: string): Promise<(StrongRef & { value: T }) | null> {
    try {
      const res = await this.agent.com.atproto.repo.getRecord({ repo: this.did, collection, rkey })
      return { uri: res.data.uri, cid: res.data.cid!, value: res.data.value as T }
    } catch (err) {
      if (xrpcError(err) === 'RecordNotFound') return null
      throw err
    }
  }

  /**
   * Writes `record` at `collection/rkey` after validating it. `swapRecord`
   * makes the write conditional: the cid it replaces, or null for "none yet".
   */
  async put(collection: string, rkey: string, record: object, swapRecord?: string | null): Promise<StrongRef> {
    const v = validateRecord(collection, record)
    if (!v.success) throw new InvalidRecordError(`${collection} record is invalid: ${v.message}`)
    const res = await this.agent.com.atproto.repo.putRecord({ repo: this.did, collection, rkey, record: { ...(record as Record<string, unknown>), $type: collection }, validate: false, swapRecord })
    return { uri: res.data.uri, cid: res.data.cid }
  }
}

export const isSwapConflict = (err: unknown): boolean => xrpcError(err) === 'InvalidSwap'

export interface RetryOpts {
  attempts: number
  firstDelayMs: number
  /** Aborting stops waiting between attempts. */
  signal?: AbortSignal
  onRetry?: (err: unknown, attempt: number) => void
  /** Errors that trying again cannot mend (besides invalid records and swap conflicts, never retried). */
  permanent?: (err: unknown) => boolean
}

/**
 * Runs `fn` until it succeeds, `attempts` times at most, doubling the pause
 * between attempts. Invalid records and swap conflicts are not retried: the
 * same write would fail the same way.
 */
export async function withRetry<T>(fn: () => Promise<T>, opts: RetryOpts): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn()
    } catch (err) {
      if (attempt >= opts.attempts || err instanceof InvalidRecordError || isSwapConflict(err) || opts.permanent?.(err) || opts.signal?.aborted) throw err
      opts.onRetry?.(err, attempt)
      await sleep(opts.firstDelayMs * 2 ** (attempt - 1), undefined, { signal: opts.signal })
    }
  }
}
