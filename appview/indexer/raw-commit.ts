/**
 * Someone else's #commit, told from the raw frame bytes. On a relay almost
 * every frame is a commit of other collections (posts, likes...): decoding it
 * whole, blocks and all, only to drop it was most of what ingest cost. This
 * walks the frame's two DAG-CBOR values (header, body) without building them:
 * byte strings (the blocks) are skipped by their length, and only the fields
 * the indexer uses are read (seq, repo, rev, since, prevData, each op's path).
 *
 * The walk accepts a strict subset of what the library's decoder accepts
 * (@atproto/lex-cbor's `decodeOptions`: definite lengths, minimal heads, text
 * keys, no duplicate key, tag 42 only, no undefined, NaN or infinity), and
 * reads from it exactly what that decoder would. Anything outside the subset
 * (indefinite lengths, floats, keys out of canonical order or not ASCII, a
 * string it reads that is not ASCII, nesting past MAX_DEPTH, bytes missing or
 * left over, an op that is not a map with a path of one `collection/rkey`
 * outside dev.cocore) makes it answer null, and the frame goes through the
 * library as before, which decodes, checks or refuses it as it always did.
 */
import { decodeOptions } from '@atproto/lex-cbor'
import { NSID_PREFIX } from '../../src/lexicon/generated/ids.ts'
import type { CommitFrame } from './chain.ts'

/** A #commit frame none of whose ops touches dev.cocore, with what its place in the repo's chain needs. */
export class ForeignCommit implements CommitFrame {
  readonly seq: number
  readonly repo: string
  /** Undefined when the frame's rev is not text. */
  readonly rev: string | undefined
  readonly since: string | null
  /** The tag 42 content of the frame's prevData (checked already), or null when it carries none. */
  private readonly prevDataBytes: Uint8Array | null

  constructor(seq: number, repo: string, rev: string | undefined, since: string | null, prevDataBytes: Uint8Array | null) {
    this.seq = seq
    this.repo = repo
    this.rev = rev
    this.since = since
    this.prevDataBytes = prevDataBytes
  }

  /** The decoded CID, as the library's decoder makes it; null when the frame carries none. Decoded when asked: most never are. */
  get prevData(): unknown {
    return this.prevDataBytes && decodeCidTag(this.prevDataBytes)
  }
}

const ascii = (s: string): Uint8Array => Uint8Array.from(s, (c) => c.charCodeAt(0))
/**
 * The library keeps an op when its collection starts with this (its filter
 * `dev.cocore.*` less the `.*`), a little wider than NSID_PREFIX: a path
 * starting with it is never taken as foreign here.
 */
const LIBRARY_FILTER_PREFIX = ascii(NSID_PREFIX.slice(0, -1))
const KEY = {
  op: ascii('op'),
  t: ascii('t'),
  seq: ascii('seq'),
  ops: ascii('ops'),
  rev: ascii('rev'),
  repo: ascii('repo'),
  since: ascii('since'),
  prevData: ascii('prevData'),
  path: ascii('path'),
  proto: ascii('__proto__'),
}
const COMMIT_TYPE = ascii('#commit')
/** Deeper than any #commit body nests (body > ops > op > cid). */
const MAX_DEPTH = 16
const UINT = 0
const BYTES = 2
const TEXT = 3
const ARRAY = 4
const MAP = 5
const TAG = 6

/** The decoder's own tag 42 reader: a CID it refuses is refused here too. */
const decodeCidTag = (decodeOptions.tags as unknown as ((bytes: Uint8Array) => unknown)[])[42]!
/**
 * The tag 42 content of a CIDv1 with a SHA-256 digest, of the dag-cbor or raw
 * codec (every CID a commit frame carries): 0x00, version 1, codec, hash code
 * 0x12, digest length 32, then the 32 digest bytes. Whether the decoder
 * accepts a CID depends on these prefix bytes and the length only, never on
 * the digest, so such a CID needs no decoding to be checked; any other goes
 * through the decoder's tag 42 reader.
 */
const DASL_CID_LENGTH = 37
// The shortcut stands for the decoder: it must accept what the shortcut lets through.
for (const codec of [0x71, 0x55]) decodeCidTag(Uint8Array.from([0x00, 0x01, codec, 0x12, 0x20, ...new Uint8Array(32)]))

/** The frame leaves the subset the walk reads: the library decides. */
class OutsideSubset extends Error {
  override name = 'OutsideSubset'
}
const OUTSIDE = new OutsideSubset()
function outside(): never {
  throw OUTSIDE
}

// The walk's state: one frame at a time, synchronously.
const EMPTY = new Uint8Array(0)
let buf: Uint8Array = EMPTY
/** The same bytes as a Buffer, for decoding the few strings read. */
const EMPTY_TEXT = Buffer.alloc(0)
let text: Buffer = EMPTY_TEXT
let pos = 0
let major = 0

