/**
 * For callers that send plaintext (the OpenAI-compatible API, and dispatch
 * without `sealed`): the prompt is sealed here, on receipt, to each provider
 * tried, and reply chunks are opened with the reply channel of the machine
 * that answered (the box key computed when sealing; no second X25519). The
 * plaintext and the keys live in this object only, for one request, and are
 * zeroed by `wipe()`.
 *
 * Each prompt is sealed from a fresh ephemeral key used for nothing else.
 * What a seal costs besides the cipher (generating that key, and the X25519
 * with the provider's key: a few hundred microseconds on a small machine) is
 * done ahead where it can be: when a request that sealed to a provider key
 * ends, the key pair and box key for the next prompt to that key are
 * prepared, and later handed to one prompt only. A prepared seal not used
 * within a minute is wiped instead.
 */
import { generateX25519KeyPair, ReplyChannel, type X25519KeyPair } from '../../src/crypto/seal.ts'
import type { Envelope } from './exchange.ts'
import { ExchangeError } from './exchange.ts'
import { machineId, type ConnectedProvider } from './gateway.ts'

/** An ephemeral key pair and its box key with one provider key, for one prompt. */
interface Prepared {
  eph: X25519KeyPair
  reply: ReplyChannel
  at: number
}

const PREPARED_TTL_MS = 60_000
/** Provider keys with a prepared seal at most (the least recently prepared go first). */
const PREPARED_KEYS = 64
const prepared = new Map<string, Prepared>()

const wipePrepared = (p: Prepared) => {
  p.eph.secretKey.fill(0)
  p.reply.wipe()
}

const newSeal = (providerEncryptionPubKey: string): Prepared => {
  const eph = generateX25519KeyPair()
  return { eph, reply: ReplyChannel.requester(providerEncryptionPubKey, eph.secretKey), at: Date.now() }
}

/** The prepared seal for a provider key, taken (no other prompt gets it), or a new one. */
function takeSeal(providerEncryptionPubKey: string): Prepared {
  const now = Date.now()
  for (const [k, p] of prepared) {
    if (now - p.at < PREPARED_TTL_MS) continue
    prepared.delete(k)
    wipePrepared(p)
  }
  const hit = prepared.get(providerEncryptionPubKey)
  prepared.delete(providerEncryptionPubKey)
  return hit ?? newSeal(providerEncryptionPubKey)
}

/** Prepares the next seal to each key, once the current turn is over (off any request's path). */
function prepareSeals(providerEncryptionPubKeys: Iterable<string>): void {
  const keys = [...providerEncryptionPubKeys]
  if (keys.length === 0) return
  setImmediate(() => {
    for (const key of keys) {
      if (prepared.has(key)) continue
      let next: Prepared
      try {
        next = newSeal(key)
      } catch {
        // A key X25519 refuses: nothing prepared; a seal to it fails on its request's path, as before.
        continue
      }
      prepared.set(key, next)
      if (prepared.size > PREPARED_KEYS) {
        const [oldest, p] = prepared.entries().next().value!
        prepared.delete(oldest)
        wipePrepared(p)
      }
    }
  })
}

export class ReceiptSealer {
  private readonly plaintext: Uint8Array
  /** The reply channel per machine sealed to, its ephemeral secret (to wipe), and the provider key. */
  private readonly sealedTo = new Map<string, { reply: ReplyChannel; secret: Uint8Array; providerKey: string }>()
  private readonly decoder = new TextDecoder()

  constructor(plaintext: Uint8Array) {
    this.plaintext = plaintext
  }

  seal = (p: ConnectedProvider): Envelope => {
    const { eph, reply } = takeSeal(p.encryptionPubKey)
    this.sealedTo.set(p.machine, { reply, secret: eph.secretKey, providerKey: p.encryptionPubKey })
    return { ciphertext: reply.seal(this.plaintext), requesterPubKey: Buffer.from(eph.publicKey).toString('base64') }
  }

  /** A reply chunk from the machine that answered, as text. */
  open(provider: { did: string; key: string }, ciphertext: string): string {
    const bytes = this.sealedTo.get(machineId(provider.did, provider.key))?.reply.open(ciphertext)
    if (!bytes) throw new ExchangeError('provider_failed', 502, 'a reply chunk from the provider did not decrypt')
    return this.decoder.decode(bytes, { stream: true })
  }

  /** Zeroes the prompt and this request's keys; then the next seals to the same providers are prepared. */
  wipe(): void {
    this.plaintext.fill(0)
    for (const s of this.sealedTo.values()) {
      s.secret.fill(0)
      s.reply.wipe()
    }
    prepareSeals(new Set([...this.sealedTo.values()].map((s) => s.providerKey)))
  }
}
