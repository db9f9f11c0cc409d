/**
 * The reply side of the OpenAI-compatible API: a provider's chunks by channel
 * (the network's `inference_chunk.channel`: content, reasoning, tool_call)
 * into OpenAI deltas and messages, and the `x_cocore` block that says who ran
 * the job, as the network's console answers them
 * (packages/console/src/lib/openai-chat-completions.server.ts).
 *
 * A tool_call chunk is the JSON of an OpenAI `delta.tool_calls` array, as the
 * reference provider relays it from its engine's stream
 * (provider/src/engines/subprocess.rs): relayed as such when streaming,
 * assembled by `index` otherwise (ids and names from the first fragment that
 * has them, arguments concatenated).
 */
import type { ToolCall } from '../../src/protocol/input.ts'

export type ReplyChannel = 'content' | 'reasoning' | 'tool_call'

/** One fragment of a tool call, as OpenAI streams it. */
export interface ToolCallDelta {
  index: number
  id?: string
  type?: 'function'
  function?: { name?: string; arguments?: string }
}

/** Tool calls one reply may make (index 0 to 127). */
const MAX_CALLS = 128

const str = (v: unknown): v is string => typeof v === 'string'

/** The fragments of a tool_call chunk, with only their known fields; null when the text is not such an array. */
export function toolCallDeltas(text: string): ToolCallDelta[] | null {
  let raw: unknown
  try {
    raw = JSON.parse(text)
  } catch {
    return null
  }
  if (!Array.isArray(raw)) return null
  const out: ToolCallDelta[] = []
  for (const d of raw) {
    if (!d || typeof d !== 'object') return null
    // Some servers send null for a field a fragment does not carry: the same as leaving it out.
    const given = (v: unknown) => (v === null ? undefined : v)
    const r = d as Record<string, unknown>
    const [index, id, type, fn] = [r.index, given(r.id), given(r.type), given(r.function)]
    if (!Number.isSafeInteger(index) || (index as number) < 0 || (index as number) >= MAX_CALLS) return null
    if ((id !== undefined && !str(id)) || (type !== undefined && type !== 'function') || (fn !== undefined && typeof fn !== 'object')) return null
    const f = fn === undefined ? undefined : { name: given((fn as Record<string, unknown>).name), arguments: given((fn as Record<string, unknown>).arguments) }
    if (f && ((f.name !== undefined && !str(f.name)) || (f.arguments !== undefined && !str(f.arguments)))) return null
    out.push({
      index: index as number,
      ...(id !== undefined ? { id } : {}),
      ...(type !== undefined ? { type } : {}),
      ...(f ? { function: { ...(f.name !== undefined ? { name: f.name as string } : {}), ...(f.arguments !== undefined ? { arguments: f.arguments as string } : {}) } } : {}),
    })
  }
  return out
}

/** The calls of a whole reply, from its fragments in order. */
export class ToolCallAssembler {
  private readonly byIndex = new Map<number, { id: string; name: string; arguments: string }>()

  add(deltas: ToolCallDelta[]): void {
    for (const d of deltas) {
      const call = this.byIndex.get(d.index) ?? { id: '', name: '', arguments: '' }
      this.byIndex.set(d.index, call)
      if (d.id) call.id ||= d.id
      if (d.function?.name) call.name ||= d.function.name
      if (d.function?.arguments) call.arguments += d.function.arguments
    }
  }

  /** The calls, by index; a call the provider never named (no id or no function name) is left out, as on the network. */
  calls(): ToolCall[] {
    return [...this.byIndex]
      .sort(([a], [b]) => a - b)
      .filter(([, c]) => c.id && c.name)
      .map(([, c]) => ({ id: c.id, type: 'function', function: { name: c.name, arguments: c.arguments } }))
  }
}

/** Who ran a job, for the `x_cocore` block: the provider's DID, and what its records say of it. */
export interface ProviderCredit {
  did: string
  handle: string | null
  displayName: string | null
  machineLabel: string | null
}

/** The network's non-standard `x_cocore` block (OpenAI clients ignore unknown fields): the credit line, the provider and the receipt. */
export function xCocore(credit: ProviderCredit | null, receiptUri: string | undefined): { x_cocore: Record<string, unknown> } | Record<string, never> {
  if (!credit && !receiptUri) return {}
  const who = credit ? (credit.displayName ?? credit.handle ?? credit.did) : null
  return {
    x_cocore: {
      ...(credit
        ? {
            credit: `this completion was served by ${who}${credit.machineLabel ? ` on their ${credit.machineLabel} machine` : ''}`,
            provider: { did: credit.did, handle: credit.handle, displayName: credit.displayName, machineLabel: credit.machineLabel },
          }
        : {}),
      ...(receiptUri ? { receiptUri } : {}),
    },
  }
}
