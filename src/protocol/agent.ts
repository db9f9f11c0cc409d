/**
 * The provider <-> exchange protocol on `/v1/agent`, version 1: one JSON
 * object per WebSocket text message, tagged by `type`, every frame carrying
 * `v`. The message set follows the network's (register, heartbeat,
 * ping/pong, attestation_challenge/response, inference_request/chunk/
 * complete), with snake_case fields on the inference frames as there, plus
 * `inference_cancel` (the requester went away) and `inference_error` (the
 * provider could not run the job).
 *
 * Content never travels in clear: `ciphertext` is always a sealed box
 * (base64 `nonce || box`, see src/crypto/seal.ts), the prompt sealed by the
 * requester to the provider's published key, each reply chunk sealed by the
 * provider back to the requester's ephemeral key.
 */
import type { JobConstraints } from './job-constraints.ts'

export const AGENT_PATH = '/v1/agent'
export const PROTOCOL_VERSION = 1
/** The `lxm` of the register frame's service-auth token, as on the network (a method with no lexicon of its own). */
export const REGISTER_LXM = 'dev.cocore.compute.register'

/** Sampling parameters passed through to the provider's engine (in clear: they carry no content). */
export interface GenerationParams {
  temperature?: number
  top_p?: number
  stop?: string[]
  seed?: number
}

// ---- provider -> exchange -------------------------------------------------

export interface RegisterFrame {
  type: 'register'
  v: number
  did: string
  /** A service-auth JWT from the provider's PDS, audience = the exchange's DID, lxm = REGISTER_LXM. */
  serviceAuth: string
  /** base64 X25519 key; must be the `encryptionPubKey` of one of its indexed provider records. */
  encryptionPubKey: string
  models: string[]
  /** The agent's version, for `min_provider_version` routing. */
  version?: string
}

export interface HeartbeatFrame {
  type: 'heartbeat'
  v: number
  load?: number
}

export interface PongFrame {
  type: 'pong'
  v: number
  t?: number
}

export interface PingFromProviderFrame {
  type: 'ping'
  v: number
  t?: number
}

/** Signed with the attestation key (DER P-256, base64) over canonical JSON `{nonce, sipEnabled, timestamp}`. */
export interface AttestationResponseFrame {
  type: 'attestation_response'
  v: number
  nonce: string
  timestamp: string
  sip_enabled: boolean
  signature: string
}

export interface InferenceChunkFrame {
  type: 'inference_chunk'
  v: number
  session_id: string
  seq: number
  ciphertext: string
}

export type FinishReason = 'stop' | 'length'

export interface InferenceCompleteFrame {
  type: 'inference_complete'
  v: number
  session_id: string
  tokens_in: number
  tokens_out: number
  finish_reason: FinishReason
  /** The receipt's AT URI (its rkey is chosen before it is written, so this is known at once). */
  receipt_uri?: string
  final_seq: number
}

export type InferenceErrorCode = 'decrypt_failed' | 'bad_input' | 'model_unavailable' | 'engine_error' | 'busy'

export interface InferenceErrorFrame {
  type: 'inference_error'
  v: number
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
  | InferenceCompleteFrame
  | InferenceErrorFrame

// ---- exchange -> provider -------------------------------------------------

export interface RegisteredFrame {
  type: 'registered'
  v: number
  did: string
  exchange: string
}

export interface PingFrame {
  type: 'ping'
  v: number
  t: number
}

export interface AttestationChallengeFrame {
  type: 'attestation_challenge'
  v: number
  nonce: string
  timestamp: string
}

export interface InferenceRequestFrame {
  type: 'inference_request'
  v: number
  session_id: string
  job_uri: string
  job_cid: string
  requester_did: string
  /** base64 X25519 ephemeral key of the requester: reply chunks are sealed to it. */
  requester_pub_key: string
  model: string
  max_tokens_out: number
  ciphertext: string
  input_format: string
  /** sha256 hex of the sealed plaintext, as on the job record; the provider checks it. */
  input_commitment: string
  params: GenerationParams
  /** The job runs under the provider's pro bono policy: the receipt carries no charge. */
  pro_bono?: boolean
  /** The job record's public constraints, under the network's frame names (job-constraints.ts). */
  output_schema?: JobConstraints['outputSchema']
  tools?: JobConstraints['tools']
  tool_choice?: string
  tool_choice_function?: string
}

export interface InferenceCancelFrame {
  type: 'inference_cancel'
  v: number
  session_id: string
  reason: string
}

/** Sent before the exchange closes a connection it refuses. */
export interface ErrorFrame {
  type: 'error'
  v: number
  code: string
  message: string
}

export type ExchangeFrame = RegisteredFrame | PingFrame | AttestationChallengeFrame | InferenceRequestFrame | InferenceCancelFrame | ErrorFrame | PongFrame

/** Canonical bytes the attestation key signs in answer to a challenge. */
export const attestationChallengePayload = (f: { nonce: string; timestamp: string; sip_enabled: boolean }) => ({ nonce: f.nonce, sipEnabled: f.sip_enabled, timestamp: f.timestamp })

/** Compares dotted numeric versions ("0.9.12" < "0.10.0"); non-numeric parts compare as 0. */
export function compareVersions(a: string, b: string): number {
  const pa = a.split(/[.+-]/).map((x) => Number.parseInt(x, 10) || 0)
  const pb = b.split(/[.+-]/).map((x) => Number.parseInt(x, 10) || 0)
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0)
    if (d !== 0) return Math.sign(d)
  }
  return 0
}
