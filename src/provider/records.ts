/**
 * The records a provider machine publishes: its provider record (what it
 * serves, at what price, with which keys), its signed attestation, and a
 * signed receipt per finished job, all in the reference formats.
 */
import { signAttestation, signReceipt } from '../crypto/signing.ts'
import { ids } from '../lexicon/generated/ids.ts'
import type { ComputeAttestation, ComputeDefsModelPrice, ComputeProvider, ComputeReceipt, ComputeReceiptBrokerageCountersignature, ComputeReceiptGenerationParams } from '../lexicon/generated/types.ts'
import type { GenerationParams } from '../protocol/agent.ts'
import type { ProviderKeys } from './keys.ts'
import { machineFingerprint, type MachineFacts } from './machine.ts'
import type { StrongRef } from './repo.ts'

export type ModelPrice = ComputeDefsModelPrice

/** The price of a model the options do not price: per million tokens, in the network's closed-loop currency. */
export const DEFAULT_PRICE = { inputPricePerMTok: 100, outputPricePerMTok: 200, currency: 'CC' } as const

/** How long an attestation is valid: receipts completed after it cite a stale one. */
export const ATTESTATION_TTL_MS = 24 * 3600_000

/**
 * Fields of the provider record its owner decides (in a management console)
 * rather than the agent: a re-publish keeps them as they are.
 */
const OWNER_FIELDS = ['desiredModels', 'desiredTier', 'active', 'proBono', 'shareLocation', 'toolCalls', 'toolCallsDisabled', 'acceptedExchanges'] as const

const b64 = (bytes: Uint8Array) => Buffer.from(bytes).toString('base64')

/** One price per served model: the given one, else DEFAULT_PRICE. */
export function priceList(models: string[], prices: ModelPrice[] = []): ModelPrice[] {
  return models.map((modelId) => prices.find((p) => p.modelId === modelId) ?? { modelId, ...DEFAULT_PRICE })
}

export interface ProviderRecordInput {
  keys: ProviderKeys
  facts: MachineFacts
  did: string
  models: string[]
  prices: ModelPrice[]
  label: string
  version: string
  /** The record now at the provider's rkey, if any: its createdAt and owner fields are kept. */
  existing?: Record<string, unknown>
}

export function providerRecord(p: ProviderRecordInput): ComputeProvider & { $type: string } {
  const kept: Record<string, unknown> = {}
  for (const f of OWNER_FIELDS) if (p.existing?.[f] !== undefined) kept[f] = p.existing[f]
  return {
    ...kept,
    $type: ids.ComputeProvider,
    machineLabel: p.label.slice(0, 128),
    chip: p.facts.chip,
    ramGB: p.facts.ramGB,
    cpuCores: p.facts.cpuCores,
    os: p.facts.os,
    supportedModels: p.models,
    priceList: p.prices,
    encryptionPubKey: b64(p.keys.encryption.publicKey),
    attestationPubKey: b64(p.keys.signer.rawPublicKey()),
    machineFingerprint: machineFingerprint(p.facts, p.did),
    trustLevel: 'self-attested',
    binaryVersion: p.version,
    createdAt: typeof p.existing?.createdAt === 'string' ? p.existing.createdAt : new Date().toISOString(),
  }
}

/** The attested state: everything an attestation says except when it was made and its signature. */
function attestedState(keys: ProviderKeys, facts: MachineFacts, did: string) {
  return {
    publicKey: b64(keys.signer.rawPublicKey()),
    encryptionPubKey: b64(keys.encryption.publicKey),
    sigScheme: 'p256',
    // The scheme of encryptionPubKey, which requesters seal by. A P-256 key here is a software key in the key
    // file, not a Secure Enclave one, and secureEnclaveAvailable below still says so.
    encScheme: keys.encryption.scheme,
    chipName: facts.chip,
    hardwareModel: facts.hardwareModel,
    serialNumberHash: machineFingerprint(facts, did),
    osVersion: facts.osVersion,
    binaryHash: facts.binaryHash,
    // A Linux machine offers none of the platform protections these name.
    sipEnabled: false,
    secureBootEnabled: false,
    secureEnclaveAvailable: false,
    authenticatedRootEnabled: false,
  }
}

export function attestationRecord(keys: ProviderKeys, facts: MachineFacts, did: string, at = new Date()): ComputeAttestation & { $type: string } {
  return signAttestation(
    {
      $type: ids.ComputeAttestation,
      ...attestedState(keys, facts, did),
      attestedAt: at.toISOString(),
      expiresAt: new Date(at.getTime() + ATTESTATION_TTL_MS).toISOString(),
    },
    keys.signer,
  )
}

/** Whether a published attestation states exactly what this machine would attest now. */
export function attestsSameState(published: Record<string, unknown>, keys: ProviderKeys, facts: MachineFacts, did: string): boolean {
  return Object.entries(attestedState(keys, facts, did)).every(([k, v]) => published[k] === v)
}

/** ceil(in × input price + out × output price), prices per million tokens. */
export const receiptPrice = (tokensIn: number, tokensOut: number, price: ModelPrice): number =>
  Math.ceil((tokensIn * price.inputPricePerMTok) / 1e6 + (tokensOut * price.outputPricePerMTok) / 1e6)

/** Sampling values as a receipt commits to them: integers only, fractions in thousandths. */
export function receiptParams(maxTokens: number, p: GenerationParams): ComputeReceiptGenerationParams {
  return {
    maxTokens,
    ...(p.seed !== undefined ? { seed: p.seed } : {}),
    ...(p.temperature !== undefined ? { temperatureMilli: Math.round(p.temperature * 1000) } : {}),
    ...(p.top_p !== undefined ? { topPMilli: Math.round(p.top_p * 1000) } : {}),
  }
}

export interface ReceiptInput {
  job: StrongRef
  requester: string
  model: string
  inputCommitment: string
  outputCommitment: string
  tokens: { in: number; out: number }
  startedAt: string
  completedAt: string
  price: ModelPrice
  attestation: StrongRef
  params: ComputeReceiptGenerationParams
  /** Served free under the provider's pro bono policy: the network's rule is price 0 and no tokens counted. */
  proBono: boolean
  /** The dispatching brokerage's countersignature, as the request carried it: on the receipt, outside what the key signs. */
  brokerageCountersignature?: ComputeReceiptBrokerageCountersignature
}

export function receiptRecord(r: ReceiptInput, keys: ProviderKeys): ComputeReceipt & { $type: string } {
  const signed = signReceipt(
    {
      $type: ids.ComputeReceipt,
      job: { uri: r.job.uri, cid: r.job.cid },
      requester: r.requester,
      model: r.model,
      inputCommitment: r.inputCommitment,
      outputCommitment: r.outputCommitment,
      tokens: r.proBono ? { in: 0, out: 0 } : r.tokens,
      startedAt: r.startedAt,
      completedAt: r.completedAt,
      price: { amount: r.proBono ? 0 : receiptPrice(r.tokens.in, r.tokens.out, r.price), currency: r.price.currency },
      attestation: { uri: r.attestation.uri, cid: r.attestation.cid },
      params: r.params,
      ...(r.proBono ? { proBono: true } : {}),
    },
    keys.signer,
  )
  // Added after signing, as the network's agent does (receipt.rs): the brokerage signs it, not this machine.
  return r.brokerageCountersignature ? { ...signed, brokerageCountersignature: r.brokerageCountersignature } : signed
}
