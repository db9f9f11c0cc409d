/**
 * The pre-filter ahead of the library's frame validation: commits that touch
 * no dev.cocore collection skip the (costly) lexicon validation and only move
 * the cursor; every other frame is validated as before. If the pinned
 * library's internals changed, the hook would silently not apply: this test
 * fails instead.
 */
import { IdResolver } from '@atproto/identity'
import { Firehose, FirehoseValidationError } from '@atproto/sync'
import { Subscription } from '@atproto/xrpc-server'
import { describe, expect, it } from 'vitest'
import { isForeignCommit, skipValidationOfForeignCommits } from '../appview/indexer/indexer.ts'
import { peekRawFrames } from '../appview/indexer/subscription.ts'

const commit = (paths: string[], extra: Record<string, unknown> = {}) => ({
  $type: 'com.atproto.sync.subscribeRepos#commit',
  seq: 7,
  repo: 'did:plc:abc',
  ops: paths.map((path) => ({ action: 'create', path, cid: null })),
  ...extra,
})

describe('foreign-commit pre-filter', () => {
  it('tells foreign commits from ours on the raw frame', () => {
    expect(isForeignCommit(commit(['app.bsky.feed.post/1', 'app.bsky.feed.like/2']))).toBe(true)
    expect(isForeignCommit(commit(['app.bsky.feed.post/1', 'dev.cocore.compute.receipt/2']))).toBe(false)
    expect(isForeignCommit(commit([]))).toBe(true)
    // Anything odd goes to full validation.
    expect(isForeignCommit(commit(['x/1'], { seq: 'seven' }))).toBe(false)
    expect(isForeignCommit({ ...commit(['x/1']), ops: [{ path: 5 }] })).toBe(false)
    expect(isForeignCommit({ $type: 'com.atproto.sync.subscribeRepos#account', seq: 1, did: 'did:plc:a', active: true })).toBe(false)
  })

  it("hooks the pinned library's frame validation: foreign commits pass as they are, ours are still validated", () => {
    const errors: Error[] = []
    const firehose = new Firehose({ service: 'ws://127.0.0.1:1', idResolver: new IdResolver(), handleEvent: async () => {}, onError: (e) => errors.push(e) })
    skipValidationOfForeignCommits(firehose)
    const validate = (firehose as unknown as { sub: { opts: { validate: (v: unknown) => unknown } } }).sub.opts.validate
    // Not a valid commit frame (no blocks, commit, rev...), but foreign: passed on for the cursor, unvalidated.
    const foreign = commit(['app.bsky.feed.post/1'])
    expect(validate(foreign)).toBe(foreign)
    expect(errors).toEqual([])
    // The same malformed frame touching dev.cocore: validated, refused, reported.
    expect(validate(commit(['dev.cocore.compute.receipt/1']))).toBeUndefined()
    expect(errors).toHaveLength(1)
    expect(errors[0]).toBeInstanceOf(FirehoseValidationError)
  })

  it("replaces the pinned library's subscription with one that shows raw frames first, keeping its options (and so its frame check)", () => {
    const firehose = new Firehose({ service: 'ws://127.0.0.1:1', idResolver: new IdResolver(), handleEvent: async () => {}, onError: () => {} })
    const holder = firehose as unknown as { sub: Subscription }
    const before = holder.sub
    expect(before).toBeInstanceOf(Subscription)
    expect(peekRawFrames(firehose, () => false)).toBe(true)
    expect(holder.sub).not.toBe(before)
    expect(holder.sub).toBeInstanceOf(Subscription)
    expect(holder.sub.opts).toBe(before.opts)
  })
})
