/**
 * Stream resume v1, the exchange's half (the network's protocol, for
 * providers that announce `stream_resume_version: 1`): a job outlives a
 * dropped provider connection for a grace period, and its chunks reach the
 * requester exactly once and in order whatever the transport did.
 *
 * `nextSeq` is always the first chunk sequence not yet relayed. A chunk is
 * relayed only when it is the next one; a replayed duplicate is acknowledged,
 * not relayed again (one with other contents ends the job); one past a gap is
 * only acknowledged, which asks the provider for the missing one. A provider
 * reconnecting with fewer chunks than were relayed has lost the job. The
 * completion counts only once every chunk it counts was relayed.
 */
import { createHash } from 'node:crypto'

/** Duplicates are checked against this many of the latest chunks relayed. */
const FINGERPRINTS_MAX = 512

/** `relay`: pass it on; `ack`: acknowledge the high-water only; `conflict`: a chunk already relayed came back different. */
export type ChunkVerdict = 'relay' | 'ack' | 'conflict'

export type ResumeVerdict = { status: 'resume'; nextSeq: number } | { status: 'rejected'; nextSeq: number; reason: string }

export class ResumableStream {
  /** Fences this job's resume and ack frames (the dispatch's `resume_token`). */
  readonly token: string
  nextSeq = 0
  /** From a lost connection until the provider resumes. */
  detached = false
  private readonly fingerprints = new Map<number, string>()

  constructor(token: string) {
    this.token = token
  }

  chunk(seq: number, channel: string, ciphertext: string): ChunkVerdict {
    const fingerprint = createHash('sha256').update(channel).update('\0').update(ciphertext).digest('hex')
    if (seq < this.nextSeq) {
      const relayed = this.fingerprints.get(seq)
      return relayed !== undefined && relayed !== fingerprint ? 'conflict' : 'ack'
    }
    if (this.detached || seq > this.nextSeq) return 'ack'
    if (this.fingerprints.size >= FINGERPRINTS_MAX) this.fingerprints.delete(this.fingerprints.keys().next().value!)
    this.fingerprints.set(seq, fingerprint)
    this.nextSeq++
    return 'relay'
  }

  /** A completion counting `finalSeq` chunks can be accepted now. */
  completes(finalSeq: number | undefined): boolean {
    return finalSeq === this.nextSeq
  }

  /** A reconnected provider that has produced `producedSeq` chunks of this job. */
  resume(producedSeq: number): ResumeVerdict {
    if (producedSeq < this.nextSeq) return { status: 'rejected', nextSeq: this.nextSeq, reason: 'provider-state-behind' }
    this.detached = false
    return { status: 'resume', nextSeq: this.nextSeq }
  }
}
