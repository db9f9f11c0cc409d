/**
 * The provider <-> exchange protocol on `/v1/agent`: one JSON object per
 * WebSocket text message, tagged by `type`. Frames and field names are the
 * network's (its provider's protocol.rs and its exchange's protocol.ts), so a
 * reference provider or exchange speaks it unchanged: register, heartbeat,
 * ping/pong (by `nonce`), attestation_challenge/response, inference_request/
 * chunk (with its `channel`)/keepalive/complete, and stream resume v1
 * (inference_resume, inference_resume_result, inference_ack).
 *
 * Byte fields (`ciphertext`, `signature`) are JSON arrays of byte values on
 * the network (serde's `Vec<u8>`, the only form a reference provider parses);
 * a reference exchange also takes base64. The types here hold them as base64
 * strings, converted at the wire (`toWire` out, `base64Of` in).
 *
 * Our extensions are negotiated: a provider that puts `v: PROTOCOL_VERSION` on
 * its register, and an exchange that answers with `registered` and `v` on its
 * frames, speak them to each other: base64 byte fields, `registered`, an
 * `error` frame before a refusal, provider pings, `inference_cancel` (the
 * requester went away), `inference_error` (the provider could not run the
 * job), and the request's `input_commitment`, `params` and `pro_bono` and the
 * completion's `finish_reason`. A peer that announces nothing gets only the
 * network's frames and fields.
 *
 * Content never travels in clear: `ciphertext` is always sealed (`nonce ||
 * box`, see src/crypto/seal.ts), the prompt by the requester to the provider's
 * published key, each reply chunk by the provider back to the requester's
 * ephemeral key.
 */
import type { BrokerageCountersignatureWire } from '../crypto/brokerage.ts'
import { fromB64, toB64 } from '../crypto/seal.ts'
import type { JobConstraints } from './job-constraints.ts'

export const AGENT_PATH = '/v1/agent'
/** Our extensions' version; 1 was our own register and final_seq, before the network's frames. */
export const PROTOCOL_VERSION = 2
/** The `lxm` of the register frame's service-auth token, as on the network (a method with no lexicon of its own). */
export const REGISTER_LXM = 'dev.cocore.compute.register'
/** The stream-resume protocol version both ends here implement (the network's v1). */
export const STREAM_RESUME_VERSION = 1
/**
 * The first provider version that reads `messages-v1` input: the network's
 * exchange routes such jobs only at or above it (its COCORE_MIN_VERSION_MESSAGES_V1
 * default), and sends text input without `input_format`.
 */
export const MESSAGES_V1_MIN_VERSION = '0.9.32'

/** The channel of a reply chunk's plaintext; absent means `content`. */
export const CHUNK_CHANNELS = ['content', 'reasoning', 'tool_call'] as const
export type ChunkChannel = (typeof CHUNK_CHANNELS)[number]
export const isChunkChannel = (v: unknown): v is ChunkChannel => (CHUNK_CHANNELS as readonly unknown[]).includes(v)

/** Sampling parameters passed through to the provider's engine (in clear: they carry no content). */
export interface GenerationParams {
  temperature?: number
  top_p?: number
  stop?: string[]
  seed?: number
}

/** Present (PROTOCOL_VERSION) on every frame of a peer that speaks our extensions. */
interface Framed {
  v?: number
}

// ---- provider -> exchange -------------------------------------------------

export interface RegisterFrame extends Framed {
  type: 'register'
  provider_did: string
  /** A service-auth JWT from the provider's PDS, audience = the exchange's DID, lxm = REGISTER_LXM. */
  auth_jwt: string
  /** The provider record's rkey. */
  machine_id?: string
  machine_label: string
  chip: string
  ram_gb: number
  supported_models: string[]
  /** base64 encryption key; must be the `encryptionPubKey` of one of its indexed provider records. */
  encryption_pub_key: string
  /** base64 raw P-256 key that answers attestation challenges. */
  attestation_pub_key: string
  /** The at:// URI of its attestation record. */
  attestation_uri: string
  /** The agent's version, for `min_provider_version` routing and the input formats it reads. */
  binary_version?: string
  enc_scheme?: string
  tier?: string
  region?: string
  /** Highest stream-resume version it implements; absent: a dropped connection ends its jobs. */
  stream_resume_version?: number
}

export interface HeartbeatFrame extends Framed {
  type: 'heartbeat'
  load: number
  queue_depth: number
  /** RFC 3339. */
  at: string
  active?: boolean
}