/** Reads a data item's head: its major type into `major`, its argument returned. Minimal encodings only (strict decoding). */
function head(): number {
  if (pos >= buf.length) outside()
  const ib = buf[pos++]!
  major = ib >> 5
  const info = ib & 31
  if (info < 24) return info
  let v: number
  switch (info) {
    case 24:
      if (pos + 1 > buf.length) outside()
      v = buf[pos]!
      pos += 1
      if (v < 24) outside()
      return v
    case 25:
      if (pos + 2 > buf.length) outside()
      v = (buf[pos]! << 8) | buf[pos + 1]!
      pos += 2
      if (v < 0x100) outside()
      return v
    case 26:
      if (pos + 4 > buf.length) outside()
      v = u32(pos)
      pos += 4
      if (v < 0x10000) outside()
      return v
    case 27: {
      if (pos + 8 > buf.length) outside()
      const hi = u32(pos)
      v = hi * 0x100000000 + u32(pos + 4)
      pos += 8
      // Under 2^32 is not minimal; past 2^53 the decoder makes a BigInt (no commit frame has one).
      if (hi === 0 || v > Number.MAX_SAFE_INTEGER) outside()
      return v
    }
    default:
      // Reserved values, indefinite lengths.
      return outside()
  }
}

const u32 = (at: number): number => buf[at]! * 0x1000000 + ((buf[at + 1]! << 16) | (buf[at + 2]! << 8) | buf[at + 3]!)

/** The item whose head was just read must be of this major type. */
function want(type: number): void {
  if (major !== type) outside()
}

/** The content of a string whose head was just read: where it starts (`pos` moves past it). */
function content(n: number): number {
  if (n > buf.length - pos) outside()
  const start = pos
  pos += n
  return start
}

/** Bytes [start, start + n) are ASCII: their decoding as UTF-8 is the bytes themselves. */
function requireAscii(start: number, n: number): void {
  for (let i = start, end = start + n; i < end; i++) if (buf[i]! & 0x80) outside()
}

/** A text string whose head was just read, which must be ASCII. */
function asciiText(n: number): string {
  const start = content(n)
  requireAscii(start, n)
  return text.toString('latin1', start, pos)
}

function equals(start: number, n: number, key: Uint8Array): boolean {
  if (n !== key.length) return false
  for (let i = 0; i < n; i++) if (buf[start + i] !== key[i]) return false
  return true
}

/** Checks a CID (tag 42 and its byte string), after the tag's head; returns where its bytes start. */
function checkCid(tag: number): number {
  if (tag !== 42) outside()
  const n = head()
  want(BYTES)
  const start = content(n)
  if (n === DASL_CID_LENGTH && buf[start] === 0x00 && buf[start + 1] === 0x01 && (buf[start + 2] === 0x71 || buf[start + 2] === 0x55) && buf[start + 3] === 0x12 && buf[start + 4] === 0x20) {
    return start
  }
  decodeCid(start)
  return start
}

/** The CID whose tag 42 content spans [start, pos), as the library's decoder makes it. */
function decodeCid(start: number): unknown {
  try {
    return decodeCidTag(buf.slice(start, pos))
  } catch {
    return outside()
  }
}

/** Skips one data item of any kind, checking it as the decoder would. */
function skip(depth: number): void {
  if (pos >= buf.length) outside()
  const ib = buf[pos]!
  // false, true, null; every other simple value and float goes to the library.
  if (ib >= 0xf4 && ib <= 0xf6) {
    pos++
    return
  }
  if (ib >= 0xe0) outside()
  const n = head()
  switch (major) {
    case BYTES:
    case TEXT:
      content(n)
      return
    case ARRAY:
      if (depth >= MAX_DEPTH) outside()
      for (let i = 0; i < n; i++) skip(depth + 1)
      return
    case MAP:
      if (depth >= MAX_DEPTH) outside()
      return walkMap(n, depth + 1, null)
    case TAG:
      checkCid(n)
      return
    default:
    // Integers: the head is all there is.
  }
}

/** Reads the value of the key at [start, start + n) and returns true, or returns false to have it skipped. */
type Visit = (start: number, n: number) => boolean

/**
 * Walks a map's entries, handing each key to `visit` or skipping its value.
 * Keys must be ASCII text in strictly increasing canonical order (length,
 * then bytes), as DAG-CBOR writes them: no duplicate can pass, and
 * `__proto__`, which the decoder would not make a plain key, is refused.
 */
