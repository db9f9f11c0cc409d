/**
 * The firehose subscription with a look at each frame's raw bytes before the
 * library decodes it (see raw-commit.ts). The pinned @atproto/sync reads its
 * stream through `@atproto/xrpc-server`'s Subscription, which decodes every
 * frame whole before anything else can see it; this one does what that
 * iterator does (same connection, reconnects, heartbeat, decoding and frame
 * check, with the same options), except that a frame the hook takes is not
 * decoded at all.
 */
import { isPlainObject } from '@atproto/lex-data'
import type { Firehose } from '@atproto/sync'
import { websocket } from '@atproto/ws-client'
import { ensureChunkIsMessage, Subscription } from '@atproto/xrpc-server'
import { indexerLogger as log } from '../../src/logger.ts'

/** Takes a frame's bytes: true when it dealt with the frame, false to let the library decode and check it. */
export type RawFrameHook = (frame: Uint8Array) => boolean

type SubscriptionOpts = Subscription['opts']

class PeekingSubscription<T> extends Subscription<T> {
  private readonly hook: RawFrameHook

  constructor(opts: SubscriptionOpts, hook: RawFrameHook) {
    super(opts as Subscription<T>['opts'])
    this.hook = hook
  }

  override async *[Symbol.asyncIterator](): AsyncGenerator<T, void, undefined> {
    const { opts } = this
    const ws = websocket(
      async () => {
        const params = (await opts.getParams?.()) ?? {}
        return `${opts.service}/xrpc/${opts.method}?${queryString(params)}`
      },
      {
        dataMode: 'binary',
        headers: opts.headers,
        maxReconnectSeconds: opts.maxReconnectSeconds,
        heartbeat: opts.heartbeatIntervalMs ? { intervalMs: opts.heartbeatIntervalMs } : {},
        signal: opts.signal,
        onReconnect: (error, { attempt }) => opts.onReconnectError?.(error, attempt, attempt === 0),
      },
    )
    for await (const chunk of ws) {
      if (this.hook(chunk as Uint8Array)) continue
      const message = ensureChunkIsMessage(chunk)
      const t = message.header.t
      const typedBody = isPlainObject(message.body) ? (t !== undefined ? { ...message.body, $type: t.startsWith('#') ? opts.method + t : t } : message.body) : undefined
      const result = opts.validate(typedBody)
      if (result !== undefined) yield result as T
    }
  }
}

/** The subscription's query (the Firehose asks only for its cursor). */
function queryString(params: Record<string, unknown>): string {
  const q = new URLSearchParams()
  for (const [k, v] of Object.entries(params)) {
    if (typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean') q.set(k, String(v))
    else if (v !== undefined) throw new Error(`cannot encode ${typeof v} into query params`)
  }
  return q.toString()
}

/**
 * Makes the firehose's subscription show each frame's bytes to `hook` first.
 * The new subscription keeps the old one's options object, so frame checks
 * wrapped into it (wrapFrameCheck) apply still. False, with a warning, if the
 * pinned library no longer has the shape this relies on: then every frame is
 * decoded by the library, as before.
 */
export function peekRawFrames(firehose: Firehose, hook: RawFrameHook): boolean {
  const holder = firehose as unknown as { sub?: unknown }
  const sub = holder.sub
  if (!(sub instanceof Subscription) || typeof sub.opts?.validate !== 'function') {
    log.warn('firehose internals changed: every frame is decoded by the library')
    return false
  }
  holder.sub = new PeekingSubscription(sub.opts, hook)
  return true
}
