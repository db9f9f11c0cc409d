/**
 * Stream resume v1, the provider's half (the network's protocol): the frames
 * of a job the exchange sent with a `resume_token` are kept until it
 * acknowledges them, so the job outlives a lost connection. Reconnected, the
 * agent asks for the job back (`inference_resume` with the chunks it has
 * produced) and sends again from the exchange's high-water mark; a
 * rejection, or an exchange claiming more chunks than were produced, ends it.
 *
 * `seq` starts at 0, `producedSeq` is the next one; the completion carries
 * `final_seq = producedSeq` and goes out once every chunk before it has.
 * Bounded: REPLAY_MAX_FRAMES and REPLAY_MAX_BYTES per job (past them the job
 * ends with a completion of what it has, so the requester's stream still
 * ends), and RETENTION_MS after a lost connection or an unacknowledged
 * completion (a little longer than the exchange's 30 s grace, so a late
 * reconnect hears a rejection rather than nothing).
 */
import type { InferenceChunkFrame, InferenceCompleteFrame, ResumeStatus } from '../protocol/agent.ts'

export const REPLAY_MAX_FRAMES = 512
export const REPLAY_MAX_BYTES = 8 << 20
export const RETENTION_MS = 45_000

export type JobOutput = InferenceChunkFrame | InferenceCompleteFrame

export class ReplayBuffer {
  readonly sessionId: string
  readonly token: string
  /** Chunks produced: the next seq. */
  producedSeq = 0
  /** On the current connection, resumed there or sent on it. */
  attached = true
  private ackedSeq = 0
  private sendSeq = 0
  private readonly chunks = new Map<number, InferenceChunkFrame>()
  private completion: InferenceCompleteFrame | null = null
  private completionSent = false
  private bytes = 0

  constructor(sessionId: string, token: string) {
    this.sessionId = sessionId
    this.token = token
  }

  /** Keeps a frame of the job; `overflow` when it is past the bounds (the job must end: see `truncate`). */
  push(frame: JobOutput): 'kept' | 'overflow' {
    // Nothing follows a completion (a truncated job's included).
    if (this.completion) return 'overflow'
    if (frame.type === 'inference_complete') {
      this.completion = { ...frame, final_seq: this.producedSeq }
      return 'kept'
    }
    const size = frame.ciphertext.length
    if (frame.seq !== this.producedSeq || this.chunks.size >= REPLAY_MAX_FRAMES || this.bytes + size > REPLAY_MAX_BYTES) return 'overflow'
    this.chunks.set(frame.seq, frame)
    this.bytes += size
    this.producedSeq++
    return 'kept'
  }

  /** Ends the job with what it has: a completion counting nothing, no receipt. */
  truncate(): void {
    this.completion = { type: 'inference_complete', session_id: this.sessionId, tokens_in: 0, tokens_out: 0, receipt_uri: '', final_seq: this.producedSeq }
    this.completionSent = false
  }

  get completed(): boolean {
    return this.completion !== null
  }

  /** What to send now, in order: the chunks not yet sent on this connection, then the completion. */
  drain(): JobOutput[] {
    if (!this.attached) return []
    const out: JobOutput[] = []
    for (; this.sendSeq < this.producedSeq; this.sendSeq++) {
      const chunk = this.chunks.get(this.sendSeq)
      if (chunk) out.push(chunk)
    }
    if (this.completion && !this.completionSent) {
      out.push(this.completion)
      this.completionSent = true
    }
    return out
  }

  /** The exchange's high-water mark; true when the job is over (its completion acknowledged). */
  ack(nextSeq: number, completed: boolean): boolean {
    if (nextSeq < this.ackedSeq || nextSeq > this.producedSeq) return false
    if (completed) return this.completion !== null && nextSeq === this.producedSeq
    this.forget(nextSeq)
    return false
  }

  /** The answer to a resume: `replay` from its high-water mark, or `end` the job. */
  resumed(status: ResumeStatus, nextSeq: number): 'replay' | 'end' {
    // A high-water past what was produced is a protocol violation: as good as a rejection.
    if (status !== 'resume' || nextSeq > this.producedSeq) return 'end'
    this.forget(nextSeq)
    this.sendSeq = nextSeq
    this.completionSent = false
    this.attached = true
    return 'replay'
  }

  /** The connection is gone: what was not acknowledged goes again after a resume. */
  detach(): void {
    this.attached = false
    this.sendSeq = this.ackedSeq
    this.completionSent = false
  }

  private forget(nextSeq: number): void {
    for (let seq = this.ackedSeq; seq < nextSeq; seq++) {
      const chunk = this.chunks.get(seq)
      if (chunk) this.bytes -= chunk.ciphertext.length
      this.chunks.delete(seq)
    }
    this.ackedSeq = Math.max(this.ackedSeq, nextSeq)
    this.sendSeq = Math.max(this.sendSeq, nextSeq)
  }
}
