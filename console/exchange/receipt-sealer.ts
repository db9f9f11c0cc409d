/**
 * For callers that send plaintext (the OpenAI-compatible API, and dispatch
 * without `sealed`): the prompt is sealed here, on receipt, to each provider
 * tried, and reply chunks are opened with the matching ephemeral key. The
 * plaintext and the keys live in this object only, for one request, and are
 * zeroed by `wipe()`.
 */
import { ReplyChannel, sealPrompt } from '../../src/crypto/seal.ts'
import type { Envelope } from './exchange.ts'
import { ExchangeError } from './exchange.ts'
import { machineId, type ConnectedProvider } from './gateway.ts'

export class ReceiptSealer {
  private readonly plaintext: Uint8Array
  /** Ephemeral secret per machine sealed to. */
  private readonly secrets = new Map<string, Uint8Array>()
  /** The reply channel of the machine that answered, computed at its first chunk. */
  private channel: { machine: string; reply: ReplyChannel } | null = null
  private readonly decoder = new TextDecoder()

  constructor(plaintext: Uint8Array) {
    this.plaintext = plaintext
  }

  seal = (p: ConnectedProvider): Envelope => {
    const s = sealPrompt(this.plaintext, p.encryptionPubKey)
    this.secrets.set(p.machine, s.ephemeralSecretKey)
    return { ciphertext: s.sealed, requesterPubKey: s.ephemeralPublicKey }
  }

  /** A reply chunk from the provider that answered, as text. */
  open(provider: { did: string; key: string }, ciphertext: string): string {
    const machine = machineId(provider.did, provider.key)
    if (this.channel?.machine !== machine) {
      const secret = this.secrets.get(machine)
      this.channel = secret ? { machine, reply: ReplyChannel.requester(provider.key, secret) } : null
    }
    const bytes = this.channel?.reply.open(ciphertext)
    if (!bytes) throw new ExchangeError('provider_failed', 502, 'a reply chunk from the provider did not decrypt')
    return this.decoder.decode(bytes, { stream: true })
  }

  wipe(): void {
    this.plaintext.fill(0)
    for (const s of this.secrets.values()) s.fill(0)
    this.channel?.reply.wipe()
  }
}