export interface PongFrame extends Framed {
  type: 'pong'
  /** The ping's nonce (the network's liveness probe). */
  nonce?: string
  /** Ours: the `t` of a provider's own ping. */
  t?: number
}

/** Ours: a provider's own ping, answered by a pong with its `t`. */
export interface PingFromProviderFrame extends Framed {
  type: 'ping'
  t?: number
}

/** Signed with the attestation key (DER P-256) over `attestationChallengePayload`. */
export interface AttestationResponseFrame extends Framed {
  type: 'attestation_response'
  nonce: string
  timestamp: string
  sip_enabled: boolean
  /** Absent: the provider makes no claim either way. */
  hypervisor_present?: boolean
  signature: string
}

export interface InferenceChunkFrame extends Framed {
  type: 'inference_chunk'
  session_id: string
  /** From 0, one per chunk. */
  seq: number
  channel?: ChunkChannel
  ciphertext: string
}

/** "Still generating": no chunk for a while, the job is alive. */
export interface InferenceKeepaliveFrame extends Framed {
  type: 'inference_keepalive'
  session_id: string
}

export type FinishReason = 'stop' | 'length'

export interface InferenceCompleteFrame extends Framed {
  type: 'inference_complete'
  session_id: string
  tokens_in: number
  tokens_out: number
  /** The receipt's AT URI; empty when no receipt is written. */
  receipt_uri: string
  /** The number of chunks sent (the next seq), as on the network: completion is accepted only once all of them were. */
  final_seq?: number
  /** Ours. */
  finish_reason?: FinishReason
}

/** After a reconnect: reattach a job still running. */
export interface InferenceResumeFrame extends Framed {
  type: 'inference_resume'
  session_id: string
  resume_token: string
  /** Chunks produced so far (the next seq). */
  produced_seq: number
}

export type InferenceErrorCode = 'decrypt_failed' | 'bad_input' | 'model_unavailable' | 'engine_error' | 'busy'

/** Ours. */
export interface InferenceErrorFrame extends Framed {
  type: 'inference_error'
  session_id: string
  code: InferenceErrorCode
  message: string
}

export type ProviderFrame =
  | RegisterFrame
  | HeartbeatFrame
  | PongFrame
  | PingFromProviderFrame
  | AttestationResponseFrame
  | InferenceChunkFrame
  | InferenceKeepaliveFrame
  | InferenceCompleteFrame
  | InferenceResumeFrame
  | InferenceErrorFrame

// ---- exchange -> provider -------------------------------------------------

/** Ours: the register was accepted. */
export interface RegisteredFrame extends Framed {
  type: 'registered'
  did: string
  exchange: string
}

export interface PingFrame extends Framed {
  type: 'ping'
  nonce: string
  /** Ours. */
  t?: number
}

export interface AttestationChallengeFrame extends Framed {
  type: 'attestation_challenge'
  nonce: string
  /** RFC 3339, seconds, `Z`: echoed and signed verbatim. */
  timestamp: string
}

export interface InferenceRequestFrame extends Framed {
  type: 'inference_request'
  session_id: string
  job_uri: string
  /** Without it a provider cannot cite the job in a receipt. */
  job_cid?: string
  requester_did: string
  /** base64 ephemeral key of the requester: reply chunks are sealed to it. */
  requester_pub_key: string
  model: string
  max_tokens_out: number
  ciphertext: string
  /** Absent: the plaintext is one user message (the network's text input). */
  input_format?: string
  /** Fences resume and ack frames to this dispatch; only when both ends implement stream resume. */
  resume_token?: string
  /** Ours: sha256 hex of the sealed plaintext, as on the job record; the provider checks it. */
  input_commitment?: string
  /** Ours. */
  params?: GenerationParams
  /** Ours: the job runs under the provider's pro bono policy: the receipt carries no charge. */
  pro_bono?: boolean
  /** The job record's public constraints, under the network's frame names (job-constraints.ts). */
  output_schema?: JobConstraints['outputSchema']
  tools?: JobConstraints['tools']
  tool_choice?: string
  tool_choice_function?: string
  /** The dispatching brokerage's countersignature (the network's ADR 0004): the provider copies it onto its receipt as `brokerageCountersignature`. */
  brokerage_countersignature?: BrokerageCountersignatureWire
}

export type ResumeStatus = 'resume' | 'completed' | 'rejected'

