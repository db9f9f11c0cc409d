/**
 * Canonical JSON, the byte form every cocore signature covers: object keys
 * sorted by UTF-16 code unit and ASCII only, no whitespace, strings with the
 * minimal escapes (`\" \\ \b \f \n \r \t`, other controls as lowercase
 * `\u00xx`, everything else raw UTF-8), integers only, within the safe range.
 * Keys whose value is `undefined` are omitted. `Uint8Array` values (bytes read
 * from CBOR) are written as standard base64 strings, the form the live network
 * signs and publishes.
 */
export class CanonicalJsonError extends Error {
  override name = 'CanonicalJsonError'
}

const SHORT: Record<string, string> = { '"': '\\"', '\\': '\\\\', '\b': '\\b', '\f': '\\f', '\n': '\\n', '\r': '\\r', '\t': '\\t' }

function str(s: string): string {
  let out = '"'
  for (let i = 0; i < s.length; i++) {
    const ch = s[i]!
    const code = s.charCodeAt(i)
    if (SHORT[ch]) out += SHORT[ch]
    else if (code < 0x20) out += '\\u' + code.toString(16).padStart(4, '0')
    else out += ch
  }
  return out + '"'
}

function write(v: unknown): string {
  if (v === null) return 'null'
  switch (typeof v) {
    case 'boolean':
      return v ? 'true' : 'false'
    case 'string':
      return str(v)
    case 'number':
      if (!Number.isInteger(v)) throw new CanonicalJsonError('floating-point numbers are not allowed in signed records')
      if (!Number.isSafeInteger(v)) throw new CanonicalJsonError(`integer out of the safe range: ${v}`)
      return String(v === 0 ? 0 : v)
    case 'object': {
      if (v instanceof Uint8Array) return str(Buffer.from(v).toString('base64'))
      if (Array.isArray(v)) return '[' + v.map(write).join(',') + ']'
      const obj = v as Record<string, unknown>
      const keys = Object.keys(obj)
        .filter((k) => obj[k] !== undefined)
        .sort()
      return (
        '{' +
        keys
          .map((k) => {
            if (!/^[\x00-\x7f]*$/.test(k)) throw new CanonicalJsonError(`non-ASCII key: ${JSON.stringify(k)}`)
            return str(k) + ':' + write(obj[k])
          })
          .join(',') +
        '}'
      )
    }
    default:
      throw new CanonicalJsonError(`unsupported value type: ${typeof v}`)
  }
}

export function canonicalJson(value: unknown): string {
  return write(value)
}

export function canonicalBytes(value: unknown): Uint8Array {
  return new TextEncoder().encode(write(value))
}

/** A copy of `record` without the named top-level fields (signatures, `$type`). */
export function without(record: Record<string, unknown>, ...fields: string[]): Record<string, unknown> {
  const out = { ...record }
  for (const f of fields) delete out[f]
  return out
}
