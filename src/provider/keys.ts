/**
 * The provider's key file: its P-256 attestation key (signs attestations,
 * receipts and challenge answers), its X25519 key (prompts are sealed to it),
 * and the rkeys of the records it published, so a restart updates the same
 * provider record instead of adding another machine.
 *
 * JSON, created with mode 0600. Anyone who can read it can open prompts sealed
 * to this machine and sign receipts in its name, so a file readable by group
 * or others is refused rather than used.
 */
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { dirname } from 'node:path'
import { P256Signer } from '../crypto/p256.ts'
import { x25519PublicKey, type X25519KeyPair } from '../crypto/seal.ts'

const VERSION = 1

export class KeyFileError extends Error {
  override name = 'KeyFileError'
}

/** rkeys of the records this machine published. */
export interface RecordKeys {
  provider?: string
  attestation?: string
}

export interface ProviderKeys {
  file: string
  signer: P256Signer
  encryption: X25519KeyPair
  records: RecordKeys
}

interface KeyFileBody {
  v: number
  attestationKey: Record<string, string>
  encryptionSecretKey: string
  records: RecordKeys
}

/** The keys in `file`, creating it with fresh keys if it does not exist. */
export function loadOrCreateKeys(file: string): ProviderKeys {
  if (!existsSync(file)) {
    mkdirSync(dirname(file), { recursive: true, mode: 0o700 })
    const signer = P256Signer.generate()
    const secret = crypto.getRandomValues(new Uint8Array(32))
    const body: KeyFileBody = {
      v: VERSION,
      attestationKey: signer.privateKey.export({ format: 'jwk' }) as Record<string, string>,
      encryptionSecretKey: Buffer.from(secret).toString('base64'),
      records: {},
    }
    // 'wx': two agents started at once on one file do not both create it.
    writeFileSync(file, JSON.stringify(body, null, 2) + '\n', { mode: 0o600, flag: 'wx' })
  }
  const mode = statSync(file).mode & 0o777
  if (mode & 0o077) throw new KeyFileError(`key file ${file} is readable by others (mode ${mode.toString(8).padStart(4, '0')}); run: chmod 600 ${file}`)
  return parse(file, readFileSync(file, 'utf8'))
}

/** Records the rkeys of published records in the key file (replaced atomically, still 0600). */
export function saveRecordKeys(keys: ProviderKeys, records: RecordKeys): void {
  const body: KeyFileBody = {
    v: VERSION,
    attestationKey: keys.signer.privateKey.export({ format: 'jwk' }) as Record<string, string>,
    encryptionSecretKey: Buffer.from(keys.encryption.secretKey).toString('base64'),
    records,
  }
  const tmp = `${keys.file}.tmp`
  rmSync(tmp, { force: true })
  writeFileSync(tmp, JSON.stringify(body, null, 2) + '\n', { mode: 0o600, flag: 'wx' })
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
  const secretKey = typeof body.encryptionSecretKey === 'string' ? new Uint8Array(Buffer.from(body.encryptionSecretKey, 'base64')) : null
  if (secretKey?.length !== 32) throw bad('encryptionSecretKey is not 32 bytes of base64')
  const records: RecordKeys = {}
  for (const k of ['provider', 'attestation'] as const) {
    const v = body.records?.[k]
    if (v !== undefined && (typeof v !== 'string' || !/^[a-z2-7]{13}$/.test(v))) throw bad(`records.${k} is not a record key`)
    if (v) records[k] = v
  }
  return { file, signer, encryption: { secretKey, publicKey: x25519PublicKey(secretKey) }, records }
}
