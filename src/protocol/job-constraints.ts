/**
 * A job's public constraints: a JSON Schema its output must follow, and the
 * functions its model may call. Unlike the prompt they are not sealed: the job
 * record carries them (`outputSchema`, `tools`, `toolChoice`,
 * `toolChoiceFunction`, as on the network), the provider is sent them on the
 * `inference_request` frame under the network's snake_case names, and a
 * receipt commits to the SHA-256 of each one's canonical JSON
 * (`params.outputSchemaHash`, `params.toolSchemaHash`).
 *
 * The conversation around tool calls (an assistant's `tool_calls`, a `tool`
 * message's `tool_call_id`) is content: it travels sealed, in the messages-v1
 * document (input.ts).
 */
import { canonicalBytes, CanonicalJsonError } from '../crypto/canonical-json.ts'
import type { ComputeJob } from '../lexicon/generated/types.ts'
import { sha256HexOf } from './input.ts'

export type JobConstraints = Pick<ComputeJob, 'outputSchema' | 'tools' | 'toolChoice' | 'toolChoiceFunction'>
export type JobTool = NonNullable<ComputeJob['tools']>[number]
export const TOOL_CHOICES = ['auto', 'none', 'required'] as const
export type ToolChoice = (typeof TOOL_CHOICES)[number]

/** The job lexicon's limits. */
export const MAX_TOOLS = 128
export const MAX_NAME_BYTES = 256
export const MAX_DESCRIPTION_BYTES = 4096
/** Nesting a schema may have: deeper ones are refused before anything walks them recursively. */
const MAX_DEPTH = 48
/** Canonical bytes of the schema and tools together: they sit in a record (at most 1 MB with everything else). */
export const MAX_CONSTRAINT_BYTES = 256 * 1024

/**
 * Why `value` (a JSON Schema, the tools) cannot go into a record and a
 * receipt's hash, or null when it can. The AT Protocol data model has no
 * floats and reads `$link` / `$bytes` objects as links and bytes; canonical
 * JSON (which the hash covers) takes ASCII keys and safe integers only.
 */
export function recordJsonProblem(value: unknown): string | null {
  const walk = (v: unknown, depth: number): string | null => {
    if (depth > MAX_DEPTH) return `is nested more than ${MAX_DEPTH} levels deep`
    // With the u flag, only a lone surrogate matches.
    if (typeof v === 'string') return /[\uD800-\uDFFF]/u.test(v) ? 'holds a string that is not valid Unicode' : null
    if (typeof v === 'number') return Number.isSafeInteger(v) ? null : `holds the number ${v}: only integers can be stored in a record`
    if (v === null || typeof v === 'boolean') return null
    if (Array.isArray(v)) {
      for (const x of v) {
        const p = walk(x, depth + 1)
        if (p) return p
      }
      return null
    }
    if (typeof v !== 'object') return `holds a ${typeof v}`
    for (const [k, x] of Object.entries(v)) {
      if (!/^[\x20-\x7e]*$/.test(k)) return `has the key ${JSON.stringify(k.slice(0, 40))}: keys must be printable ASCII`
      if (k === '$link' || k === '$bytes') return `has the key "${k}", which records reserve`
      if (k === '$type' && typeof x !== 'string') return 'has a $type that is not a string'
      const p = walk(x, depth + 1)
      if (p) return p
    }
    return null
  }
  return walk(value, 0)
}

/** Why these constraints cannot go on a record (the field and its problem), or null when they can. */
export function constraintsProblem(c: JobConstraints): string | null {
  for (const [field, v] of [['outputSchema', c.outputSchema], ['tools', c.tools]] as const) {
    const problem = v === undefined ? null : recordJsonProblem(v)
    if (problem) return `${field}: it ${problem}`
  }
  return constraintBytes(c) > MAX_CONSTRAINT_BYTES ? `outputSchema and tools: they are over ${MAX_CONSTRAINT_BYTES >> 10} KB together` : null
}

/** Canonical size of the constraints (their record fields); throws CanonicalJsonError on what recordJsonProblem refuses. */
export const constraintBytes = (c: JobConstraints): number => canonicalBytes({ outputSchema: c.outputSchema, tools: c.tools }).length

/** The frame fields of the constraints (the network's names); none when there are none. */
export function constraintFrameFields(c: JobConstraints | undefined): { output_schema?: JobConstraints['outputSchema']; tools?: JobTool[]; tool_choice?: string; tool_choice_function?: string } {
  if (!c) return {}
  return {
    ...(c.outputSchema ? { output_schema: c.outputSchema } : {}),
    ...(c.tools ? { tools: c.tools } : {}),
    ...(c.toolChoice ? { tool_choice: c.toolChoice } : {}),
    ...(c.toolChoiceFunction ? { tool_choice_function: c.toolChoiceFunction } : {}),
  }
}

/**
 * The constraints a provider is sent, read from the frame; a string saying
 * what is malformed (the job is refused: serving it without them would break
 * the job's terms).
 */
export function constraintsOfFrame(f: { output_schema?: unknown; tools?: unknown; tool_choice?: unknown; tool_choice_function?: unknown }): JobConstraints | string {
  const obj = (v: unknown) => !!v && typeof v === 'object' && !Array.isArray(v)
  const c: JobConstraints = {}
  if (f.output_schema !== undefined && f.output_schema !== null) {
    if (!obj(f.output_schema)) return 'output_schema must be an object'
    c.outputSchema = f.output_schema as JobConstraints['outputSchema']
  }
  if (f.tools !== undefined && f.tools !== null) {
    const ok = Array.isArray(f.tools) && f.tools.length <= MAX_TOOLS && f.tools.every((t) => obj(t) && obj(t.function) && typeof t.function.name === 'string')
    if (!ok) return 'tools must be a list of { type, function: { name, ... } }'
    c.tools = f.tools as JobTool[]
  }
  if (f.tool_choice !== undefined && f.tool_choice !== null) {
    if (!(TOOL_CHOICES as readonly unknown[]).includes(f.tool_choice)) return `tool_choice must be one of ${TOOL_CHOICES.join(', ')}`
    c.toolChoice = f.tool_choice as ToolChoice
  }
  if (f.tool_choice_function !== undefined && f.tool_choice_function !== null) {
    if (typeof f.tool_choice_function !== 'string') return 'tool_choice_function must be a string'
    c.toolChoiceFunction = f.tool_choice_function
  }
  return c
}

/** The receipt's commitments to the constraints: hex SHA-256 of each field's canonical JSON. */
export function constraintHashes(c: JobConstraints): { outputSchemaHash?: string; toolSchemaHash?: string } {
  try {
    return {
      ...(c.outputSchema ? { outputSchemaHash: sha256HexOf(canonicalBytes(c.outputSchema)) } : {}),
      ...(c.tools ? { toolSchemaHash: sha256HexOf(canonicalBytes(c.tools)) } : {}),
    }
  } catch (err) {
    // Checked where they were accepted; a frame that carries others is not hashed (and not served: see the provider).
    if (err instanceof CanonicalJsonError) return {}
    throw err
  }
}
