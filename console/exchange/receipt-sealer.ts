/**
 * For callers that send plaintext (the OpenAI-compatible API, and dispatch
 * without `sealed`): the prompt is sealed here, on receipt, to each provider
 * tried, and reply chunks are opened with the reply channel of the machine
 * that answered (the box key computed when sealing; no second X25519). The
 * plaintext and the keys live in this object only, for one request, and are
 * zeroed by `wipe()`.
 */
import { sealPrompt, type ReplyChannel } from '../../src/crypto/seal.ts'
import type { Envelope } from './exchange.ts'
import { ExchangeError } from './exchange.ts'
import { machineId, type ConnectedProvider } from './gateway.ts'

export class ReceiptSealer {
  private readonly plaintext: Uint8Array
  /** The reply channel per machine sealed to, and its ephemeral secret (to wipe). */
  private readonly sealedTo = new Map<string, { reply: ReplyChannel; secret: Uint8Array }>()
  private readonly decoder = new TextDecoder()

  constructor(plaintext: Uint8Array) {
    this.plaintext = plaintext
  }

  seal = (p: ConnectedProvider): Envelope => {
    const s = sealPrompt(this.plaintext, p.encryptionPubKey)
    this.sealedTo.set(p.machine, { reply: s.reply, secret: s.ephemeralSecretKey })
    return { ciphertext: s.sealed, requesterPubKey: s.ephemeralPublicKey }
  }

  /** A reply chunk from the machine that answered, as text. */
  open(provider: { did: string; key: string }, ciphertext: string): string {
    const bytes = this.sealedTo.get(machineId(provider.did, provider.key))?.reply.open(ciphertext)
    if (!bytes) throw new ExchangeError('provider_failed', 502, 'a reply chunk from the provider did not decrypt')
    return this.decoder.decode(bytes, { stream: true })
  }

  wipe(): void {
    this.plaintext.fill(0)
    for (const s of this.sealedTo.values()) {
      s.secret.fill(0)
      s.reply.wipe()
    }
  }
}
