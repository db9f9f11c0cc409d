/** The ordered runner's exactly-once contract, without a network. */
import { describe, expect, it } from 'vitest'
import { OrderedRunner } from '../appview/indexer/runner.ts'

describe('OrderedRunner', () => {
  it('runs one repo in order, repos concurrently, and commits each event with the consecutive cursor', async () => {
    const committed: [number, number | undefined][] = []
    const runner = new OrderedRunner({ startCursor: undefined, commit: (seq, c) => committed.push([seq, c]), discard: () => {}, onFatal: () => {} })
    const order: number[] = []
    const slow = (seq: number, ms: number) => async () => {
      await new Promise((r) => setTimeout(r, ms))
      order.push(seq)
    }
    void runner.trackEvent('did:a', 1, slow(1, 30))
    void runner.trackEvent('did:b', 2, slow(2, 0))
    void runner.trackEvent('did:a', 3, slow(3, 0))
    await runner.idle()
    expect(order).toEqual([2, 1, 3]) // b did not wait for a; a's events stayed in order
    // seq 2 finished first, but the cursor could not pass seq 1 until it was committed.
    expect(committed).toEqual([[2, undefined], [1, 2], [3, 3]])
    expect(runner.getCursor()).toBe(3)
  })

  it('never lets the cursor pass an event whose commit failed', async () => {
    const committed: [number, number | undefined][] = []
    const fatal: unknown[] = []
    const discarded: number[] = []
    const runner = new OrderedRunner({
      startCursor: 10,
      commit: (seq, c) => {
        if (seq === 12) throw new Error('disk full')
        committed.push([seq, c])
      },
      discard: (seq) => discarded.push(seq),
      onFatal: (err) => fatal.push(err),
    })
    for (const seq of [11, 12, 13, 14]) void runner.trackEvent(`did:${seq}`, seq, async () => undefined)
    await runner.idle()
    expect(fatal).toHaveLength(1)
    expect(committed).toEqual([[11, 11]])
    expect(runner.getCursor()).toBe(11)
    expect(discarded.sort()).toEqual([12, 13, 14])
  })

  it('commits an event with nothing to await at once, or behind its repo\'s events in flight, in order', async () => {
    const committed: [number, number | undefined][] = []
    const runner = new OrderedRunner({ startCursor: undefined, commit: (seq, c) => committed.push([seq, c]), discard: () => {}, onFatal: () => {} })
    runner.trackDone('did:a', 1)
    expect(committed).toEqual([[1, 1]]) // no task, no tick: committed before trackDone returns
    let release!: () => void
    void runner.trackEvent('did:b', 2, () => new Promise<void>((r) => (release = r)))
    runner.trackDone('did:c', 3) // another repo: at once, though the cursor must wait for seq 2
    runner.trackDone('did:b', 4) // b has an event in flight: queued behind it
    expect(committed).toEqual([[1, 1], [3, undefined]])
    release()
    await runner.idle()
    expect(committed).toEqual([[1, 1], [3, undefined], [2, 3], [4, 4]])
    expect(runner.getCursor()).toBe(4)
  })
})
