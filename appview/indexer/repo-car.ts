/**
 * A repo CAR (`com.atproto.sync.getRepo`) read and verified in one pass, for
 * backfill and resync. @atproto/repo's reader (readCarWithRoot + verifyRepo)
 * builds a block map keyed by CID strings, parses them back, and re-serializes
 * every MST node: most of what a backfill cost before the index write. This
 * reads what a PDS writes, with the same checks: every block's bytes hash to
 * its CID (SHA-256), the root is a signed version 3 commit of the DID, checked
 * with the library's own signature check, and the MST under it is walked from
 * its root with every node and leaf block present, each key valid.
 *
 * It answers only for what it reads exactly as the library does; for anything
 * else (another CID form or hash, extra fields, keys out of order, a missing
 * block, a bad signature, a record that is no object...) it answers null and
 * the caller reads the CAR with the library, which then accepts or refuses it
 * as it always did.
 */
import { hash } from 'node:crypto'
import { decode } from '@atproto/lex-cbor'
import { ifCid } from '@atproto/lex-data'
import { cborToLexRecord, verifyCommitSig } from '@atproto/repo'
import { NSID_PREFIX } from '../../src/lexicon/generated/ids.ts'
import { MAX_RECORD_BYTES } from '../../src/lexicon/validate.ts'
import type { FetchedRepo } from './repo-fetch.ts'

/** A CIDv1 with a 32-byte SHA-256 digest: version, codec, hash code, digest length, digest. */
const CID_BYTES = 36
/** The library's MST key rule (isValidMstKey): `collection/rkey`, both non-empty, of these characters, at most 1024 long. */
const MST_KEY = /^[a-zA-Z0-9_~\-:.]+\/[a-zA-Z0-9_~\-:.]+$/
const MAX_MST_KEY = 1024

/** The CAR holds something this reader leaves to the library. */
class Unread extends Error {
  override name = 'Unread'
}
const UNREAD = new Unread()
function unread(): never {
  throw UNREAD
}

/** An unsigned LEB128 varint of at most 4 bytes at `at`: [value, next position]. */
function varint(buf: Uint8Array, at: number): [number, number] {
  let v = 0
  for (let i = 0; i < 4; i++) {
    if (at + i >= buf.length) unread()
    const b = buf[at + i]!
    v += (b & 0x7f) * 2 ** (7 * i)
    if (!(b & 0x80)) return [v, at + i + 1]
  }
  return unread()
}

/** The lookup key of a CID: its bytes, when it is a CIDv1 with a SHA-256 digest. */
function cidKey(value: unknown): string {
  const cid = ifCid(value)
  if (!cid || cid.version !== 1 || cid.multihash.code !== 0x12 || cid.bytes.length !== CID_BYTES) unread()
  return Buffer.from(cid.bytes.buffer, cid.bytes.byteOffset, CID_BYTES).toString('latin1')
}

const hasExactly = (obj: unknown, keys: string[]): obj is Record<string, unknown> => {
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj) || Object.getPrototypeOf(obj) !== Object.prototype) return false
  const own = Object.keys(obj)
  return own.length === keys.length && keys.every((k) => Object.hasOwn(obj, k))
}

/** Every block of the CAR, by CID key, each checked against its digest; and the single root. */
function readBlocks(car: Uint8Array): { root: string; blocks: Map<string, Uint8Array> } {
  const [headerLen, headerAt] = varint(car, 0)
  if (headerAt + headerLen > car.length) unread()
  const header = decode(car.subarray(headerAt, headerAt + headerLen))
  if (!hasExactly(header, ['version', 'roots']) || header.version !== 1 || !Array.isArray(header.roots) || header.roots.length !== 1) unread()
  const root = cidKey(header.roots[0])
  const blocks = new Map<string, Uint8Array>()
  const view = Buffer.from(car.buffer, car.byteOffset, car.byteLength)
  for (let at = headerAt + headerLen; at < car.length; ) {
    const [len, start] = varint(car, at)
    const end = start + len
    if (len < CID_BYTES || end > car.length) unread()
    // A CIDv1 of a one-byte codec with a 32-byte SHA-256 digest.
    if (car[start] !== 0x01 || car[start + 1]! & 0x80 || car[start + 2] !== 0x12 || car[start + 3] !== 0x20) unread()
    const bytes = car.subarray(start + CID_BYTES, end)
    if (!view.subarray(start + 4, start + CID_BYTES).equals(hash('sha256', bytes, 'buffer'))) unread()
    blocks.set(view.toString('latin1', start, start + CID_BYTES), bytes)
    at = end
  }
  return { root, blocks }
}

/**
 * The repo's dev.cocore records as `fetchRepo` returns them, or null when the
 * CAR is anything this reader leaves to the library (see the module comment).
 */
export async function readRepoCar(car: Uint8Array, did: string, signingKey: string): Promise<Omit<FetchedRepo, 'did'> | null> {
  try {
    const { root, blocks } = readBlocks(car)
    const block = (key: string) => blocks.get(key) ?? unread()
    const commit = decode(block(root))
    if (!hasExactly(commit, ['did', 'version', 'data', 'rev', 'prev', 'sig']) || commit.version !== 3 || commit.did !== did || typeof commit.rev !== 'string') unread()
    if (!(commit.sig instanceof Uint8Array) || (commit.prev !== null && !ifCid(commit.prev))) unread()
    const data = cidKey(commit.data)
    if (!(await verifyCommitSig(commit as never, signingKey))) unread()

    // The MST, in key order: a node's left subtree, then each entry's leaf and right subtree.
    const records: FetchedRepo['records'] = []
    const seen = new Set<string>()
    let lastKey = ''
    const walk = (nodeKey: string): void => {
      if (seen.has(nodeKey)) unread()
      seen.add(nodeKey)
      const node = decode(block(nodeKey))
      if (!hasExactly(node, ['l', 'e']) || !Array.isArray(node.e)) unread()
      if (node.l !== null) walk(cidKey(node.l))
      let prev = ''
      for (const entry of node.e as unknown[]) {
        if (!hasExactly(entry, ['p', 'k', 'v', 't'])) unread()
        const { p, k, v, t } = entry
        if (!Number.isSafeInteger(p) || (p as number) < 0 || (p as number) > prev.length || !(k instanceof Uint8Array)) unread()
        const key = prev.slice(0, p as number) + Buffer.from(k.buffer, k.byteOffset, k.byteLength).toString('latin1')
        // In order and valid (the library's rule); a leaf block present (the library's ensureLeaves).
        if (key.length > MAX_MST_KEY || !MST_KEY.test(key) || key <= lastKey) unread()
        prev = lastKey = key
        const leaf = block(cidKey(v))
        if (key.startsWith(NSID_PREFIX)) {
          const slash = key.indexOf('/')
          records.push({
            action: 'create',
            uri: `at://${did}/${key}`,
            did,
            collection: key.slice(0, slash),
            rkey: key.slice(slash + 1),
            cid: ifCid(v)!.toString(),
            // Oversize records are not decoded at all; one that is no object is left to the library (which refuses the repo).
            record: leaf.length > MAX_RECORD_BYTES ? {} : cborToLexRecord(leaf),
            size: leaf.length,
          })
        }
        if (t !== null) walk(cidKey(t))
      }
    }
    walk(data)
    return { rev: commit.rev, data: String(commit.data), records }
  } catch {
    // Unread, or anything the library's decoders threw: the library reads the CAR and decides.
    return null
  }
}
