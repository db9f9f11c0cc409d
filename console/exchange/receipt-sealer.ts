/**
 * For callers that send plaintext (the OpenAI-compatible API, and dispatch
 * without `sealed`): the prompt is sealed here, on receipt, to each provider
 * tried, in the scheme of its key (x25519, or p256-ecies-se for a P-256 key:
 * src/crypto/enc-scheme.ts), and reply chunks are opened with the reply
 * channel of the machine that answered (the key computed when sealing; no
 * second key agreement). The plaintext and the keys live in this object
 * only, for one request, and are zeroed by `wipe()`.
 *
 * Each prompt is sealed from a fresh ephemeral key used for nothing else.
 * What a seal costs besides the cipher (generating that key, and the key
 * agreement with the provider's key: a few hundred microseconds on a small
 * machine) is done ahead where it can be: when a request that sealed to a
 * provider key ends, the key pair and channel key for the next prompt to
 * that key are prepared, and later handed to one prompt only. A prepared
 * seal not used within a minute is wiped instead.
 */
import { encSchemeOf, requesterSeal, type EncKeyAnnouncement, type RequesterSeal } from '../../src/crypto/enc-scheme.ts'
import { SealError } from '../../src/crypto/seal.ts'
import type { Envelope } from './exchange.ts'
import { ExchangeError } from './exchange.ts'
import { machineId, type ConnectedProvider } from './gateway.ts'

/** An ephemeral key pair and its channel with one provider key, for one prompt. */
interface Prepared extends RequesterSeal {
  at: number
}

const PREPARED_TTL_MS = 60_000
/** Provider keys with a prepared seal at most (the least recently prepared go first). */
const PREPARED_KEYS = 64
const prepared = new Map<string, Prepared>()

const wipePrepared = (p: Prepared) => {
  p.ephemeralSecretKey.fill(0)
  p.reply.wipe()
}

/** What a provider connection announces: its key, and the scheme its record names, if any. */
const announcement = (p: ConnectedProvider): EncKeyAnnouncement => ({ encryptionPubKey: p.encryptionPubKey, encScheme: p.record?.body.encScheme })
/** Prepared seals are kept by scheme and key. */
const slot = (a: EncKeyAnnouncement) => `${encSchemeOf(a)} ${String(a.encryptionPubKey)}`

const newSeal = (a: EncKeyAnnouncement): Prepared => ({ ...requesterSeal(a), at: Date.now() })

/** The prepared seal for a provider key, taken (no other prompt gets it), or a new one. */
function takeSeal(a: EncKeyAnnouncement): Prepared {
  const now = Date.now()
  for (const [k, p] of prepared) {
    if (now - p.at < PREPARED_TTL_MS) continue
    prepared.delete(k)
    wipePrepared(p)
  }
  const key = slot(a)
  const hit = prepared.get(key)
  prepared.delete(key)
  return hit ?? newSeal(a)
}

/** Prepares the next seal to each key, once the current turn is over (off any request's path). */
function prepareSeals(announced: Iterable<EncKeyAnnouncement>): void {
  const list = [...announced]
  if (list.length === 0) return
  setImmediate(() => {
    for (const a of list) {
      let key: string
      let next: Prepared
      try {
        key = slot(a)
        if (prepared.has(key)) continue
        next = newSeal(a)
      } catch {
        // A key its scheme refuses: nothing prepared; a seal to it fails on its request's path, as before.
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
  /** The seal per machine sealed to: its reply channel and ephemeral secret (to wipe), and what the provider announced. */
  private readonly sealedTo = new Map<string, { seal: Prepared; announced: EncKeyAnnouncement }>()
  /** One per reply channel: a character split across two chunks of the answer is not joined to a tool call between them. */
  private readonly decoders = new Map<string, TextDecoder>()

  constructor(plaintext: Uint8Array) {
    this.plaintext = plaintext
  }

  /** The prompt sealed to `p`; null (the provider is skipped) when its key makes no scheme this exchange seals in. */
  seal = (p: ConnectedProvider): Envelope | null => {
    const announced = announcement(p)
    let seal: Prepared
    try {
      seal = takeSeal(announced)
    } catch (err) {
      if (err instanceof SealError) return null
      throw err
    }
    this.sealedTo.set(p.machine, { seal, announced })
    return { ciphertext: seal.reply.seal(this.plaintext), requesterPubKey: seal.ephemeralPublicKey }
  }

  /** A reply chunk from the machine that answered, as text (of its channel: the answer's, reasoning, tool calls). */
  open(provider: { did: string; key: string }, ciphertext: string, channel = 'content'): string {
    const bytes = this.sealedTo.get(machineId(provider.did, provider.key))?.seal.reply.open(ciphertext)
    if (!bytes) throw new ExchangeError('provider_failed', 502, 'a reply chunk from the provider did not decrypt')
    let decoder = this.decoders.get(channel)
    if (!decoder) this.decoders.set(channel, (decoder = new TextDecoder()))
    return decoder.decode(bytes, { stream: true })
  }

  /** Zeroes the prompt and this request's keys; then the next seals to the same providers are prepared. */
  wipe(): void {
    this.plaintext.fill(0)
    for (const s of this.sealedTo.values()) wipePrepared(s.seal)
    prepareSeals([...this.sealedTo.values()].map((s) => s.announced))
  }
}
