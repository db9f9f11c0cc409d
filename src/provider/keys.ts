/**
 * The provider's key file: its P-256 attestation key (signs attestations,
 * receipts and challenge answers), its encryption key (prompts are sealed to
 * it: X25519 by default, or a P-256 key for the p256-ecies-se scheme, named
 * by `encScheme`), and the rkeys of the records it published, so a restart
 * updates the same provider record instead of adding another machine.
 *
 * JSON, created with mode 0600. Anyone who can read it can open prompts sealed
 * to this machine and sign receipts in its name, so a file readable by group
 * or others is refused rather than used.
 */
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { dirname } from 'node:path'
import { isEncScheme, type EncScheme } from '../crypto/enc-scheme.ts'
import { P256Signer } from '../crypto/p256.ts'
import { generateP256KeyPair, p256EncryptionPublicKey } from '../crypto/seal-ecies.ts'
import { x25519PublicKey } from '../crypto/seal.ts'

const VERSION = 1

export class KeyFileError extends Error {
  override name = 'KeyFileError'
}

/** rkeys of the records this machine published. */
export interface RecordKeys {
  provider?: string
  attestation?: string
}

/** The machine's encryption key: 32-byte secret, and the public key it announces (32 bytes X25519, or 64 bytes P-256 X || Y). */
export interface EncryptionKeyPair {
  scheme: EncScheme
  secretKey: Uint8Array
  publicKey: Uint8Array
}

export interface ProviderKeys {
  file: string
  signer: P256Signer
  encryption: EncryptionKeyPair
  records: RecordKeys
}

interface KeyFileBody {
  v: number
  attestationKey: Record<string, string>
  encryptionSecretKey: string
  /** Absent: x25519 (files written before the field). */
  encScheme?: EncScheme
  records: RecordKeys
}

/**
 * The keys in `file`, creating it with fresh keys if it does not exist; a new
 * encryption key is of `encScheme` (default x25519). A file holding a key of
 * another scheme than the one asked for is refused: the machine's key, and so
 * its published records, would change under it.
 */
export function loadOrCreateKeys(file: string, opts: { encScheme?: EncScheme } = {}): ProviderKeys {
  if (!existsSync(file)) {
    mkdirSync(dirname(file), { recursive: true, mode: 0o700 })
    const signer = P256Signer.generate()
    const scheme = opts.encScheme ?? 'x25519'
    const secret = scheme === 'x25519' ? crypto.getRandomValues(new Uint8Array(32)) : generateP256KeyPair().secretKey
    // 'wx': two agents started at once on one file do not both create it.
    writeFileSync(file, serialize(signer, { scheme, secretKey: secret }, {}), { mode: 0o600, flag: 'wx' })
  }
  const mode = statSync(file).mode & 0o777
  if (mode & 0o077) throw new KeyFileError(`key file ${file} is readable by others (mode ${mode.toString(8).padStart(4, '0')}); run: chmod 600 ${file}`)
  const keys = parse(file, readFileSync(file, 'utf8'))
  if (opts.encScheme && opts.encScheme !== keys.encryption.scheme) {
    throw new KeyFileError(`key file ${file} holds a ${keys.encryption.scheme} encryption key, not ${opts.encScheme}; use another key file for a ${opts.encScheme} key`)
  }
  return keys
}

function serialize(signer: P256Signer, encryption: Pick<EncryptionKeyPair, 'scheme' | 'secretKey'>, records: RecordKeys): string {
  const body: KeyFileBody = {
    v: VERSION,
    attestationKey: signer.privateKey.export({ format: 'jwk' }) as Record<string, string>,
    encryptionSecretKey: Buffer.from(encryption.secretKey).toString('base64'),
    ...(encryption.scheme !== 'x25519' ? { encScheme: encryption.scheme } : {}),
    records,
  }
  return JSON.stringify(body, null, 2) + '\n'
}

/** Records the rkeys of published records in the key file (replaced atomically, still 0600). */
export function saveRecordKeys(keys: ProviderKeys, records: RecordKeys): void {
  const tmp = `${keys.file}.tmp`
  rmSync(tmp, { force: true })
  writeFileSync(tmp, serialize(keys.signer, keys.encryption, records), { mode: 0o600, flag: 'wx' })
  chmodSync(tmp, 0o600)
  renameSync(tmp, keys.file)
  keys.records = { ...records }
}

function parse(file: string, text: string): ProviderKeys {
  // Messages name the file and the field, never a key's value.
  const bad = (what: string) => new KeyFileError(`key file ${file}: ${what}`)
  let body: Partial<KeyFileBody>
  try {
    body = JSON.parse(text) as Partial<KeyFileBody>
  } catch {
    throw bad('not JSON')
  }
  if (body.v !== VERSION) throw bad(`unsupported version ${String(body.v)}`)
  let signer: P256Signer
  try {
    signer = P256Signer.fromJwk(body.attestationKey ?? {})
  } catch {
    throw bad('attestationKey is not a P-256 private JWK')
  }
  if (signer.privateKey.asymmetricKeyDetails?.namedCurve !== 'prime256v1') throw bad('attestationKey is not a P-256 key')
  const scheme = body.encScheme ?? 'x25519'
  if (!isEncScheme(scheme)) throw bad(`unknown encScheme ${JSON.stringify(scheme)}`)
  const secretKey = typeof body.encryptionSecretKey === 'string' ? new Uint8Array(Buffer.from(body.encryptionSecretKey, 'base64')) : null
  if (secretKey?.length !== 32) throw bad('encryptionSecretKey is not 32 bytes of base64')
  let publicKey: Uint8Array
  try {
    publicKey = scheme === 'x25519' ? x25519PublicKey(secretKey) : p256EncryptionPublicKey(secretKey)
  } catch {
    throw bad(`encryptionSecretKey is not a ${scheme} secret key`)
  }
  const records: RecordKeys = {}
  for (const k of ['provider', 'attestation'] as const) {
    const v = body.records?.[k]
    if (v !== undefined && (typeof v !== 'string' || !/^[a-z2-7]{13}$/.test(v))) throw bad(`records.${k} is not a record key`)
    if (v) records[k] = v
  }
  return { file, signer, encryption: { scheme, secretKey, publicKey }, records }
}