function walkMap(entries: number, depth: number, visit: Visit | null): void {
  let prevStart = 0
  let prevLen = -1
  for (let i = 0; i < entries; i++) {
    const n = head()
    want(TEXT)
    const start = content(n)
    requireAscii(start, n)
    if (n < prevLen || (n === prevLen && compareBytes(prevStart, start, n) >= 0)) outside()
    if (equals(start, n, KEY.proto)) outside()
    prevStart = start
    prevLen = n
    if (visit === null || !visit(start, n)) skip(depth)
  }
}

function compareBytes(a: number, b: number, n: number): number {
  for (let i = 0; i < n; i++) {
    const d = buf[a + i]! - buf[b + i]!
    if (d !== 0) return d
  }
  return 0
}

// What the walk read of the frame so far.
let headerOp = false
let headerT = false
let seq = -1
let repo: string | undefined
let rev: string | undefined
let since: string | null = null
let prevData: Uint8Array | null = null
let sawOps = false
let opHasPath = false

const visitHeader: Visit = (start, n) => {
  if (equals(start, n, KEY.op)) {
    if (head() !== 1) outside()
    want(UINT)
    headerOp = true
  } else if (equals(start, n, KEY.t)) {
    const len = head()
    want(TEXT)
    if (!equals(content(len), len, COMMIT_TYPE)) outside()
    headerT = true
  } else {
    outside()
  }
  return true
}

/** A value that may be text: the string (ASCII only), or undefined, the value skipped, when it is not text. */
function textOrSkip(): string | undefined {
  const at = pos
  const n = head()
  if (major === TEXT) return asciiText(n)
  pos = at
  skip(1)
  return undefined
}

/**
 * An op's path, which must be one the library splits into one collection and
 * one rkey (a single '/'), outside its dev.cocore filter, in ASCII.
 */
const visitOp: Visit = (start, n) => {
  if (!equals(start, n, KEY.path)) return false
  const len = head()
  want(TEXT)
  const at = content(len)
  requireAscii(at, len)
  let slashes = 0
  for (let i = at; i < pos; i++) if (buf[i] === 0x2f) slashes++
  if (slashes !== 1) outside()
  if (len >= LIBRARY_FILTER_PREFIX.length && equals(at, LIBRARY_FILTER_PREFIX.length, LIBRARY_FILTER_PREFIX)) outside()
  opHasPath = true
  return true
}

const visitBody: Visit = (start, n) => {
  if (equals(start, n, KEY.seq)) {
    const v = head()
    want(UINT)
    seq = v
  } else if (equals(start, n, KEY.repo)) {
    const len = head()
    want(TEXT)
    repo = asciiText(len)
  } else if (equals(start, n, KEY.rev)) {
    rev = textOrSkip()
  } else if (equals(start, n, KEY.since)) {
    since = textOrSkip() ?? null
  } else if (equals(start, n, KEY.prevData)) {
    const at = pos
    const tag = head()
    if (major === TAG) prevData = buf.slice(checkCid(tag), pos)
    else {
      pos = at
      skip(1)
    }
  } else if (equals(start, n, KEY.ops)) {
    const count = head()
    want(ARRAY)
    for (let i = 0; i < count; i++) {
      const entries = head()
      // An op that is no map, or has no path, is not foreign by isForeignCommit's rule: the library decides.
      want(MAP)
      opHasPath = false
      walkMap(entries, 3, visitOp)
      if (!opHasPath) outside()
    }
    sawOps = true
  } else {
    return false
  }
  return true
}

/**
 * The frame as someone else's #commit, or null when it is anything else:
 * another frame type, a commit touching (or claiming) dev.cocore, or bytes
 * the walk does not read exactly as the library's decoder would.
 */
export function readForeignCommit(frame: Uint8Array): ForeignCommit | null {
  // A Buffer's slice() is a view: read through a plain Uint8Array, as the decoder does, so CIDs get their own bytes.
  buf = Buffer.isBuffer(frame) ? new Uint8Array(frame.buffer, frame.byteOffset, frame.byteLength) : frame
  text = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength)
  pos = 0
  headerOp = headerT = sawOps = false
  seq = -1
  repo = rev = undefined
  since = prevData = null
  try {
    let n = head()
    if (major !== MAP) return null
    walkMap(n, 1, visitHeader)
    if (!headerOp || !headerT) return null
    n = head()
    if (major !== MAP) return null
    walkMap(n, 1, visitBody)
    // Exactly two values: anything after the body breaks the stream in the library.
    if (pos !== buf.length || seq < 0 || repo === undefined || !sawOps) return null
    return new ForeignCommit(seq, repo, rev, since, prevData)
  } catch (err) {
    if (err === OUTSIDE) return null
    throw err
  } finally {
    buf = EMPTY
    text = EMPTY_TEXT
    prevData = null
  }
}
