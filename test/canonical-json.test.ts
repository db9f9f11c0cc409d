/** Canonical JSON, the bytes every cocore signature covers. */
import { describe, expect, it } from 'vitest'
import { canonicalJson, CanonicalJsonError } from '../src/crypto/canonical-json.ts'
import { loadConfig, ConfigError } from '../src/config.ts'

describe('canonicalJson', () => {
  it('sorts keys by code unit, recursively, with no whitespace', () => {
    expect(canonicalJson({ b: 1, a: { d: [3, { z: 1, y: 2 }], c: null }, B: true })).toBe('{"B":true,"a":{"c":null,"d":[3,{"y":2,"z":1}]},"b":1}')
  })
  it('uses the minimal escapes, lowercase \\u00xx, and raw UTF-8 for everything else', () => {
    expect(canonicalJson('a"b\\c\b\f\n\r\t\u0001\u001f/\u007f é 😀 \u2028')).toBe('"a\\"b\\\\c\\b\\f\\n\\r\\t\\u0001\\u001f/\u007f é 😀 \u2028"')
  })
  it('refuses floats, unsafe integers and non-ASCII keys', () => {
    expect(() => canonicalJson({ a: 1.5 })).toThrow(CanonicalJsonError)
    expect(() => canonicalJson({ a: 2 ** 53 })).toThrow(CanonicalJsonError)
    expect(() => canonicalJson({ é: 1 })).toThrow(CanonicalJsonError)
  })
  it('writes -0 as 0, drops undefined members, and bytes as standard base64', () => {
    expect(canonicalJson({ a: -0, b: undefined, c: new Uint8Array([251, 255]) })).toBe('{"a":0,"c":"+/8="}')
  })
})

describe('config', () => {
  it('has defaults for everything in dev, and needs a source in production', () => {
    const c = loadConfig({})
    expect(c.mode).toBe('dev')
    expect(c.appviewPort).toBe(2584)
    expect(() => loadConfig({ COCORE_MODE: 'production' })).toThrow(ConfigError)
    const p = loadConfig({ COCORE_MODE: 'production', COCORE_RELAY_URL: 'https://relay.example', COCORE_PDS_URLS: 'https://a.example, https://b.example/' })
    expect(p.firehoseSources).toEqual(['wss://relay.example', 'wss://a.example', 'wss://b.example'])
  })
  it('names the variable in its errors', () => {
    expect(() => loadConfig({ COCORE_APPVIEW_PORT: 'eighty' })).toThrow(/COCORE_APPVIEW_PORT/)
  })
})

describe('record admission', () => {
  it('refuses records over 1 MB, unknown collections and invalid records, by reason', async () => {
    const { checkRecord } = await import('../appview/indexer/indexer.ts')
    const friend = { $type: 'dev.cocore.account.friend', subject: 'did:plc:abcdefghijklmnopqrstuvwx', createdAt: '2026-01-01T00:00:00Z' }
    expect(checkRecord('dev.cocore.account.friend', 'at://x/y/z', friend, 200)).toBeNull()
    expect(checkRecord('dev.cocore.account.friend', 'at://x/y/z', friend, 1_000_001)?.reason).toBe('too-large')
    expect(checkRecord('dev.cocore.account.nope', 'at://x/y/z', friend, 200)?.reason).toBe('unknown-collection')
    expect(checkRecord('dev.cocore.account.friend', 'at://x/y/z', { ...friend, subject: 1 }, 200)?.reason).toBe('invalid-schema')
  })
})
