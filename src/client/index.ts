/**
 * The TypeScript client for sealed inference, for Node and the browser (the
 * console's chat page runs this same file). The prompt is sealed here, before
 * it leaves the caller, to keys read from the AppView's signed, indexed
 * provider records, never to a key the exchange hands out; the exchange only
 * relays ciphertext, and the reply is opened here.
 *
 *   const client = new CocoreClient({ consoleUrl, appviewUrl, apiKey })
 *   for await (const e of client.chat({ model, messages })) if (e.type === 'text') write(e.text)
 *
 * Each prompt is sealed in the scheme of the key it is sealed to
 * (src/crypto/enc-scheme.ts): x25519, or p256-ecies-se for a provider whose
 * published key is a P-256 point (a Secure Enclave key); a key that makes
 * neither is not sealed to.
 *
 * Browser-safe: fetch, Web Crypto and Uint8Array only.
 */
import { encSchemeOf, sealPromptTo } from '../crypto/enc-scheme.ts'
import { SealError, type SealChannel } from '../crypto/seal.ts'
import { ids } from '../lexicon/generated/ids.ts'
import { encodeInput, inputCommitment, type ChatMessage } from '../protocol/input.ts'

export type { ChatMessage }

export interface CocoreClientOpts {
  /** The exchange's console ('' in a console page: same origin). */
  consoleUrl: string
  /** The AppView whose index the provider keys are read from. */
  appviewUrl: string
  /** A console API key with the `inference` scope; in a console page the session cookie is used instead. */
  apiKey?: string
  fetch?: typeof fetch
}

export interface ChatOptions {
  model: string
  messages: ChatMessage[]
  maxTokens?: number
  /** Highest price accepted, in minor units of `currency`. */
  priceCeiling?: { amount: number; currency: string }
  /** How many providers to seal to (the exchange fails over among them). */
  providers?: number
  targetProviderDid?: string
  signal?: AbortSignal
}

export type ChatEvent =
  | { type: 'meta'; providerDid: string; jobUri: string; authUri: string; inputCommitment: string }
  | { type: 'text'; text: string }
  | { type: 'complete'; tokensIn: number; tokensOut: number; finishReason: string; receiptUri: string | null }

export class CocoreError extends Error {
  override name = 'CocoreError'
  readonly code: string
  readonly status: number
  constructor(code: string, message: string, status = 0) {
    super(message)
    this.code = code
    this.status = status
  }
}

export interface ConnectedProviderView {
  did: string
  encryptionPubKey: string
  models: string[]
  version?: string
}

/** Path of the console's list of providers connected now (DIDs and announced keys; the keys are checked against the AppView). */
export const PROVIDERS_PATH = '/exchange/providers'

/** Server-Sent Events from a byte stream: `{ event, data }` per message. */
async function* sse(body: ReadableStream<Uint8Array>): AsyncGenerator<{ event: string; data: string }> {
  const reader = body.getReader()
  const decoder = new TextDecoder()
  let buf = ''
  try {
    for (;;) {
      const { value, done } = await reader.read()
      if (done) return
      buf += decoder.decode(value, { stream: true })
      let i: number
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, i)
        buf = buf.slice(i + 2)
        let event = 'message'
        const data: string[] = []
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) event = line.slice(6).trim()
          else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''))
        }
        if (data.length) yield { event, data: data.join('\n') }
      }
    }
  } finally {
    reader.releaseLock()
  }
}

/** Whether the provider's key makes a scheme this client seals in. */
function sealable(p: ConnectedProviderView): boolean {
  try {
    encSchemeOf(p)
    return true
  } catch (err) {
    if (err instanceof SealError) return false
    throw err
  }
}

export class CocoreClient {
  private readonly opts: CocoreClientOpts
  private readonly fetch: typeof fetch

  constructor(opts: CocoreClientOpts) {
    this.opts = opts
    this.fetch = opts.fetch ?? ((input, init) => globalThis.fetch(input, init))
  }

  private headers(json = false): Record<string, string> {
    return { ...(this.opts.apiKey ? { authorization: `Bearer ${this.opts.apiKey}` } : {}), ...(json ? { 'content-type': 'application/json' } : {}) }
  }

  /** Providers of `model` connected to the exchange now, as the exchange says. */
  async connectedProviders(model: string): Promise<ConnectedProviderView[]> {
    const res = await this.fetch(`${this.opts.consoleUrl}${PROVIDERS_PATH}?model=${encodeURIComponent(model)}`, { headers: this.headers() })
    if (!res.ok) throw new CocoreError('exchange_unavailable', `the exchange answered ${res.status} to the provider list`, res.status)
    return ((await res.json()) as { providers: ConnectedProviderView[] }).providers
  }

