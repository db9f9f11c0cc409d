/**
 * Encryption at rest: AES-256-GCM with named keys, rotation (rows re-sealed
 * under the current key), tamper detection, where the keys may live and with
 * what file mode.
 */
import { randomBytes } from 'node:crypto'
import { chmodSync, mkdirSync, mkdtempSync, statSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { NodeSavedSession, NodeSavedState } from '@atproto/oauth-client-node'
import { describe, expect, it } from 'vitest'
import { startConsole } from '../console/index.ts'
import { resealStale, sessionStore, stateStore } from '../console/oauth/stores.ts'
import { loadConfig } from '../src/config.ts'
import { loadKeyring, parseKeyring, SecretBox, SecretBoxError } from '../src/crypto/secretbox.ts'
import { openDb } from '../src/db/index.ts'
import { consoleOpts } from './fixture/console.ts'

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
    const ring = loadKeyring({ file })
    expect(statSync(file).mode & 0o777).toBe(0o600)
    expect(loadKeyring({ file })[0]!.key.equals(ring[0]!.key)).toBe(true)
    expect(readFileSync(file, 'utf8')).toMatch(/^[\w-]+:[A-Za-z0-9+/]{43}=\n$/)
  })
})

const tempDir = (name: string) => mkdtempSync(join(tmpdir(), `${name}-`))
/** A key file with the given mode, holding `spec`. */
function keyFile(dir: string, mode: number, spec = key('f1')): string {
  const file = join(dir, 'secret.key')
  writeFileSync(file, `${spec}\n`, { mode })
  chmodSync(file, mode)
  return file
}

describe('key file', () => {
  it('is refused, and left as it is, when group or others have any access', () => {
    for (const mode of [0o640, 0o604, 0o660, 0o644, 0o601]) {
      const file = keyFile(tempDir('loose'), mode)
      expect(() => loadKeyring({ file }), mode.toString(8)).toThrow(SecretBoxError)
      expect(() => loadKeyring({ file }), mode.toString(8)).toThrow(/chmod 600/)
      expect(statSync(file).mode & 0o777).toBe(mode)
    }
    expect(loadKeyring({ file: keyFile(tempDir('tight'), 0o400) })).toHaveLength(1)
  })

  it('is COCORE_SECRET_KEY_FILE, by default in the data directory', () => {
    expect(loadConfig({ COCORE_DATA_DIR: '/srv/cocore' }).secretKeyFile).toBe('/srv/cocore/secret.key')
    expect(loadConfig({ COCORE_DATA_DIR: '/srv/cocore', COCORE_SECRET_KEY_FILE: '/run/secrets/cocore.key' }).secretKeyFile).toBe('/run/secrets/cocore.key')
  })
})

describe('production keys', () => {
  const production = (dataDir: string) => ({ production: { dataDir } })

  it('must not live in the data directory, nor be created there', () => {
    const dataDir = tempDir('data')
    const inside = join(dataDir, 'secret.key')
    expect(() => loadKeyring({ file: inside, ...production(dataDir) })).toThrow(/inside the data directory/)
    // Nothing was created: a fresh key would open none of the rows already sealed.
    expect(() => statSync(inside)).toThrow()
    // An existing one, even 0600, in a subdirectory, or reached through a link from outside.
    keyFile(dataDir, 0o600)
    expect(() => loadKeyring({ file: inside, ...production(dataDir) })).toThrow(/inside the data directory/)
    mkdirSync(join(dataDir, 'keys'))
    expect(() => loadKeyring({ file: keyFile(join(dataDir, 'keys'), 0o600), ...production(dataDir) })).toThrow(/inside the data directory/)
    const link = join(tempDir('elsewhere'), 'secret.key')
    symlinkSync(inside, link)
    expect(() => loadKeyring({ file: link, ...production(dataDir) })).toThrow(/inside the data directory/)
  })

  it('come from COCORE_SECRET_KEY or a 0600 key file outside the data directory, which must exist', () => {
    const dataDir = tempDir('data')
    expect(loadKeyring({ env: key('env'), file: join(dataDir, 'secret.key'), ...production(dataDir) })[0]!.kid).toBe('env')
    const outside = tempDir('secrets')
    expect(() => loadKeyring({ file: join(outside, 'secret.key'), ...production(dataDir) })).toThrow(/does not exist/)
    expect(loadKeyring({ file: keyFile(outside, 0o600), ...production(dataDir) })[0]!.kid).toBe('f1')
    expect(() => loadKeyring({ file: keyFile(tempDir('secrets'), 0o644), ...production(dataDir) })).toThrow(/mode 0644/)
  })

  it('the console refuses to start in production mode without them', async () => {
    const dataDir = tempDir('prod-console')
    const opts = { ...consoleOpts(null, 'https://appview.example.net', { dataDir, mode: 'production', publicUrl: 'https://console.example.net' }), secretKey: undefined }
    await expect(startConsole(opts)).rejects.toThrow(/inside the data directory/)
    const svc = await startConsole({ ...opts, secretKeyFile: keyFile(tempDir('secrets'), 0o600) })
    await svc.close()
  })
})

