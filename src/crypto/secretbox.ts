/**
 * Encryption at rest for secrets the console must keep (OAuth state and
 * sessions: tokens and DPoP private keys). AES-256-GCM with a random 96-bit
 * IV per message. The ciphertext names the key that sealed it,
 * `v1.<kid>.<iv>.<ciphertext+tag>` (base64url), so keys can rotate: the first
 * key of the ring seals, every key of the ring opens.
 *
 * Keys come from `COCORE_SECRET_KEY` (`kid:base64key[,kid:base64key...]`,
 * current first) or from a key file (`COCORE_SECRET_KEY_FILE`), which dev
 * mode creates on first start with mode 0600.
 */
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, readFileSync, realpathSync, statSync, writeFileSync } from 'node:fs'
import { dirname, isAbsolute, relative, resolve, sep } from 'node:path'

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

export interface KeyringSource {
  /** `COCORE_SECRET_KEY`: when set, the key file is not read. */
  env?: string
  /** The key file (`COCORE_SECRET_KEY_FILE`, default `<dataDir>/secret.key`). */
  file: string
  /**
   * Production: the keys must not sit with the data they protect (a copy of
   * the data directory alone must not open its tokens), and a missing key
   * file is an error, not a reason to make a new key nothing can open old rows with.
   */
  production?: { dataDir: string }
}

/**
 * The keyring from the environment value if set, else from the key file;
 * dev mode creates the file (mode 0600) with a fresh key on first start.
 * @throws SecretBoxError for a key file others may read, or (production) a key inside the data directory
 */
export function loadKeyring(src: KeyringSource): SecretKey[] {
  if (src.env) return parseKeyring(src.env)
  const file = resolve(src.file)
  if (src.production) {
    if (isInside(src.production.dataDir, file)) {
      throw new SecretBoxError('production mode refuses a secret key inside the data directory: set COCORE_SECRET_KEY, or COCORE_SECRET_KEY_FILE to a file outside it')
    }
    if (!existsSync(file)) throw new SecretBoxError(`secret key file ${file} does not exist (production mode does not create one)`)
  } else if (!existsSync(file)) {
    mkdirSync(dirname(file), { recursive: true })
    const kid = new Date().toISOString().slice(0, 10).replace(/-/g, '') + randomBytes(3).toString('hex')
    writeFileSync(file, `${kid}:${randomBytes(32).toString('base64')}\n`, { mode: 0o600, flag: 'wx' })
  }
  // Refused, not repaired: a key others could read may already have been copied.
  const mode = statSync(file).mode & 0o777
  if (mode & 0o077) throw new SecretBoxError(`secret key file ${file} has mode 0${mode.toString(8)}: group and others must have no access (chmod 600)`)
  return parseKeyring(readFileSync(file, 'utf8'))
}

/** Whether `file` lies in `dir` (where they exist, with symbolic links followed). */
function isInside(dir: string, file: string): boolean {
  const where = (p: string) => (existsSync(p) ? realpathSync(p) : resolve(p))
  const rel = relative(where(dir), where(file))
  return rel.split(sep)[0] !== '..' && !isAbsolute(rel)
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

  /** The start of every value sealed under the current key. */
  get currentPrefix(): string {
    return `v1.${this.current.kid}.`
  }

  /** Whether a value was sealed with an older key (to re-seal on rotation). */
  isStale(sealed: string): boolean {
    return !sealed.startsWith(this.currentPrefix)
  }
}
