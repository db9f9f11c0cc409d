/**
 * Encryption at rest for secrets the console must keep (OAuth state and
 * sessions: tokens and DPoP private keys). AES-256-GCM with a random 96-bit
 * IV per message. The ciphertext names the key that sealed it,
 * `v1.<kid>.<iv>.<ciphertext+tag>` (base64url), so keys can rotate: the first
 * key of the ring seals, every key of the ring opens.
 *
 * Keys come from `COCORE_SECRET_KEY` (`kid:base64key[,kid:base64key...]`,
 * current first) or from a key file created on first start with mode 0600.
 */
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from 'node:crypto'
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { dirname } from 'node:path'

export class SecretBoxError extends Error {
  override name = 'SecretBoxError'
}

export interface SecretKey {
  kid: string
  key: Buffer
}

const KID = /^[A-Za-z0-9_-]{1,32}$/

export function parseKeyring(spec: string): SecretKey[] {
  const keys = spec
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map((entry) => {
      const i = entry.indexOf(':')
      const kid = entry.slice(0, i)
      const key = Buffer.from(entry.slice(i + 1), 'base64')
      if (i < 1 || !KID.test(kid)) throw new SecretBoxError(`secret key entry must be kid:base64key, got "${entry.slice(0, 8)}..."`)
      if (key.length !== 32) throw new SecretBoxError(`secret key ${kid} must be 32 bytes, got ${key.length}`)
      return { kid, key }
    })
  if (keys.length === 0) throw new SecretBoxError('empty secret keyring')
  return keys
}

/**
 * The keyring from the environment value if set, else from `keyFile`,
 * creating it (mode 0600) with a fresh key on first start.
 */
export function loadKeyring(envValue: string | undefined, keyFile: string): SecretKey[] {
  if (envValue) return parseKeyring(envValue)
  if (!existsSync(keyFile)) {
    mkdirSync(dirname(keyFile), { recursive: true })
    const kid = new Date().toISOString().slice(0, 10).replace(/-/g, '') + randomBytes(3).toString('hex')
    writeFileSync(keyFile, `${kid}:${randomBytes(32).toString('base64')}\n`, { mode: 0o600, flag: 'wx' })
  }
  // Refuse a key file others can read: it protects every stored token.
  if ((statSync(keyFile).mode & 0o077) !== 0) chmodSync(keyFile, 0o600)
  return parseKeyring(readFileSync(keyFile, 'utf8'))
}

export class SecretBox {
  private readonly keys: Map<string, Buffer>
  private readonly current: SecretKey

  constructor(keyring: SecretKey[]) {
    if (keyring.length === 0) throw new SecretBoxError('empty secret keyring')
    this.current = keyring[0]!
    this.keys = new Map(keyring.map((k) => [k.kid, k.key]))
  }

  get currentKid(): string {
    return this.current.kid
  }

  /** `aad` binds the ciphertext to its context (e.g. the row key), so rows cannot be swapped. */
  seal(plaintext: string, aad = ''): string {
    const iv = randomBytes(12)
    const cipher = createCipheriv('aes-256-gcm', this.current.key, iv)
    cipher.setAAD(Buffer.from(aad))
    const ct = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final(), cipher.getAuthTag()])
    return `v1.${this.current.kid}.${iv.toString('base64url')}.${ct.toString('base64url')}`
  }

  open(sealed: string, aad = ''): string {
    const [v, kid, ivB64, ctB64] = sealed.split('.')
    if (v !== 'v1' || !kid || ivB64 === undefined || ctB64 === undefined) throw new SecretBoxError('not a sealed value')
    const key = this.keys.get(kid)
    if (!key) throw new SecretBoxError(`unknown key id ${kid}`)
    const ct = Buffer.from(ctB64, 'base64url')
    if (ct.length < 16) throw new SecretBoxError('sealed value too short')
    const decipher = createDecipheriv('aes-256-gcm', key, Buffer.from(ivB64, 'base64url'))
    decipher.setAAD(Buffer.from(aad))
    decipher.setAuthTag(ct.subarray(ct.length - 16))
    try {
      return Buffer.concat([decipher.update(ct.subarray(0, ct.length - 16)), decipher.final()]).toString('utf8')
    } catch {
      throw new SecretBoxError('sealed value failed authentication')
    }
  }

  /** A 32-byte key for another purpose (e.g. keyed hashes), derived from the current key. */
  deriveKey(label: string): Buffer {
    return Buffer.from(hkdfSync('sha256', this.current.key, Buffer.alloc(0), `cocore ${label}`, 32))
  }

  /** Whether a value was sealed with an older key (to re-seal on rotation). */
  isStale(sealed: string): boolean {
    return sealed.split('.')[1] !== this.current.kid
  }
}