describe('after a key rotation', () => {
  const session = (did: string) => ({ dpopJwk: { kty: 'EC', d: `private-${did}` }, authMethod: 'none', tokenSet: { sub: did, refresh_token: `refresh-${did}` } }) as unknown as NodeSavedSession
  const state = (n: number) => ({ appState: `state-${n}`, dpopJwk: { kty: 'EC' } }) as unknown as NodeSavedState

  it('re-seals every row under the current key, in batches, keeping contents and times; rows no key opens stay', async () => {
    const db = openDb(join(tempDir('reseal'), 'console.sqlite'))
    const old = key('old')
    const before = new SecretBox(parseKeyring(old))
    const dids = Array.from({ length: 45 }, (_, i) => `did:plc:${String(i).padStart(24, 'a')}`)
    for (const did of dids) await sessionStore(db, before).set(did, session(did))
    for (let i = 0; i < 7; i++) await stateStore(db, before).set(`st${i}`, state(i))
    // Sealed under a key the ring no longer has.
    await sessionStore(db, new SecretBox(parseKeyring(key('gone')))).set('did:plc:lost', session('did:plc:lost'))
    const times = db.$client.prepare('SELECT did, updated_at FROM oauth_sessions ORDER BY did').all()

    const current = key('new')
    const rotated = new SecretBox(parseKeyring(`${current},${old}`))
    expect(await resealStale(db, rotated, 10)).toEqual({ resealed: 52, unreadable: 1 })
    const kids = db.$client.prepare("SELECT substr(sealed, 1, 7) AS p, count(*) AS n FROM (SELECT sealed FROM oauth_sessions UNION ALL SELECT sealed FROM oauth_states) GROUP BY p ORDER BY p").all()
    expect(kids).toEqual([{ p: 'v1.gone', n: 1 }, { p: 'v1.new.', n: 52 }])
    expect(db.$client.prepare('SELECT did, updated_at FROM oauth_sessions ORDER BY did').all()).toEqual(times)
    // The old key can leave the ring: the new one alone opens every row, bound to its own row still.
    const only = new SecretBox(parseKeyring(current))
    for (const did of dids) expect(await sessionStore(db, only).get(did)).toEqual(session(did))
    expect(await stateStore(db, only).get('st3')).toEqual(state(3))
    // Nothing left to do the second time.
    expect(await resealStale(db, rotated, 10)).toEqual({ resealed: 0, unreadable: 1 })
    db.$client.close()
  })

  it('the console re-seals at start, so the next start may drop the older key', async () => {
    const dataDir = tempDir('rotate-console')
    const [a, b] = [key('a'), key('b')]
    const opts = (secretKey: string) => consoleOpts(null, 'http://127.0.0.1:1', { dataDir, secretKey })
    let svc = await startConsole(opts(a))
    await sessionStore(svc.db, new SecretBox(parseKeyring(a))).set('did:plc:amy', session('did:plc:amy'))
    await svc.close()
    svc = await startConsole(opts(`${b},${a}`))
    expect(await svc.resealed).toEqual({ resealed: 1, unreadable: 0 })
    await svc.close()
    svc = await startConsole(opts(b))
    expect(await sessionStore(svc.db, new SecretBox(parseKeyring(b))).get('did:plc:amy')).toEqual(session('did:plc:amy'))
    await svc.close()
  })
})
