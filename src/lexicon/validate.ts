import { Lexicons, ValidationError, type LexUserType } from '@atproto/lexicon'
import { ids } from './generated/ids.ts'
import { schemas } from './generated/schemas.ts'

/** The lexicon registry built from `lexicons/` (through the generated schema list). */
export const lexicons = new Lexicons(schemas)

/** Records over this size are invalid (atproto repository spec). */
export const MAX_RECORD_BYTES = 1_000_000

export type RecordValidation<T> = { success: true; value: T } | { success: false; reason: string; message: string }

const B64 = /^[A-Za-z0-9+/]*={0,2}$/
const B64URL = /^[A-Za-z0-9_-]*$/

/** Strict base64 (standard or url-safe, padded or not); null when the string is not base64. */
export function decodeBase64(s: string): Uint8Array | null {
  if (B64.test(s)) {
    if (s.length % 4 === 1) return null
    return new Uint8Array(Buffer.from(s, 'base64'))
  }
  if (B64URL.test(s) && s.length % 4 !== 1) return new Uint8Array(Buffer.from(s, 'base64url'))
  return null
}

/**
 * Money-like objects whose `currency` the live network writes as "CC" (its
 * closed-loop token), one character under the lexicon's `minLength: 3`.
 */
const CLOSED_LOOP_CURRENCY = 'CC'
const MONEY_DEFS = new Set([...['money', 'tokenRate', 'modelPrice'].map((def) => `${ids.ComputeDefs}#${def}`), `${ids.ComputeExchangePolicy}#feeSchedule`])

/**
 * Maps a record to the form the standard validator checks, for two things the
 * live network writes that the lexicons, read literally, refuse:
 *  - `bytes` fields as plain base64 strings (not `{"$bytes": ...}` / CBOR
 *    bytes): strings at `bytes` positions are decoded, so lengths are checked
 *    on the bytes; a string that is not base64 is left as is and fails;
 *  - the closed-loop currency "CC" in money objects, in a policy's fee
 *    schedule and in its list of supported currencies.
 * Returns a copy where anything changed; the record itself is never altered.
 */
function toValidationForm(def: LexUserType | { type: string; [k: string]: any }, value: unknown, ctx: string): unknown {
  const d = def as any
  switch (d.type) {
    case 'bytes':
      return typeof value === 'string' ? (decodeBase64(value) ?? value) : value
    case 'record':
      return toValidationForm(d.record, value, ctx)
    case 'object': {
      if (!value || typeof value !== 'object' || Array.isArray(value)) return value
      let out: Record<string, unknown> | undefined
      for (const [k, propDef] of Object.entries<any>(d.properties ?? {})) {
        const v = (value as Record<string, unknown>)[k]
        if (v === undefined) continue
        let nv = toValidationForm(propDef, v, ctx)
        if (ctx === ids.ComputeExchangePolicy && k === 'supportedCurrencies' && Array.isArray(nv) && nv.includes(CLOSED_LOOP_CURRENCY)) {
          nv = nv.map((c) => (c === CLOSED_LOOP_CURRENCY ? 'CCX' : c))
        }
        if (nv !== v) (out ??= { ...(value as Record<string, unknown>) })[k] = nv
      }
      return out ?? value
    }
    case 'array': {
      if (!Array.isArray(value)) return value
      let changed = false
      const arr = value.map((item) => {
        const n = toValidationForm(d.items, item, ctx)
        if (n !== item) changed = true
        return n
      })
      return changed ? arr : value
    }
    case 'ref': {
      const target = resolveRef(d.ref, ctx)
      if (!target) return value
      let v = value
      if (MONEY_DEFS.has(target.uri) && (v as { currency?: unknown } | null)?.currency === CLOSED_LOOP_CURRENCY) {
        // Validated as a stand-in code of legal length; the record keeps its "CC".
        v = { ...(v as object), currency: 'CCX' }
      }
      return toValidationForm(target.def, v, target.nsid)
    }
    case 'union': {
      const t = (value as { $type?: unknown } | null)?.$type
      if (typeof t !== 'string') return value
      const want = t.includes('#') ? t : t + '#main'
      const ref = (d.refs as string[]).find((r) => resolveRef(r, ctx)?.uri === want)
      const target = ref ? resolveRef(ref, ctx) : undefined
      return target ? toValidationForm(target.def, value, target.nsid) : value
    }
    default:
      return value
  }
}

function resolveRef(ref: string, ctx: string): { def: LexUserType; nsid: string; uri: string } | undefined {
  // Lexicons stores refs as `lex:` URIs.
  const bare = ref.startsWith('lex:') ? ref.slice(4) : ref
  const rel = bare.startsWith('#') ? ctx + bare : bare
  const uri = rel.includes('#') ? rel : rel + '#main'
  const def = lexicons.getDef(uri)
  return def ? { def, nsid: uri.split('#')[0]!, uri } : undefined
}

/**
 * Validates a record against its collection's lexicon. `bytes` fields may be
 * base64 strings or Uint8Arrays; the returned value is the record as given.
 */
export function validateRecord<T>(collection: string, value: unknown): RecordValidation<T> {
  const def = lexicons.getDef(collection + '#main')
  if (!def || def.type !== 'record') {
    return { success: false, reason: 'unknown-collection', message: `no record lexicon for ${collection}` }
  }
  if (!value || typeof value !== 'object' || Array.isArray(value)) {
    return { success: false, reason: 'not-an-object', message: 'record must be an object' }
  }
  const t = (value as { $type?: unknown }).$type
  if (t !== undefined && t !== collection) {
    return { success: false, reason: 'wrong-type', message: `$type ${String(t)} does not match collection ${collection}` }
  }
  try {
    lexicons.assertValidRecord(collection, { ...(toValidationForm(def, value, collection) as object), $type: collection })
    return { success: true, value: value as T }
  } catch (err) {
    if (err instanceof ValidationError) {
      return { success: false, reason: 'schema', message: err.message }
    }
    throw err
  }
}
