/**
 * Both halves of stream resume v1 on their own, against the network's shared
 * vectors (the exchange's in console/exchange/stream-resume.ts, the
 * provider's in src/provider/replay.ts), with the bounds the vectors do not
 * cover. The same vectors run end to end in reference-provider.test.ts (our
 * gateway) and reference-exchange.test.ts (our agent).
 */
import { describe, expect, it } from 'vitest'
import { ResumableStream } from '../console/exchange/stream-resume.ts'
import { REPLAY_MAX_FRAMES, ReplayBuffer } from '../src/provider/replay.ts'
import { providerSide, resumeVectors } from './fixture/resume-vectors.ts'

const streamAt = (n: number) => {
  const s = new ResumableStream('tok')
  for (let seq = 0; seq < n; seq++) s.chunk(seq, 'content', `c${seq}`)
  return s
}

const chunk = (seq: number) => ({ type: 'inference_chunk' as const, session_id: 's', seq, ciphertext: `c${seq}` })
const bufferAt = (produced: number) => {
  const b = new ReplayBuffer('s', 'tok')
  for (let seq = 0; seq < produced; seq++) b.push(chunk(seq))
  return b
}

describe.skipIf(!resumeVectors)('the shared stream-resume vectors', () => {
  for (const v of resumeVectors?.chunk ?? []) {
    it(`exchange, chunk: ${v.name}`, () => {
      const s = streamAt(v.preAccept ? v.preAccept.length : (v.nextSeq ?? 0))
      expect(s.chunk(v.seq, 'content', `c${v.seq}`)).toBe(v.accept ? 'relay' : 'ack')
      expect(s.nextSeq).toBe(v.nextSeqAfter)
    })
  }
  for (const v of resumeVectors?.resume.filter((r) => r.status !== undefined) ?? []) {
    it(`exchange, resume: ${v.name}`, () => {
      const s = streamAt(v.advisorNextSeq ?? 0)
      s.detached = true
      expect(s.resume(v.producedSeq!)).toMatchObject({ status: v.status, nextSeq: v.nextSeq })
    })
  }
  for (const v of resumeVectors?.completion ?? []) {
    it(`exchange, completion: ${v.name}`, () => {
      expect(streamAt(v.nextSeq).completes(v.finalSeq)).toBe(v.accepted)
    })
  }
  for (const v of resumeVectors?.resume ?? []) {
    it(`provider, resume: ${v.name}`, () => {
      const { produced, status, nextSeq, keeps } = providerSide(v)
      const b = bufferAt(produced)
      b.detach()
      expect(b.resumed(status, nextSeq)).toBe(keeps ? 'replay' : 'end')
      if (v.providerReplaysSeqs) expect(b.drain().map((f) => (f.type === 'inference_chunk' ? f.seq : -1))).toEqual(v.providerReplaysSeqs)
    })
  }
})

describe('stream resume beyond the vectors', () => {
  it('the exchange ends a job whose replayed chunk differs from the one relayed, and relays nothing while detached', () => {
    const s = streamAt(2)
    expect(s.chunk(1, 'content', 'c1')).toBe('ack')
    expect(s.chunk(1, 'reasoning', 'c1')).toBe('conflict')
    s.detached = true
    expect(s.chunk(2, 'content', 'c2')).toBe('ack')
    expect(s.completes(undefined)).toBe(false)
  })

  it('the provider sends its completion after every chunk, forgets what was acknowledged, and replays the rest', () => {
    const b = bufferAt(3)
    b.push({ type: 'inference_complete', session_id: 's', tokens_in: 1, tokens_out: 3, receipt_uri: '' })
    expect(b.drain().map((f) => f.type)).toEqual(['inference_chunk', 'inference_chunk', 'inference_chunk', 'inference_complete'])
    expect(b.drain()).toEqual([])
    expect(b.ack(2, false)).toBe(false)
    b.detach()
    expect(b.resumed('resume', 2)).toBe('replay')
    expect(b.drain()).toMatchObject([{ seq: 2 }, { type: 'inference_complete', final_seq: 3 }])
    // A high-water below what was acknowledged, or a completed ack before the last chunk, changes nothing.
    expect(b.ack(1, true)).toBe(false)
    expect(b.ack(3, true)).toBe(true)
  })

  it('the provider ends a job whose unacknowledged output outgrows its buffer with a completion of what it has', () => {
    const b = bufferAt(REPLAY_MAX_FRAMES)
    expect(b.push(chunk(REPLAY_MAX_FRAMES))).toBe('overflow')
    b.truncate()
    expect(b.push(chunk(REPLAY_MAX_FRAMES))).toBe('overflow')
    expect(b.drain().at(-1)).toMatchObject({ type: 'inference_complete', tokens_in: 0, tokens_out: 0, receipt_uri: '', final_seq: REPLAY_MAX_FRAMES })
  })
})