  /** The `encryptionPubKey`s the AppView indexed from `did`'s signed provider records. */
  async publishedKeys(did: string): Promise<Set<string>> {
    const res = await this.fetch(`${this.opts.appviewUrl}/xrpc/${ids.ComputeListProviders}?provider=${encodeURIComponent(did)}&limit=100`)
    if (!res.ok) throw new CocoreError('appview_unavailable', `the AppView answered ${res.status}`, res.status)
    const body = (await res.json()) as { providers: { repo: string; body: { encryptionPubKey?: unknown } }[] }
    // The index answers for this DID only; a row of another repo would be a broken AppView, and is ignored.
    return new Set(body.providers.filter((p) => p.repo === did).map((p) => p.body.encryptionPubKey).filter((k): k is string => typeof k === 'string'))
  }

  /** Sends a chat, sealed here to up to `providers` providers whose keys the AppView confirms; yields the reply as it comes. */
  async *chat(o: ChatOptions): AsyncGenerator<ChatEvent> {
    let candidates = await this.connectedProviders(o.model)
    if (o.targetProviderDid) candidates = candidates.filter((p) => p.did === o.targetProviderDid)
    if (candidates.length === 0) throw new CocoreError('no_providers_for_model', `no provider connected now serves "${o.model}"`)
    const checked = await Promise.all(candidates.slice(0, 8).map(async (p) => ((await this.publishedKeys(p.did)).has(p.encryptionPubKey) && sealable(p) ? p : null)))
    const chosen = checked.filter((p): p is ConnectedProviderView => p !== null).slice(0, o.providers ?? 3)
    if (chosen.length === 0) throw new CocoreError('unverified_provider_keys', 'no connected provider announces a key its published, indexed record carries (in a scheme this client seals in): nothing was sent')

    const plaintext = encodeInput(o.messages)
    /** Per machine sealed to (DID and key): the reply channel its reply opens with, and the ephemeral secret. */
    const keys = new Map<string, { reply: SealChannel; secret: Uint8Array }>()
    const envelopes = chosen.map((p) => {
      const s = sealPromptTo(plaintext, p)
      keys.set(`${p.did} ${p.encryptionPubKey}`, { reply: s.reply, secret: s.ephemeralSecretKey })
      // The request's scheme is x25519; an envelope in another names its own.
      return { providerDid: p.did, encryptionPubKey: p.encryptionPubKey, ephemeralPubKey: s.ephemeralPublicKey, ciphertext: s.sealed, ...(s.scheme !== 'x25519' ? { scheme: s.scheme } : {}) }
    })
    const input = {
      model: o.model,
      prompt: 'sealed',
      maxTokensOut: o.maxTokens ?? 1024,
      priceCeiling: o.priceCeiling ?? { amount: 1_000_000, currency: 'CC' },
      ...(o.targetProviderDid ? { targetProviderDid: o.targetProviderDid } : {}),
      sealed: { scheme: 'x25519', inputFormat: 'messages-v1', inputCommitment: inputCommitment(plaintext), envelopes },
    }
    plaintext.fill(0)
    let opener: SealChannel | undefined
    try {
      const res = await this.fetch(`${this.opts.consoleUrl}/xrpc/${ids.InferenceDispatch}`, { method: 'POST', headers: this.headers(true), body: JSON.stringify(input), signal: o.signal })
      if (!res.ok || !res.body) {
        const err = (await res.json().catch(() => ({}))) as { error?: string; message?: string }
        throw new CocoreError(err.error ?? 'dispatch_failed', err.message ?? `dispatch answered ${res.status}`, res.status)
      }
      const decoder = new TextDecoder()
      for await (const { event, data } of sse(res.body)) {
        const d = JSON.parse(data) as Record<string, unknown>
        if (event === 'meta') {
          // Reply chunks are opened with the key we sealed to, not one the stream names.
          const sealedTo = keys.get(`${String(d.providerDid)} ${String(d.encryptionPubKey)}`)
          if (!sealedTo) throw new CocoreError('unexpected_provider', `the exchange answered from ${String(d.providerDid)} with a key the prompt was not sealed to`)
          opener = sealedTo.reply
          yield { type: 'meta', providerDid: d.providerDid as string, jobUri: d.jobUri as string, authUri: d.authUri as string, inputCommitment: d.inputCommitment as string }
        } else if (event === 'chunk') {
          const bytes = opener && typeof d.ciphertext === 'string' ? opener.open(d.ciphertext) : null
          if (!bytes) throw new CocoreError('chunk_decrypt_failed', 'a reply chunk did not decrypt with the key the prompt was sealed to')
          yield { type: 'text', text: decoder.decode(bytes, { stream: true }) }
        } else if (event === 'complete') {
          yield { type: 'complete', tokensIn: d.tokensIn as number, tokensOut: d.tokensOut as number, finishReason: d.finishReason as string, receiptUri: (d.receiptUri as string | null) ?? null }
          return
        } else if (event === 'error') {
          throw new CocoreError(String(d.code), String(d.reason))
        }
      }
      throw new CocoreError('stream_ended', 'the reply stream ended before the job completed')
    } finally {
      for (const k of keys.values()) {
        k.secret.fill(0)
        k.reply.wipe()
      }
    }
  }
}
