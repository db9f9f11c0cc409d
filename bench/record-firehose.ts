/**
 * Records a realistic firehose for the ingest benchmark: boots a LocalNetwork
 * (real PLC + PDS, in a private TMPDIR), creates accounts, writes a stream of
 * commits of which about 1 in 100 touches `dev.cocore.*`, then reads the PDS's
 * `subscribeRepos` from cursor 0 with a raw `ws` client and keeps every binary
 * frame exactly as received.
 *
 * On disk (`data/bench/`, git-ignored):
 *  - `firehose.frames`: frames, each as a 4-byte big-endian length + the bytes;
 *  - `firehose.json`: metadata, including the DID documents and handles of the
 *    accounts, so a cached recording can be replayed without the (in-memory)
 *    PLC directory that produced it.
 */
import { mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { TID } from '@atproto/common-web'
import { decodeAll } from '@atproto/lex-cbor'
import WebSocket from 'ws'
import type { LocalNetwork, LocalAccount } from '../src/dev/network.ts'
import { friend, profile } from '../src/dev/records.ts'

import { NSID_PREFIX } from '../src/lexicon/generated/ids.ts'
export const COCORE_PREFIX = NSID_PREFIX
export const DEFAULT_DIR = 'data/bench'
export const DEFAULT_EVENTS = 20_000
const FORMAT = 1

export interface WriterStats {
  /** Write calls made, one commit each. */
  commits: number
  ops: number
  /** Commits with more than one op. */
  multiOpCommits: number
  /** Commits with at least one dev.cocore.* op. */
  cocoreCommits: number
  cocoreOps: number
  /** Valid dev.cocore records in the repos at the end (creates minus deletes). */
  cocoreRecords: number
}

export interface RecordingMeta {
  format: number
  createdAt: string
  frames: number
  bytes: number
  firstSeq: number
  lastSeq: number
  accounts: { did: string; handle: string }[]
  /** DID -> DID document, as the PLC directory served it. */
  didDocs: Record<string, unknown>
  writer: WriterStats
  recordSeconds: number
}

export interface Recording {
  /** Frames exactly as received. */
  frames: Buffer[]
  /** seq of each frame (-1 for a frame without one). */
  seqs: number[]
  meta: RecordingMeta
}

export interface RecordOpts {
  /** Target number of frames (approximate: account creation adds a few). */
  events?: number
  accounts?: number
  /** One commit in `cocoreEvery` touches dev.cocore.*. */
  cocoreEvery?: number
  /** Concurrent writers (each owns accounts, so repo writes never contend). */
  concurrency?: number
  dir?: string
  /** Log progress to stderr. */
  progress?: boolean
}

export interface RecordResult {
  recording: Recording
  /** The network the recording came from, still running (its PLC resolves the DIDs). */
  network: LocalNetwork
  /** Closes the network and removes its TMPDIR. */
  close: () => Promise<void>
}

export const framesPath = (dir = DEFAULT_DIR) => join(dir, 'firehose.frames')
export const metaPath = (dir = DEFAULT_DIR) => join(dir, 'firehose.json')

/** The seq in a frame's body (-1 when there is none, e.g. #info). Decodes header + body. */
export function frameSeq(frame: Uint8Array): number {
  const [, body] = decodeAll(frame) as Iterable<unknown> as unknown[]
  const seq = (body as { seq?: unknown } | undefined)?.seq
  return typeof seq === 'number' ? seq : -1
}

export function saveRecording(rec: Recording, dir = DEFAULT_DIR): void {
  mkdirSync(dir, { recursive: true })
  const total = rec.frames.reduce((n, f) => n + 4 + f.length, 0)
  const out = Buffer.allocUnsafe(total)
  let off = 0
  for (const f of rec.frames) {
    out.writeUInt32BE(f.length, off)
    f.copy(out, off + 4)
    off += 4 + f.length
  }
  const fp = framesPath(dir)
  writeFileSync(fp + '.tmp', out)
  renameSync(fp + '.tmp', fp)
  writeFileSync(metaPath(dir) + '.tmp', JSON.stringify(rec.meta, null, 1))
  renameSync(metaPath(dir) + '.tmp', metaPath(dir))
}

/** A saved recording, or null when there is none (or it is of another format). */
export function loadRecording(dir = DEFAULT_DIR): Recording | null {
  if (!existsSync(framesPath(dir)) || !existsSync(metaPath(dir))) return null
  const meta = JSON.parse(readFileSync(metaPath(dir), 'utf8')) as RecordingMeta
  if (meta.format !== FORMAT) return null
  const buf = readFileSync(framesPath(dir))
  const frames: Buffer[] = []
  for (let off = 0; off < buf.length; ) {
    const len = buf.readUInt32BE(off)
    frames.push(buf.subarray(off + 4, off + 4 + len))
    off += 4 + len
  }
  if (frames.length !== meta.frames) return null
  return { frames, seqs: frames.map(frameSeq), meta }
}

const now = () => new Date().toISOString()

/** A small deterministic PRNG (mulberry32), so recordings have the same mix. */
function rng(seed: number) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

const WORDS = 'the a firehose relay repo commit record of to and in is it that on for with as at by from this be or an are was'.split(' ')

interface Ref {
  uri: string
  cid: string
}

/** Per-account state of the writer. */
interface Writer {
  acct: LocalAccount
  posts: Ref[]
  likes: Ref[]
  friends: Ref[]
  hasProfile: boolean
}

type Write =
  | { $type: 'com.atproto.repo.applyWrites#create'; collection: string; rkey: string; value: Record<string, unknown> }
  | { $type: 'com.atproto.repo.applyWrites#delete'; collection: string; rkey: string }

const rkeyOf = (uri: string) => uri.slice(uri.lastIndexOf('/') + 1)
const collOf = (uri: string) => uri.split('/')[3]!

/**
 * Boots a LocalNetwork, writes the commits and records the firehose. The
 * network is left running (the caller closes it with `close`).
 */
export async function recordFirehose(opts: RecordOpts = {}): Promise<RecordResult> {
  const target = opts.events ?? DEFAULT_EVENTS
  const nAccounts = opts.accounts ?? 20
  const cocoreEvery = opts.cocoreEvery ?? 100
  const dir = opts.dir ?? DEFAULT_DIR
  const say = (msg: string) => opts.progress && process.stderr.write(`[record] ${msg}\n`)
  const started = performance.now()

  // The PDS (and dev-env) put their files under os.tmpdir(): give them a private TMPDIR.
  const prevTmp = process.env.TMPDIR
  const tmp = mkdtempSync(join(tmpdir(), 'cocore-bench-'))
  process.env.TMPDIR = tmp
  let network: LocalNetwork | null = null
  const close = async () => {
    await network?.close()
    network = null
    if (prevTmp === undefined) delete process.env.TMPDIR
    else process.env.TMPDIR = prevTmp
    rmSync(tmp, { recursive: true, force: true })
  }
  try {
    // Loaded here, not at the top: a replay of a saved recording never loads dev-env (and its PDS).
    const { LocalNetwork } = await import('../src/dev/network.ts')
    network = await LocalNetwork.create()
    const net = network
    const writers: Writer[] = []
    for (let i = 0; i < nAccounts; i++) {
      const acct = await net.createAccount(`bench${i}.test`)
      writers.push({ acct, posts: [], likes: [], friends: [], hasProfile: false })
    }
    say(`${nAccounts} accounts created; writing ~${target} commits`)

    const stats: WriterStats = { commits: 0, ops: 0, multiOpCommits: 0, cocoreCommits: 0, cocoreOps: 0, cocoreRecords: 0 }
    const cocoreLive = new Set<string>()
    const rand = rng(42)
    const pick = <T>(xs: T[]): T | undefined => xs[Math.floor(rand() * xs.length)]
    const text = () => Array.from({ length: 5 + Math.floor(rand() * 25) }, () => pick(WORDS)).join(' ')
    const someone = (self: string) => {
      for (;;) {
        const w = pick(writers)!
        if (w.acct.did !== self) return w.acct.did
      }
    }

    // Account creation puts a few frames (#identity, #account, #commit, #sync) per account on the stream.
    const accountFrames = (await net.net.pds.ctx.sequencer.curr()) ?? 0
    const totalCommits = Math.max(0, target - accountFrames)
    let next = 0
    let lastLog = performance.now()

    const nonCocoreWrite = (w: Writer): Write => {
      const did = w.acct.did
      const r = rand()
      const create = (collection: string, value: Record<string, unknown>): Write => ({ $type: 'com.atproto.repo.applyWrites#create', collection, rkey: TID.nextStr(), value: { $type: collection, ...value } })
      if (r < 0.45) {
        const post = pick(pick(writers)!.posts)
        if (post) return create('app.bsky.feed.like', { subject: post, createdAt: now() })
      } else if (r < 0.55) {
        const post = pick(pick(writers)!.posts)
        if (post) return create('app.bsky.feed.repost', { subject: post, createdAt: now() })
      } else if (r < 0.7) {
        return create('app.bsky.graph.follow', { subject: someone(did), createdAt: now() })
      } else if (r < 0.8) {
        const victim = rand() < 0.5 ? w.likes.pop() : w.posts.shift()
        if (victim) return { $type: 'com.atproto.repo.applyWrites#delete', collection: collOf(victim.uri), rkey: rkeyOf(victim.uri) }
      }
      return create('app.bsky.feed.post', { text: text(), langs: ['en'], createdAt: now() })
    }

    const cocoreWrites = (w: Writer): Write[] => {
      const did = w.acct.did
      const create = (value: Record<string, unknown>, rkey = TID.nextStr()): Write => ({ $type: 'com.atproto.repo.applyWrites#create', collection: value.$type as string, rkey, value })
      if (!w.hasProfile) {
        w.hasProfile = true
        return [create(profile(`Bench ${did.slice(-6)}`), 'self')]
      }
      const r = rand()
      if (r < 0.05 && w.friends.length > 0) {
        const victim = w.friends.shift()!
        return [{ $type: 'com.atproto.repo.applyWrites#delete', collection: collOf(victim.uri), rkey: rkeyOf(victim.uri) }]
      }
      if (r < 0.2) return Array.from({ length: 2 + Math.floor(rand() * 3) }, () => create(friend(someone(did))))
      if (r < 0.3) return [create(friend(someone(did))), nonCocoreWrite(w)]
      return [create(friend(someone(did)))]
    }

    /** Makes one commit in `w`'s repo; false when all commits are made. */
    const commitOnce = async (w: Writer): Promise<boolean> => {
      const { agent, did } = w.acct
      const i = next++
      if (i >= totalCommits) return false
      const cocore = i % cocoreEvery === Math.floor(cocoreEvery / 2)
      let writes: Write[]
      if (cocore) writes = cocoreWrites(w)
      else if (rand() < 0.03) writes = Array.from({ length: 2 + Math.floor(rand() * 5) }, () => nonCocoreWrite(w))
      else writes = [nonCocoreWrite(w)]
      // A delete and a create of the same record in one batch is not allowed; drop duplicates by path.
      const seen = new Set<string>()
      writes = writes.filter((x) => !seen.has(`${x.collection}/${x.rkey}`) && !!seen.add(`${x.collection}/${x.rkey}`))

      let results: ({ uri?: string; cid?: string } | undefined)[]
      const first = writes[0]!
      if (writes.length === 1 && first.$type === 'com.atproto.repo.applyWrites#create') {
        // Most single writes go through createRecord, as clients do.
        const x = first
        const res = await agent.com.atproto.repo.createRecord({ repo: did, collection: x.collection, rkey: x.rkey, record: x.value, validate: false })
        results = [res.data]
      } else if (writes.length === 1) {
        await agent.com.atproto.repo.deleteRecord({ repo: did, collection: writes[0]!.collection, rkey: writes[0]!.rkey })
        results = [undefined]
      } else {
        const res = await agent.com.atproto.repo.applyWrites({ repo: did, writes, validate: false })
        results = (res.data.results ?? []) as { uri?: string; cid?: string }[]
      }

      stats.commits++
      stats.ops += writes.length
      if (writes.length > 1) stats.multiOpCommits++
      let touched = false
      writes.forEach((x, k) => {
        const uri = `at://${did}/${x.collection}/${x.rkey}`
        const res = results[k]
        const ref = res?.uri && res.cid ? { uri: res.uri, cid: res.cid } : null
        if (x.collection.startsWith(COCORE_PREFIX)) {
          touched = true
          stats.cocoreOps++
          if (x.$type === 'com.atproto.repo.applyWrites#delete') cocoreLive.delete(uri)
          else {
            cocoreLive.add(uri)
            if (ref && x.collection !== 'dev.cocore.account.profile') w.friends.push(ref)
          }
        } else if (ref && x.collection === 'app.bsky.feed.post') w.posts.push(ref)
        else if (ref && x.collection === 'app.bsky.feed.like') w.likes.push(ref)
      })
      if (touched) stats.cocoreCommits++
      if (opts.progress && performance.now() - lastLog > 5000) {
        lastLog = performance.now()
        say(`${stats.commits}/${totalCommits} commits`)
      }
      return true
    }
    const concurrency = Math.min(opts.concurrency ?? nAccounts, writers.length)
    await Promise.all(
      Array.from({ length: concurrency }, async (_, k) => {
        // Worker k owns accounts k, k+concurrency, ...: one writer per repo at a time.
        const mine = writers.filter((_, j) => j % concurrency === k)
        for (let j = 0; await commitOnce(mine[j % mine.length]!); j++);
      }),
    )
    stats.cocoreRecords = cocoreLive.size
    const writeSecs = (performance.now() - started) / 1000
    say(`${stats.commits} commits written in ${writeSecs.toFixed(1)}s`)

    const headSeq = (await net.net.pds.ctx.sequencer.curr()) ?? 0
    const { frames, seqs } = await readFirehose(`ws://localhost:${net.net.pds.port}`, headSeq)
    say(`${frames.length} frames recorded (seq ${seqs[0]}..${seqs[seqs.length - 1]})`)

    const didDocs: Record<string, unknown> = {}
    for (const w of writers) {
      const res = await fetch(`${net.plcUrl}/${encodeURIComponent(w.acct.did)}`)
      didDocs[w.acct.did] = await res.json()
    }
    const meta: RecordingMeta = {
      format: FORMAT,
      createdAt: now(),
      frames: frames.length,
      bytes: frames.reduce((n, f) => n + f.length, 0),
      firstSeq: seqs.find((s) => s >= 0) ?? -1,
      lastSeq: Math.max(...seqs),
      accounts: writers.map((w) => ({ did: w.acct.did, handle: w.acct.handle })),
      didDocs,
      writer: stats,
      recordSeconds: (performance.now() - started) / 1000,
    }
    const recording: Recording = { frames, seqs, meta }
    saveRecording(recording, dir)
    return { recording, network: net, close }
  } catch (err) {
    await close()
    throw err
  }
}

/** Reads `subscribeRepos` from cursor 0 until the frame with `headSeq`, keeping every binary frame as is. */
export async function readFirehose(service: string, headSeq: number, timeoutMs = 120_000): Promise<{ frames: Buffer[]; seqs: number[] }> {
  const frames: Buffer[] = []
  const seqs: number[] = []
  const ws = new WebSocket(`${service}/xrpc/com.atproto.sync.subscribeRepos?cursor=0`)
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`firehose recording timed out at ${frames.length} frames`)), timeoutMs)
      ws.on('message', (data, isBinary) => {
        if (!isBinary) return
        const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data)
        const seq = frameSeq(buf)
        frames.push(buf)
        seqs.push(seq)
        if (seq >= headSeq) {
          clearTimeout(timer)
          resolve()
        }
      })
      ws.on('error', (err) => {
        clearTimeout(timer)
        reject(err)
      })
      ws.on('close', () => {
        clearTimeout(timer)
        reject(new Error(`firehose closed after ${frames.length} frames`))
      })
    })
  } finally {
    ws.removeAllListeners('close')
    ws.on('error', () => {})
    ws.terminate()
  }
  return { frames, seqs }
}