export interface InferenceResumeResultFrame extends Framed {
  type: 'inference_resume_result'
  session_id: string
  resume_token: string
  /** `resume`: replay from next_seq; `completed`: its completion was delivered; `rejected`: the job is over. */
  status: ResumeStatus
  next_seq: number
  reason?: string
}

/** Chunks below next_seq were relayed (and may be forgotten); `completed`: so was the completion. */
export interface InferenceAckFrame extends Framed {
  type: 'inference_ack'
  session_id: string
  resume_token: string
  next_seq: number
  completed: boolean
}

/** Ours. */
export interface InferenceCancelFrame extends Framed {
  type: 'inference_cancel'
  session_id: string
  reason: string
}

/** Ours: sent before the exchange closes a connection it refuses. */
export interface ErrorFrame extends Framed {
  type: 'error'
  code: string
  message: string
}

export type ExchangeFrame =
  | RegisteredFrame
  | PingFrame
  | AttestationChallengeFrame
  | InferenceRequestFrame
  | InferenceResumeResultFrame
  | InferenceAckFrame
  | InferenceCancelFrame
  | ErrorFrame
  | PongFrame

// ---- the wire -------------------------------------------------------------

/** Fields only a peer that speaks our extensions gets. */
const EXTENSION_FIELDS = ['v', 'input_commitment', 'params', 'pro_bono', 'finish_reason'] as const
const BYTE_FIELDS = ['ciphertext', 'signature'] as const

/**
 * The text of a frame for its peer: with `v` to one that speaks our
 * extensions; to a reference peer without our fields, byte fields as arrays
 * of byte values. Frames only a peer with our extensions knows are never
 * passed here for a reference peer (the callers check).
 */
export function toWire(frame: ProviderFrame | ExchangeFrame, extended: boolean): string {
  if (extended) return JSON.stringify({ ...frame, v: PROTOCOL_VERSION })
  const out: Record<string, unknown> = { ...frame }
  for (const f of EXTENSION_FIELDS) delete out[f]
  for (const f of BYTE_FIELDS) if (typeof out[f] === 'string') out[f] = Array.from(fromB64(out[f] as string))
  return JSON.stringify(out)
}

/** Most bytes a byte field may hold (a sealed prompt is the large one). */
const MAX_FIELD_BYTES = 16 << 20

/** A byte field as base64: a string is taken as it is, an array must hold byte values; null otherwise. */
export function base64Of(v: unknown): string | null {
  if (typeof v === 'string') return v
  if (!Array.isArray(v) || v.length > MAX_FIELD_BYTES) return null
  const bytes = new Uint8Array(v.length)
  for (let i = 0; i < v.length; i++) {
    const n = v[i]
    if (!Number.isInteger(n) || n < 0 || n > 255) return null
    bytes[i] = n
  }
  return toB64(bytes)
}

/** A bounded wire counter: a safe integer in [0, 2^32). */
export const isU32 = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0 && (v as number) <= 0xffff_ffff

/**
 * The object the attestation key signs, as canonical JSON, in answer to a
 * challenge: the wire's snake_case fields in the signed records' camelCase,
 * `hypervisorPresent` only when the provider claims it either way.
 */
export const attestationChallengePayload = (f: { nonce: string; timestamp: string; sip_enabled: boolean; hypervisor_present?: boolean }) => ({
  nonce: f.nonce,
  sipEnabled: f.sip_enabled,
  timestamp: f.timestamp,
  ...(typeof f.hypervisor_present === 'boolean' ? { hypervisorPresent: f.hypervisor_present } : {}),
})

/**
 * Compares dotted numeric versions ("0.9.12" < "0.10.0") as the network's
 * exchange does: a leading `v` and any pre-release or build suffix (`-rc.1`,
 * `+sha`) ignored, missing or non-numeric parts 0.
 */
export function compareVersions(a: string, b: string): number {
  const parts = (s: string) => s.trim().replace(/^v/i, '').split(/[-+]/, 1)[0]!.split('.').map((x) => Number.parseInt(x, 10) || 0)
  const pa = parts(a)
  const pb = parts(b)
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0)
    if (d !== 0) return Math.sign(d)
  }
  return 0
}

/** The input formats a provider reads: ours all; a reference provider text, and messages-v1 from MESSAGES_V1_MIN_VERSION. */
export function inputFormatsOf(p: { extended: boolean; version?: string }): ('messages-v1' | 'text')[] {
  if (p.extended || (p.version !== undefined && compareVersions(p.version, MESSAGES_V1_MIN_VERSION) >= 0)) return ['messages-v1', 'text']
  return ['text']
}
