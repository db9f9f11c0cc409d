/**
 * The one-pass repo reader of backfill and resync (appview/indexer/repo-car.ts)
 * against @atproto/repo's: on seeded repos of many shapes, and on CARs damaged
 * byte by byte, whatever it reads, the library reads to the same records (and
 * accepts: same rev, same MST root); whatever the library refuses, it leaves
 * to the library. It must also read every undamaged repo itself, or it is not
 * being tested.
 *
 *   COCORE_FUZZ_CASES=2000 COCORE_FUZZ_SEED=7 npx vitest run test/repo-car.test.ts
 */
import { Secp256k1Keypair } from '@atproto/crypto'
import { TID } from '@atproto/common-web'
import { cborToLex, cborToLexRecord, getFullRepo, MemoryBlockstore, readCarWithRoot, Repo, verifyRepo, WriteOpAction, type RecordWriteOp } from '@atproto/repo'
import { expect, it } from 'vitest'
import { readRepoCar } from '../appview/indexer/repo-car.ts'
import { NSID_PREFIX, ids } from '../src/lexicon/generated/ids.ts'
import { MAX_RECORD_BYTES } from '../src/lexicon/validate.ts'
import { fuzzConfig, rng } from './fixture/fuzz.ts'

const { seed, cases } = fuzzConfig(150)

/** What fetchRepo made of a CAR before the one-pass reader: the library's reading, or null when it throws. */
async function libraryRead(car: Uint8Array, did: string, key: string) {
  try {
    const { root, blocks } = await readCarWithRoot(car)
    const verified = await verifyRepo(blocks, root, did, key)
    const records = []
    for (const w of verified.creates) {
      if (!w.collection.startsWith(NSID_PREFIX)) continue
      const bytes = blocks.get(w.cid)
      if (!bytes) continue
      const uri = `at://${did}/${w.collection}/${w.rkey}`
      records.push({ action: 'create', uri, did, collection: w.collection, rkey: w.rkey, cid: w.cid.toString(), record: bytes.length > MAX_RECORD_BYTES ? {} : cborToLexRecord(bytes), size: bytes.length })
    }
    return { rev: verified.commit.rev, data: String((cborToLex(blocks.get(root)!) as { data: unknown }).data), records }
  } catch {
    return null
  }
}

/** A CAR's header section and its block sections (each with its length prefix), as written. */
function sections(car: Uint8Array): { header: Buffer; blocks: Buffer[] } {
  const buf = Buffer.from(car)
  const varint = (at: number): [number, number] => {
    let v = 0
    for (let i = 0; ; i++) {
      const b = buf[at + i]!
      v += (b & 0x7f) * 2 ** (7 * i)
      if (!(b & 0x80)) return [v, at + i + 1]
    }
  }
  const [hl, h] = varint(0)
  const blocks: Buffer[] = []
  for (let at = h + hl; at < buf.length; ) {
    const [len, start] = varint(at)
    blocks.push(buf.subarray(at, start + len))
    at = start + len
  }
  return { header: buf.subarray(0, h + hl), blocks }
}

async function carOf(repo: Repo): Promise<Uint8Array> {
  const chunks: Uint8Array[] = []
  for await (const c of getFullRepo(repo.storage, repo.cid)) chunks.push(c)
  return Buffer.concat(chunks)
}

