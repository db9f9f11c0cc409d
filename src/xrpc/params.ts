/**
 * Query parameters of an XRPC method, read from the query string and checked
 * against its lexicon, per request. `@atproto/lexicon`'s params validator
 * builds a ValidationError (a stack trace) for every optional parameter a
 * request leaves out, which was most of a list request's validation time.
 * Here each method gets a check compiled once from its lexicon for the
 * shapes our queries use (integers with bounds, booleans, strings with an
 * enum or a did / at-uri format, defaults, required); a method with any
 * other shape, and every request that fails the check, goes through the
 * library, so what is accepted and every error message are the library's.
 */
import { isAtUriString, isValidDid } from '@atproto/syntax'
import { ValidationError } from '@atproto/lexicon'
import { lexicons } from '../lexicon/validate.ts'
import { InvalidRequestError } from './errors.ts'

interface PropDef {
  type: string
  items?: { type: string }
  default?: unknown
  minimum?: number
  maximum?: number
  enum?: unknown[]
  format?: string
  [constraint: string]: unknown
}

/** A property's check: true when the library would accept the value as it is. */
type Check = (v: unknown) => boolean

const STRING_FORMATS: Record<string, (v: string) => boolean> = { did: isValidDid, 'at-uri': isAtUriString }
/** The keys a property definition may have for its compiled check to be the library's: anything else, and the library decides. */
const KNOWN_KEYS = new Set(['type', 'description', 'default', 'minimum', 'maximum', 'enum', 'format', 'knownValues'])

function compileProp(p: PropDef): Check | null {
  if (Object.keys(p).some((k) => !KNOWN_KEYS.has(k))) return null
  switch (p.type) {
    case 'integer': {
      if (p.enum || p.format) return null
      const { minimum: min, maximum: max } = p
      return (v) => typeof v === 'number' && Number.isInteger(v) && (min === undefined || v >= min) && (max === undefined || v <= max)
    }
    case 'boolean':
      return p.enum || p.format || p.minimum !== undefined || p.maximum !== undefined ? null : (v) => typeof v === 'boolean'
    case 'string': {
      if (p.minimum !== undefined || p.maximum !== undefined) return null
      const format = p.format === undefined ? undefined : STRING_FORMATS[p.format]
      if (p.format !== undefined && !format) return null
      const allowed = p.enum
      return (v) => typeof v === 'string' && (!allowed || allowed.includes(v)) && (!format || format(v))
    }
    default:
      return null
  }
}

interface MethodParams {
  /** Each property's lexicon type, for reading the query string. */
  types: Map<string, PropDef>
  /** The compiled check, or null when the library checks every request. */
  check: ((raw: Record<string, unknown>) => Record<string, unknown> | null) | null
}

const compiled = new Map<string, MethodParams>()

function compile(nsid: string): MethodParams {
  const def = lexicons.getDef(nsid) as { parameters?: { required?: string[]; properties?: Record<string, PropDef> } } | undefined
  const props = Object.entries(def?.parameters?.properties ?? {})
  const required = new Set(def?.parameters?.required ?? [])
  const checks = props.map(([key, p]) => ({ key, p, check: compileProp(p) }))
  const check = checks.every((c) => c.check)
    ? (raw: Record<string, unknown>) => {
        let out = raw
        for (const { key, p, check } of checks) {
          const v = raw[key]
          if (v === undefined) {
            if (required.has(key)) return null
            if (p.default === undefined) continue
            // A shallow copy with the defaults, as the library makes it.
            if (out === raw) out = { ...raw }
            out[key] = p.default
          } else if (!check!(v)) return null
        }
        return out
      }
    : null
  const m = { types: new Map(props), check }
  compiled.set(nsid, m)
  return m
}

/** The query string's values as the lexicon types them (validation comes after): integers and booleans parsed, arrays gathered. */
function coerce(types: Map<string, PropDef>, query: string): Record<string, unknown> {
  const out: Record<string, unknown> = {}
  if (!query) return out
  const search = new URLSearchParams(query)
  for (const key of new Set(search.keys())) {
    const values = search.getAll(key)
    const p = types.get(key)
    if (!p) {
      out[key] = values[0]
      continue
    }
    const one = (type: string | undefined, v: string): unknown => {
      if (type === 'integer') return /^-?\d+$/.test(v) ? Number(v) : v
      if (type === 'boolean') return v === 'true' ? true : v === 'false' ? false : v
      return v
    }
    out[key] = p.type === 'array' ? values.map((v) => one(p.items?.type, v)) : one(p.type, values[values.length - 1]!)
  }
  return out
}

/**
 * The method's parameters from a request URL's query string (the part after
 * `?`, without it), typed and checked, with defaults applied.
 * @throws InvalidRequestError with the library's message.
 */
export function readParams(nsid: string, query: string): Record<string, unknown> {
  const m = compiled.get(nsid) ?? compile(nsid)
  const raw = coerce(m.types, query)
  const fast = m.check?.(raw)
  if (fast) return fast
  try {
    return lexicons.assertValidXrpcParams(nsid, raw) ?? {}
  } catch (err) {
    if (err instanceof ValidationError) throw new InvalidRequestError(err.message)
    throw err
  }
}
