/**
 * The model listings of the OpenAI-compatible API, public as on the network
 * (packages/console/src/routes/v1.models.ts, v1.recommended-models.ts):
 * `GET /v1/models` in OpenAI's list shape, or the network's richer views with
 * `?view=directory` (per machine, with activity windows) and `?view=summary`
 * (a row per model); `GET /v1/recommended-models`, a curated list for new
 * hosts. Built from the machines connected now, never from records alone: a
 * machine that went away is not listed as serving.
 */
import type { ConsoleIndex } from '../../appview/index.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import type { ComputeDefsModelPrice, ComputeModelActivityOutput, DefsActivityWindows } from '../../src/lexicon/generated/types.ts'
import type { ConnectedProvider } from './gateway.ts'

/** A model the network recommends to a new host, with the memory it wants. */
export interface RecommendedModel {
  /** The id providers announce (an Ollama tag: what `--upstream` serves under that name). */
  id: string
  minRamGb: number
  blurb: string
}

/** Smallest first, so a picker can stop at the host's memory. Our own choice for OpenAI-compatible upstreams. */
export const RECOMMENDED_MODELS: readonly RecommendedModel[] = [
  { id: 'qwen2.5:0.5b', minRamGb: 2, blurb: 'Qwen 2.5 0.5B: tiny and quick, for trying the network on any machine' },
  { id: 'llama3.2:3b', minRamGb: 4, blurb: 'Llama 3.2 3B: small general chat' },
  { id: 'qwen2.5:3b', minRamGb: 4, blurb: 'Qwen 2.5 3B: small, with tool calling' },
  { id: 'qwen2.5:7b', minRamGb: 8, blurb: 'Qwen 2.5 7B: the balanced default, with tool calling and JSON output' },
  { id: 'llama3.1:8b', minRamGb: 8, blurb: 'Llama 3.1 8B: general chat, with tool calling' },
  { id: 'qwen2.5vl:7b', minRamGb: 12, blurb: 'Qwen 2.5 VL 7B: reads images' },
  { id: 'qwen2.5:14b', minRamGb: 16, blurb: 'Qwen 2.5 14B: stronger answers for 16 GB hosts' },
  { id: 'qwen2.5:32b', minRamGb: 32, blurb: 'Qwen 2.5 32B: high quality for 32 GB hosts and up' },
]
const RECOMMENDED_IDS = new Set(RECOMMENDED_MODELS.map((m) => m.id))

/**
 * Whether a machine takes jobs with tools for `model`: its owner opted in on
 * its record (`toolCalls`, not overridden by `toolCallsDisabled`). The agent
 * checks each model before it serves tools; jobs for one it cannot serve are
 * refused there and fail over.
 */
export const servesTools = (p: ConnectedProvider, model: string): boolean => p.models.includes(model) && p.record.body.toolCalls === true && p.record.body.toolCallsDisabled !== true

/** A hint for a picker's image upload: the id names a vision model. Never a gate. */
const looksLikeVision = (id: string) => /(^|[^a-z])(vl|vlm|vision|llava|pixtral|moondream)([^a-z]|$)/i.test(id)

const zero = (): DefsActivityWindows => ({ hour: { requests: 0, tokens: 0 }, day: { requests: 0, tokens: 0 }, week: { requests: 0, tokens: 0 }, month: { requests: 0, tokens: 0 } })

const text = (v: unknown): string | null => (typeof v === 'string' && v.length > 0 ? v : null)
const int = (v: unknown): number | null => (Number.isSafeInteger(v) ? (v as number) : null)

export interface ProfileChip {
  did: string
  displayName: string | null
  handle: string | null
  avatarUrl: string | null
}

/** What an account's indexed profile record (rkey self) says of it; null without one. */
export function profileChip(index: Pick<ConsoleIndex, 'record'> | undefined, did: string): ProfileChip | null {
  const body = index?.record(`at://${did}/${ids.AccountProfile}/self`)?.body
  if (!body) return null
  return { did, displayName: text(body.displayName), handle: text(body.handle), avatarUrl: text(body.avatarUrl) }
}

export interface DirectorySources {
  /** Receipt activity per model and provider (the AppView's dev.cocore.compute.modelActivity); absent, zeros. */
  activity?: ComputeModelActivityOutput | null
  /** What an account's profile record says of it; null when it has none. */
  profileOf?: (did: string) => ProfileChip | null
}

/** `?view=directory`: one entry per model served now, most machines first, each machine with its record's details. */
export function modelDirectory(connected: ConnectedProvider[], sources: DirectorySources = {}) {
  const activity = new Map((sources.activity?.models ?? []).map((m) => [m.modelId, m]))
  const byModel = new Map<string, ConnectedProvider[]>()
  for (const p of connected) {
    if (p.record.body.active === false) continue
    for (const m of p.models) byModel.set(m, [...(byModel.get(m) ?? []), p])
  }
  const models = [...byModel].map(([modelId, ps]) => {
    const price = ps.flatMap((p) => (Array.isArray(p.record.body.priceList) ? (p.record.body.priceList as ComputeDefsModelPrice[]) : [])).find((e) => e?.modelId === modelId)
    const machines = ps.map((p) => {
      const body = p.record.body
      return {
        did: p.did,
        machineId: p.record.uri.split('/').pop() ?? null,
        machineLabel: text(body.machineLabel),
        chip: text(body.chip),
        ramGB: int(body.ramGB),
        attestationPubKey: text(body.attestationPubKey),
        lastSeen: new Date(p.lastSeen).toISOString(),
        region: text(body.region),
        // No hardware evidence is verified by this exchange yet (see the verified tier): every machine is best-effort.
        confidential: false,
        verifiedTier: 'best-effort',
        host: sources.profileOf?.(p.did) ?? null,
        activity: activity.get(modelId)?.byProvider.find((b) => b.did === p.did)?.stats ?? zero(),
      }
    })
    return {
      modelId,
      machineCount: machines.length,
      machines,
      inputPricePerMTok: int(price?.inputPricePerMTok),
      outputPricePerMTok: int(price?.outputPricePerMTok),
      currency: text(price?.currency),
      freshestAt: machines.map((m) => m.lastSeen).sort().at(-1) ?? null,
      activity: activity.get(modelId)?.totals ?? zero(),
      recommended: RECOMMENDED_IDS.has(modelId),
      vision: looksLikeVision(modelId),
      tools: ps.some((p) => servesTools(p, modelId)),
    }
  })
  models.sort((a, b) => b.machineCount - a.machineCount || a.modelId.localeCompare(b.modelId))
  return { models, generatedAt: new Date().toISOString(), appviewUnreachable: false }
}

export type ModelDirectory = ReturnType<typeof modelDirectory>

/** `?view=summary`: a row per model. */
export const directorySummary = (d: ModelDirectory) => ({
  models: d.models.map((m) => ({ modelId: m.modelId, machineCount: m.machineCount, inputPricePerMTok: m.inputPricePerMTok, outputPricePerMTok: m.outputPricePerMTok, currency: m.currency, recommended: m.recommended })),
  generatedAt: d.generatedAt,
  appviewUnreachable: d.appviewUnreachable,
})
