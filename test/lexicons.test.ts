/**
 * Our lexicons against the reference network's, field by field: every key
 * except descriptions must match, and our only differences are the optional
 * pagination parameters/outputs we add to list queries.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { join, relative } from 'node:path'
import { execFileSync } from 'node:child_process'
import { describe, expect, it } from 'vitest'
import { Lexicons } from '@atproto/lexicon'
import { schemas } from '../src/lexicon/generated/schemas.ts'
import { validateRecord } from '../src/lexicon/validate.ts'
import { ids } from '../src/lexicon/generated/ids.ts'

const root = join(import.meta.dirname, '..')
const ours = join(root, 'lexicons', 'dev', 'cocore')
const reference = process.env.COCORE_REFERENCE_LEXICONS ?? join(root, '..', 'shared', 'reference', 'cocore-lexicons', 'dev', 'cocore')

const walk = (dir: string): string[] =>
  readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(dir, e.name)) : e.name.endsWith('.json') ? [join(dir, e.name)] : []))

/** Every structural difference, as JSON paths; descriptions ignored. */
function diff(a: unknown, b: unknown, path = ''): string[] {
  if (typeof a !== typeof b || Array.isArray(a) !== Array.isArray(b) || (a === null) !== (b === null)) return [`changed ${path}`]
  if (Array.isArray(a)) {
    const bb = b as unknown[]
    if (a.length !== bb.length) return [`changed ${path}`]
    return a.flatMap((x, i) => diff(x, bb[i], `${path}/${i}`))
  }
  if (a && typeof a === 'object') {
    const out: string[] = []
    const ao = a as Record<string, unknown>
    const bo = b as Record<string, unknown>
    for (const k of new Set([...Object.keys(ao), ...Object.keys(bo)])) {
      if (k === 'description' && typeof (ao[k] ?? bo[k]) === 'string') continue
      if (!(k in ao)) out.push(`missing ${path}/${k}`)
      else if (!(k in bo)) out.push(`added ${path}/${k}`)
      else out.push(...diff(ao[k], bo[k], `${path}/${k}`))
    }
    return out
  }
  return a === b ? [] : [`changed ${path}`]
}

/**
 * The additions we allow: new optional properties (parameters, inputs,
 * outputs, objects), a parameters block where there was none, new object defs
 * (reachable only through such new optional properties, or documenting an
 * `unknown`), and `nullable` on an output object: the reference AppView
 * answers null for absent values where its own lexicon says string, and we
 * answer as it does. Required lists must stay identical, which the diff
 * checks: a changed `required` is a "changed" entry, never allowed.
 */
const allowed = (d: string) =>
  /^added \/defs\/main\/parameters$/.test(d) ||
  /^added \/defs\/[^ ]*\/properties\/[A-Za-z]+$/.test(d) ||
  /^added \/defs\/[A-Za-z]+$/.test(d) ||
  /^added \/defs\/main\/output\/[^ ]*\/nullable$/.test(d)

describe.skipIf(!existsSync(reference))('lexicons are compatible with the reference network', () => {
  const refFiles = existsSync(reference) ? walk(reference) : []

  it('has every reference NSID, and no other dev.cocore lexicon', () => {
    const refIds = refFiles.map((f) => JSON.parse(readFileSync(f, 'utf8')).id).sort()
    const ourIds = walk(ours).map((f) => JSON.parse(readFileSync(f, 'utf8')).id).sort()
    expect(refIds).toHaveLength(40)
    expect(ourIds).toEqual(refIds)
  })

  for (const f of refFiles) {
    const rel = relative(reference, f)
    it(`${rel} matches field by field`, () => {
      const ref = JSON.parse(readFileSync(f, 'utf8'))
      const mine = JSON.parse(readFileSync(join(ours, rel), 'utf8'))
      const differences = diff(mine, ref)
      expect(differences.filter((d) => !allowed(d))).toEqual([])
      // Added parameters are never required, so reference clients keep working.
      for (const d of differences) expect(d.startsWith('added')).toBe(true)
      expect(mine.defs.main?.parameters?.required ?? []).toEqual(ref.defs.main?.parameters?.required ?? [])
    })
  }

  it('the reference documents load beside ours (same ids, resolvable refs)', () => {
    const lex = new Lexicons()
    for (const f of refFiles) lex.add(JSON.parse(readFileSync(f, 'utf8')))
    expect(() => new Lexicons(schemas)).not.toThrow()
  })
})

describe.runIf(!existsSync(reference))('lexicon compatibility', () => {
  it('skipped: the reference lexicons folder is not present', () => {
    console.warn(`reference lexicons not found at ${reference}: compatibility comparison skipped`)
  })
})

describe('generated lexicon code', () => {
  it('is up to date with lexicons/', () => {
    const out = execFileSync(process.execPath, [join(root, 'scripts', 'codegen.ts'), '--check'], { encoding: 'utf8' })
    expect(out).toContain('up to date')
  })
})

describe('record validation', () => {
  it('accepts bytes fields as plain base64 strings, as the live network writes them', () => {
    const sig = Buffer.alloc(70, 7).toString('base64')
    const rec = {
      publicKey: 'a', encryptionPubKey: 'b', chipName: 'c', hardwareModel: 'd', serialNumberHash: 'e'.repeat(64), osVersion: 'f', binaryHash: '0'.repeat(64),
      sipEnabled: true, secureBootEnabled: true, secureEnclaveAvailable: true, authenticatedRootEnabled: true,
      selfSignature: sig, mdaCertChain: [sig], attestedAt: '2026-01-01T00:00:00Z', expiresAt: '2026-02-01T00:00:00Z',
    }
    expect(validateRecord(ids.ComputeAttestation, rec).success).toBe(true)
    // ... and as CBOR bytes.
    expect(validateRecord(ids.ComputeAttestation, { ...rec, selfSignature: new Uint8Array(70) }).success).toBe(true)
    // bytes limits still apply to the decoded length (maxLength 256).
    expect(validateRecord(ids.ComputeAttestation, { ...rec, selfSignature: Buffer.alloc(300).toString('base64') }).success).toBe(false)
    // not base64 at all
    expect(validateRecord(ids.ComputeAttestation, { ...rec, selfSignature: 'not base64!' }).success).toBe(false)
  })

  it('refuses a $type that does not match the collection', () => {
    const r = validateRecord(ids.AccountFriend, { $type: ids.AccountProfile, subject: 'did:plc:abc', createdAt: '2026-01-01T00:00:00Z' })
    expect(r.success).toBe(false)
  })
})

describe('live-network tolerance', () => {
  it('accepts the closed-loop currency "CC" that the live network writes, and nothing shorter', () => {
    const auth = (currency: string) => ({
      exchange: 'did:plc:abcdefghijklmnopqrstuvwx', ceiling: { amount: 5, currency }, scope: 'singleJob',
      nonce: 'a'.repeat(32), expiresAt: '2026-01-01T00:00:00Z', createdAt: '2026-01-01T00:00:00Z',
    })
    expect(validateRecord(ids.ComputePaymentAuthorization, auth('CC')).success).toBe(true)
    expect(validateRecord(ids.ComputePaymentAuthorization, auth('USD')).success).toBe(true)
    expect(validateRecord(ids.ComputePaymentAuthorization, auth('C')).success).toBe(false)
    expect(validateRecord(ids.ComputePaymentAuthorization, auth('XX')).success).toBe(false)
  })
})
