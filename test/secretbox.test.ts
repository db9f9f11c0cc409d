/** Encryption at rest: AES-256-GCM with named keys, rotation, tamper detection, key file mode. */
import { randomBytes } from 'node:crypto'
import { mkdtempSync, statSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { loadKeyring, parseKeyring, SecretBox, SecretBoxError } from '../src/crypto/secretbox.ts'

const key = (kid: string) => `${kid}:${randomBytes(32).toString('base64')}`

describe('SecretBox', () => {
  it('round-trips, names its key, and binds the context', () => {
    const box = new SecretBox(parseKeyring(key('k1')))
    const sealed = box.seal('refresh-token-xyz', 'oauth_sessions:did:plc:a')
    expect(sealed.startsWith('v1.k1.')).toBe(true)
    expect(sealed).not.toContain('refresh-token-xyz')
    expect(box.open(sealed, 'oauth_sessions:did:plc:a')).toBe('refresh-token-xyz')
    expect(() => box.open(sealed, 'oauth_sessions:did:plc:b')).toThrow(SecretBoxError)
    expect(box.seal('same', 'x')).not.toBe(box.seal('same', 'x'))
  })
  it('detects tampering', () => {
    const box = new SecretBox(parseKeyring(key('k1')))
    const sealed = box.seal('secret')
    const parts = sealed.split('.')
    const ct = Buffer.from(parts[3]!, 'base64url')
    ct[0]! ^= 1
    expect(() => box.open([...parts.slice(0, 3), ct.toString('base64url')].join('.'))).toThrow(SecretBoxError)
  })
  it('rotates: the new key seals, old keys still open, unknown keys are refused', () => {
    const old = key('old')
    const sealedOld = new SecretBox(parseKeyring(old)).seal('v')
    const rotated = new SecretBox(parseKeyring(`${key('new')},${old}`))
    expect(rotated.open(sealedOld)).toBe('v')
    expect(rotated.isStale(sealedOld)).toBe(true)
    expect(rotated.seal('v').startsWith('v1.new.')).toBe(true)
    expect(() => new SecretBox(parseKeyring(key('other'))).open(sealedOld)).toThrow(/unknown key id/)
    expect(() => parseKeyring('k1:short')).toThrow(/32 bytes/)
  })
  it('creates its key file on first start with mode 0600, and reuses it', () => {
    const file = join(mkdtempSync(join(tmpdir(), 'keys-')), 'secret.key')
    const ring = loadKeyring(undefined, file)
    expect(statSync(file).mode & 0o777).toBe(0o600)
    expect(loadKeyring(undefined, file)[0]!.key.equals(ring[0]!.key)).toBe(true)
    expect(readFileSync(file, 'utf8')).toMatch(/^[\w-]+:[A-Za-z0-9+/]{43}=\n$/)
  })
})
