/**
 * The exchange as a brokerage (the network's ADR 0004): an authority with its
 * own DID and P-256 key that countersigns, at dispatch, each job it sends to a
 * machine that answered its live attestation challenge on that connection.
 * The countersignature rides on `inference_request` (the network's
 * `brokerage_countersignature`), the provider copies it onto its receipt, and
 * a verifier that trusts this DID calls the receipt confidential. Its witness
 * (machine and nonce) goes into the dispatch book, so settlement can tell the
 * countersignature signed for a job from any other.
 *
 * What it witnesses, and no more: "this brokerage sent this job, for this
 * requester, to the machine that answered its challenge on the serving
 * connection with the key of this attestation". Not that the key is hardware
 * resident: see docs/compatibility.md (brokerage countersignatures).
 *
 * The key is published in the DID's document: for the default DID, the
 * did:web of the console's public URL, this console serves it at
 * `/.well-known/did.json`.
 */
import { Hono } from 'hono'
import type { DidDocument } from '@atproto/identity'
import type { ConsoleIndex } from '../../appview/index.ts'
import { didWebOf } from '../../src/config.ts'
import { brokerageDidDocument, signWitness, toWireCountersignature, type BrokerageCountersignatureWire } from '../../src/crypto/brokerage.ts'
import { consoleLogger as log } from '../../src/logger.ts'
import type { ConnectedProvider } from './gateway.ts'
import type { SigningKey } from './signing-key.ts'

/** What the book keeps of a countersignature (the signature itself is on the receipt, if anywhere). */
export interface Witness {
  authority: string
  machineId: string
  attestation: string
  nonce: string
}

/**
 * A machine's jobs are countersigned only while its attestation has longer
 * than this to run. Providers publish the next attestation an hour before the
 * current one expires (the network's agent at 23 h of 24, ours likewise) and
 * their receipts cite it at once, perhaps before it is indexed here: from a
 * little before then until the new one is indexed, its jobs go without, never
 * with a countersignature naming the attestation their receipt no longer cites.
 */
export const RENEWAL_MARGIN_MS = 65 * 60_000

export interface BrokerageOpts {
  did: string
  key: SigningKey
  /** The machine's current attestation (ConsoleIndex.attestationFor). */
  attestationFor: ConsoleIndex['attestationFor']
}

const rkeyOf = (uri: string) => uri.slice(uri.lastIndexOf('/') + 1)

export class Brokerage {
  readonly did: string
  readonly key: SigningKey
  /** The DID document that publishes the key. */
  readonly document: DidDocument
  private readonly attestationFor: BrokerageOpts['attestationFor']

  constructor(opts: BrokerageOpts) {
    this.did = opts.did
    this.key = opts.key
    this.attestationFor = opts.attestationFor
    this.document = brokerageDidDocument(opts.did, opts.key.publicJwk) as DidDocument
  }

  /**
   * The countersignature for a job sent to `p`, and its witness for the book;
   * null when the machine has not answered its challenge on this connection,
   * or has no indexed attestation with the key that answered it (in force past
   * the renewal margin): its receipt could not cite what would be signed.
   */
  countersign(p: ConnectedProvider, job: { uri: string; cid: string; requester: string }): { countersignature: BrokerageCountersignatureWire; witness: Witness } | null {
    if (!p.attested || !p.attestationKey) return null
    const attestation = this.attestationFor(p.did, p.attestationKey)
    const expiresAt = Date.parse(String(attestation?.body.expiresAt))
    if (!attestation || !(expiresAt - Date.now() > RENEWAL_MARGIN_MS)) return null
    // The provider record's rkey: the network's machine id (its agents send it as `machine_id`), here as verified.
    const machineId = rkeyOf(p.record.uri)
    const c = signWitness(this.key.signer, { authority: this.did, attestation: attestation.uri, jobCid: job.cid, jobUri: job.uri, machineId, requester: job.requester })
    return { countersignature: toWireCountersignature(c), witness: { authority: this.did, machineId, attestation: attestation.uri, nonce: c.nonce } }
  }

  /** `GET /.well-known/did.json`, when the DID is the did:web of the console's public URL; otherwise its document is published elsewhere. */
  routes(consoleUrl: string): Hono {
    const app = new Hono()
    if (this.did !== didWebOf(consoleUrl)) {
      log.info('brokerage DID is not served here: publish this key in its DID document', { did: this.did, publicKeyJwk: this.key.publicJwk })
      return app
    }
    app.get('/.well-known/did.json', (c) => c.json(this.document))
    return app
  }
}