it(`reads what the library reads, the same way, and leaves it the rest (seed ${seed})`, async () => {
  const r = rng(seed ^ 0xca5)
  const key = await Secp256k1Keypair.import(r.bytes(32))
  const did = 'did:plc:repocarrepocarrepocarrep'
  // Each record distinct: a block shared by two records is dropped from the test's store when one of them is deleted.
  let serial = 0
  const write = (collection: string, record: Record<string, unknown>): RecordWriteOp => ({ action: WriteOpAction.Create, collection, rkey: TID.nextStr(), record: { ...record, serial: serial++ } }) as RecordWriteOp
  const cars: Uint8Array[] = []
  // Repos of several sizes (MSTs of one to several layers), ours and others' records, some deleted again.
  for (const size of [0, 1, 3, 20, 150, 700]) {
    let repo = await Repo.create(new MemoryBlockstore(), did, key)
    const writes: RecordWriteOp[] = []
    for (let i = 0; i < size; i++) {
      writes.push(
        r.chance(0.6)
          ? write(ids.AccountFriend, { $type: ids.AccountFriend, subject: `did:plc:${r.int(1000)}`, createdAt: new Date().toISOString() })
          : r.chance(0.5)
            ? write('app.bsky.feed.post', { $type: 'app.bsky.feed.post', text: r.string(r.range(0, 40)), createdAt: new Date().toISOString() })
            : write(ids.AccountProfile.replace('profile', 'odd'), { $type: 'x', n: r.int(99), bytes: r.bytes(r.range(0, 20)) }),
      )
    }
    for (let i = 0; i < writes.length; i += 200) repo = await repo.applyWrites(writes.slice(i, i + 200), key)
    const gone = writes.filter(() => r.chance(0.2)).map((w) => ({ action: WriteOpAction.Delete, collection: w.collection, rkey: w.rkey }) as RecordWriteOp)
    if (gone.length) repo = await repo.applyWrites(gone, key)
    cars.push(await carOf(repo))
  }
  // Undamaged: read here, exactly as the library reads them.
  for (const car of cars) {
    const fast = await readRepoCar(car, did, key.did())
    expect(fast).not.toBeNull()
    expect(fast).toEqual(await libraryRead(car, did, key.did()))
  }
  // Another DID or key: left to the library (which refuses them).
  expect(await readRepoCar(cars[3]!, 'did:plc:someoneelse', key.did())).toBeNull()
  expect(await readRepoCar(cars[3]!, did, (await Secp256k1Keypair.create()).did())).toBeNull()

  const SPECIAL = [0x00, 0x01, 0x12, 0x20, 0x2a, 0x40, 0x55, 0x71, 0x80, 0x9f, 0xa0, 0xd8, 0xf6, 0xff]
  let readHere = 0
  let readByLibrary = 0
  for (let i = 0; i < cases; i++) {
    const base = Buffer.from(r.pick(cars.slice(1)))
    let car: Buffer = base
    const { header, blocks } = sections(base)
    switch (r.int(10)) {
      // Whole blocks moved, repeated, dropped, or taken from another repo: the CIDs still hold.
      case 6:
        car = Buffer.concat([header, ...blocks.map((b) => [r.next(), b] as const).sort((a, b) => a[0] - b[0]).map(([, b]) => b)])
        break
      case 7:
        car = Buffer.concat([header, ...blocks, r.pick(blocks)])
        break
      case 8: {
        const drop = r.int(blocks.length)
        car = Buffer.concat([header, ...blocks.filter((_, j) => j !== drop)])
        break
      }
      case 9:
        car = Buffer.concat([header, ...blocks, r.pick(sections(r.pick(cars.slice(1))).blocks)])
        break
      case 0:
        car[r.int(car.length)] = r.int(256)
        break
      case 1:
        car[r.int(car.length)] = r.pick(SPECIAL)
        break
      case 2:
        car = car.subarray(0, r.int(car.length))
        break
      case 3:
        car = Buffer.concat([car, Buffer.from(r.bytes(r.range(1, 40)))])
        break
      case 4: {
        // A block cut out, or repeated.
        const at = r.range(60, car.length - 1)
        const len = r.range(1, 120)
        car = r.chance(0.5) ? Buffer.concat([car.subarray(0, at), car.subarray(at + len)]) : Buffer.concat([car, car.subarray(at, at + len)])
        break
      }
      default: {
        const at = r.int(car.length)
        car = Buffer.concat([car.subarray(0, at), Buffer.from([r.pick(SPECIAL)]), car.subarray(at)])
      }
    }
    const fast = await readRepoCar(car, did, key.did())
    const lib = await libraryRead(car, did, key.did())
    if (lib) readByLibrary++
    if (!fast) continue
    readHere++
    expect(fast, `case ${i} (seed ${seed})`).toEqual(lib)
  }
  console.log(`[repo-car] ${cases} damaged CARs: the library read ${readByLibrary}, the one-pass reader ${readHere}, alike`)
}, 120_000)
