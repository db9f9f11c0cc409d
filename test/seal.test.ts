/**
 * Sealing (scheme x25519): our NaCl box is byte-compatible with tweetnacl,
 * the library the network's SDKs use, in both directions; tampering, wrong
 * keys and low-order keys are refused.
 */
import nacl from 'tweetnacl'
import { describe, expect, it } from 'vitest'
import { box, generateX25519KeyPair, NONCE_BYTES, openBox, openPrompt, openReply, ReplyChannel, sealPrompt, sealReply, SealError } from '../src/crypto/seal.ts'

const text = (s: string) => new TextEncoder().encode(s)
const b64 = (b: Uint8Array) => Buffer.from(b).toString('base64')

describe('x25519 sealing', () => {
  it('opens what tweetnacl sealed, and tweetnacl opens what we sealed', () => {
    for (const size of [0, 1, 31, 1000, 70_000]) {
      const msg = nacl.randomBytes(size)
      const ours = generateX25519KeyPair()
      const theirs = nacl.box.keyPair()
      // tweetnacl -> us
      const nonce = nacl.randomBytes(24)
      const framed = new Uint8Array([...nonce, ...nacl.box(msg, nonce, ours.publicKey, theirs.secretKey)])
      expect(openBox(framed, theirs.publicKey, ours.secretKey)).toEqual(msg)
      // us -> tweetnacl
      const mine = box(msg, theirs.publicKey, ours.secretKey)
      expect(mine.length).toBe(NONCE_BYTES + 16 + size)
      expect(nacl.box.open(mine.subarray(24), mine.subarray(0, 24), ours.publicKey, theirs.secretKey)).toEqual(msg)
    }
  })

  it('runs the prompt and reply round trip with a fresh ephemeral key per prompt', () => {
    const provider = nacl.box.keyPair()
    const providerPub = b64(provider.publicKey)
    const a = sealPrompt(text('what is 2+2?'), providerPub)
    const b = sealPrompt(text('what is 2+2?'), providerPub)
    expect(a.ephemeralPublicKey).not.toBe(b.ephemeralPublicKey)
    expect(a.sealed).not.toBe(b.sealed)
    expect(new TextDecoder().decode(openPrompt(a.sealed, a.ephemeralPublicKey, provider.secretKey)!)).toBe('what is 2+2?')
    const reply = sealReply(text('4'), a.ephemeralPublicKey, provider.secretKey)
    expect(new TextDecoder().decode(openReply(reply, providerPub, a.ephemeralSecretKey)!)).toBe('4')
    // Another request's ephemeral key cannot read it.
    expect(openReply(reply, providerPub, b.ephemeralSecretKey)).toBeNull()
  })

  it('computes the box key of a job once at each end, wire-compatible with one-shot boxes and tweetnacl', () => {
    const provider = nacl.box.keyPair()
    const providerPub = b64(provider.publicKey)
    const prompt = sealPrompt(text('hello'), providerPub)
    const atProvider = ReplyChannel.provider(prompt.ephemeralPublicKey, provider.secretKey)
    const atRequester = ReplyChannel.requester(providerPub, prompt.ephemeralSecretKey)
    // The prompt opens with the provider's channel: one key both ways.
    expect(new TextDecoder().decode(atProvider.open(prompt.sealed)!)).toBe('hello')
    for (const chunk of ['a', 'bc', 'déf']) {
      const sealed = atProvider.seal(text(chunk))
      expect(new TextDecoder().decode(atRequester.open(sealed)!)).toBe(chunk)
      expect(new TextDecoder().decode(openReply(sealed, providerPub, prompt.ephemeralSecretKey)!)).toBe(chunk)
      const raw = Buffer.from(sealed, 'base64')
      expect(nacl.box.open(raw.subarray(24), raw.subarray(0, 24), provider.publicKey, prompt.ephemeralSecretKey)).toEqual(text(chunk))
      expect(new TextDecoder().decode(atRequester.open(sealReply(text(chunk), prompt.ephemeralPublicKey, provider.secretKey))!)).toBe(chunk)
    }
    const other = ReplyChannel.requester(providerPub, sealPrompt(text('x'), providerPub).ephemeralSecretKey)
    expect(other.open(atProvider.seal(text('not yours')))).toBeNull()
    expect(atRequester.open('%%% not base64')).toBeNull()
  })

  it('refuses tampered boxes, wrong keys, short input and low-order keys', () => {
    const r = generateX25519KeyPair()
    const s = generateX25519KeyPair()
    const framed = box(text('secret'), r.publicKey, s.secretKey)
    for (const i of [0, 23, 24, 40, framed.length - 1]) {
      const t = framed.slice()
      t[i]! ^= 1
      expect(openBox(t, s.publicKey, r.secretKey), `byte ${i}`).toBeNull()
    }
    expect(openBox(framed, generateX25519KeyPair().publicKey, r.secretKey)).toBeNull()
    expect(openBox(framed.subarray(0, 39), s.publicKey, r.secretKey)).toBeNull()
    expect(() => box(text('x'), new Uint8Array(32), s.secretKey)).toThrow()
    expect(() => box(text('x'), new Uint8Array(31), s.secretKey)).toThrow(SealError)
  })
})
