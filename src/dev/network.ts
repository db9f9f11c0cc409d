/**
 * The embedded local network: a real PLC directory and a real PDS in-process
 * (`@atproto/dev-env`), used by `npm start` and by every end-to-end test.
 * dev-env is a dev dependency: production code never imports this module.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { AtpAgent } from '@atproto/api'
import { TestNetworkNoAppView, TestPds } from '@atproto/dev-env'

export interface LocalAccount {
  did: string
  handle: string
  password: string
  agent: AtpAgent
}

export interface LocalNetworkOpts {
  plcPort?: number
  pdsPort?: number
  /** Where the PDS keeps its files; a fresh temp dir when absent (removed on close). */
  dataDir?: string
}

export class LocalNetwork implements AsyncDisposable {
  readonly net: TestNetworkNoAppView
  private readonly ownedDirs: string[]
  private readonly extraPds: TestPds[] = []
  private closed = false

  private constructor(net: TestNetworkNoAppView, ownedDirs: string[]) {
    this.net = net
    this.ownedDirs = ownedDirs
  }

  static async create(opts: LocalNetworkOpts = {}): Promise<LocalNetwork> {
    const owned: string[] = []
    const dir = opts.dataDir ?? mkdtempSync(join(tmpdir(), 'cocore-pds-'))
    if (!opts.dataDir) owned.push(dir)
    mkdirSync(dir, { recursive: true })
    const net = await TestNetworkNoAppView.create({
      // Absent keys, not undefined ones: dev-env spreads these over its defaults.
      plc: opts.plcPort ? { port: opts.plcPort } : {},
      pds: { ...(opts.pdsPort ? { port: opts.pdsPort } : {}), dataDirectory: dir, blobstoreDiskLocation: join(dir, 'blobs') },
    })
    return new LocalNetwork(net, owned)
  }

  get pdsUrl(): string {
    return this.net.pds.url
  }
  get plcUrl(): string {
    return this.net.plc.url
  }

  /** A second PDS on the same PLC, for tests of several hosts. */
  async addPds(domain: string): Promise<TestPds> {
    const dir = mkdtempSync(join(tmpdir(), 'cocore-pds-'))
    this.ownedDirs.push(dir)
    const pds = await TestPds.create({ didPlcUrl: this.plcUrl, serviceHandleDomains: [domain], dataDirectory: dir, blobstoreDiskLocation: join(dir, 'blobs') })
    this.extraPds.push(pds)
    return pds
  }

  async createAccount(handle: string, password = 'password', pdsUrl = this.pdsUrl): Promise<LocalAccount> {
    const agent = new AtpAgent({ service: pdsUrl })
    const res = await agent.createAccount({ handle, email: `${handle.split('.')[0]}@example.com`, password })
    return { did: res.data.did, handle, password, agent }
  }

  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    for (const pds of this.extraPds) await pds.close()
    await this.net.close()
    for (const d of this.ownedDirs) rmSync(d, { recursive: true, force: true })
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close()
  }
}
