/**
 * The exchange's P-256 keys, each in an environment variable (a private JWK)
 * or a key file created on first start with mode 0600 and refused when others
 * can read it:
 *  - the settlement signing key (`COCORE_EXCHANGE_SIGNING_KEY`): its public
 *    half is published in the exchange's `exchangeAttestation` (and may be
 *    added to its DID document as `#exchange-signing-key`); settlements are
 *    signed with it;
 *  - the brokerage key (`COCORE_BROKERAGE_SIGNING_KEY`), published in the
 *    brokerage's DID document: dispatch countersignatures (brokerage.ts).
 */
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { dirname } from 'node:path'
import { jwkFingerprint } from '../../appview/verify/settlement.ts'
import { P256Signer } from '../../src/crypto/p256.ts'

export class SigningKeyError extends Error {
  override name = 'SigningKeyError'
}

export interface SigningKey {
  signer: P256Signer
  /** The public JWK: kty, crv, x, y. */
  publicJwk: { kty: string; crv: string; x: string; y: string }
  /** base64url(sha256(canonical JSON of the public JWK)), as the network computes it. */
  fingerprint: string
}

function fromJwk(jwk: Record<string, string>, where: string): SigningKey {
  if (jwk.kty !== 'EC' || jwk.crv !== 'P-256' || !jwk.d) throw new SigningKeyError(`${where}: not a P-256 private JWK`)
  const signer = P256Signer.fromJwk(jwk)
  const pub = signer.publicKey.export({ format: 'jwk' }) as Record<string, string>
  const publicJwk = { kty: 'EC', crv: 'P-256', x: pub.x!, y: pub.y! }
  return { signer, publicJwk, fingerprint: jwkFingerprint(publicJwk) }
}

export function loadSigningKey(fromEnv: string | undefined, file: string, envName = 'COCORE_EXCHANGE_SIGNING_KEY'): SigningKey {
  if (fromEnv) {
    try {
      return fromJwk(JSON.parse(fromEnv) as Record<string, string>, envName)
    } catch (err) {
      if (err instanceof SigningKeyError) throw err
      throw new SigningKeyError(`${envName} is not a JSON private JWK`)
    }
  }
  if (!existsSync(file)) {
    mkdirSync(dirname(file), { recursive: true, mode: 0o700 })
    const jwk = P256Signer.generate().privateKey.export({ format: 'jwk' })
    writeFileSync(file, JSON.stringify(jwk) + '\n', { mode: 0o600, flag: 'wx' })
  }
  const mode = statSync(file).mode & 0o777
  if (mode & 0o077) throw new SigningKeyError(`signing key file ${file} is readable by others (mode ${mode.toString(8).padStart(4, '0')}); run: chmod 600 ${file}`)
  return fromJwk(JSON.parse(readFileSync(file, 'utf8')) as Record<string, string>, file)
}
