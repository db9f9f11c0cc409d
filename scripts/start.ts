/**
 * npm start: the whole system on loopback with an embedded local network.
 * A real PLC directory and PDS (in-process), demo accounts with a few
 * dev.cocore records, the AppView, the console (the exchange), and the
 * reference provider agent with its built-in engine as the demo provider, so
 * a newcomer can chat at once.
 *
 * The PLC directory lives in memory, so DIDs do not survive a restart: each
 * start recreates `data/dev/` cleanly rather than reusing a PDS whose DIDs no
 * longer resolve.
 */
import { mkdirSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { AppView } from '../appview/index.ts'
import { startConsole } from '../console/index.ts'
import { policyFromConfig } from '../console/exchange/policy.ts'
import { loadConfig, toWs } from '../src/config.ts'
import { P256Signer } from '../src/crypto/p256.ts'
import { LocalNetwork, type LocalAccount } from '../src/dev/network.ts'
import { attestationRecord, authorizationRecord, friend, hex32, jobRecord, profile, providerRecord, putRecord, receiptRecord } from '../src/dev/records.ts'
import { stackFile, type StackInfo } from '../src/dev/stack.ts'
import { setLogLevel } from '../src/logger.ts'
import { shutdownOn } from '../src/shutdown.ts'
import { ProviderAgent } from '../src/provider/agent.ts'
import { BuiltinEngine } from '../src/provider/engine.ts'

const config = loadConfig({ ...process.env, COCORE_MODE: 'dev' })
setLogLevel(config.logLevel)
// dev-env's services log through pino only when asked to.
process.env.LOG_ENABLED ??= 'false'

const devDir = join(config.dataDir, 'dev')
rmSync(devDir, { recursive: true, force: true })
for (const db of [config.appviewDbPath, config.consoleDbPath]) for (const suffix of ['', '-wal', '-shm']) rmSync(db + suffix, { force: true })
mkdirSync(devDir, { recursive: true })

const net = await LocalNetwork.create({ plcPort: config.plcPort, pdsPort: config.pdsPort, dataDir: join(devDir, 'pds') })

const demo: { handle: string; role: string }[] = [
  { handle: 'alice.test', role: 'requester' },
  { handle: 'bob.test', role: 'requester' },
  { handle: 'rig.test', role: 'provider' },
  { handle: 'market.test', role: 'exchange' },
]
const password = 'password'
const DEMO_MODEL = 'builtin'
const accounts: Record<string, LocalAccount> = {}
for (const d of demo) accounts[d.role === 'requester' ? d.handle : d.role] = await net.createAccount(d.handle, password)
const alice = accounts['alice.test']!
const bob = accounts['bob.test']!
const rig = accounts.provider!
const market = accounts.exchange!

const appview = await new AppView({
  dbPath: config.appviewDbPath,
  sources: [toWs(net.pdsUrl)],
  plcUrl: net.plcUrl,
  allowHttp: true,
  handlesViaPds: net.pdsUrl,
  replayFromStart: true,
  port: config.appviewPort,
  host: config.host,
  publicUrl: config.appviewPublicUrl || undefined,
  trustedProxies: config.trustedProxies,
  trustedBrokerages: config.trustedBrokerages,
}).start()

// Seed: profiles, a friendship, a provider with its attestation, and one job with its signed receipt.
const signer = P256Signer.generate()
await putRecord(alice.agent, alice.did, profile('Alice'), 'self')
await putRecord(bob.agent, bob.did, profile('Bob'), 'self')
await putRecord(rig.agent, rig.did, profile('Rig (demo provider)'), 'self')
await putRecord(alice.agent, alice.did, friend(bob.did))
await putRecord(rig.agent, rig.did, providerRecord(signer))
const attestation = await putRecord(rig.agent, rig.did, attestationRecord(signer))
const auth = await putRecord(alice.agent, alice.did, authorizationRecord(market.did))
const commitment = hex32()
const job = await putRecord(alice.agent, alice.did, jobRecord(auth, commitment))
await putRecord(rig.agent, rig.did, receiptRecord(signer, { job, requester: alice.did, attestation, inputCommitment: commitment }))

const consoleSrv = await startConsole({
  port: config.consolePort,
  host: config.host,
  dbPath: config.consoleDbPath,
  dataDir: config.dataDir,
  mode: 'dev',
  secretKey: config.secretKey || undefined,
  secretKeyFile: config.secretKeyFile,
  apiKeyRatePerMinute: config.apiKeyRatePerMinute,
  apiKeyIpRatePerMinute: config.apiKeyIpRatePerMinute,
  apiKeyIpFailuresPerMinute: config.apiKeyIpFailuresPerMinute,
  trustedProxies: config.trustedProxies,
  dailyTokenLimit: config.dailyTokenLimit,
  devicePair: { startsPerMinute: config.devicePairStartsPerMinute, pollsPerMinute: config.devicePairPollsPerMinute },
  index: appview.consoleIndex(),
  exchangeDid: market.did,
  // The demo exchange account runs the ledger and publishes its policy and settlements on its repo.
  exchangeAccount: { pdsUrl: net.pdsUrl, identifier: market.handle, password },
  policy: policyFromConfig(config),
  signingKey: config.exchangeSigningKey || undefined,
  brokerageDid: config.brokerageDid,
  brokerageSigningKey: config.brokerageSigningKey || undefined,
  plcUrl: net.plcUrl,
  pdsUrl: net.pdsUrl,
  appviewUrl: appview.url,
  demoAccounts: demo.map((d) => ({ handle: d.handle, password, role: d.role })),
})
// Reference clients send the API-key, dispatch and pairing methods to the AppView: it hands them to the console.
appview.linkConsole(consoleSrv.appviewLink)

// The demo provider: rig.test's machine, on the built-in deterministic engine. It publishes its own
// provider and attestation records and registers once the AppView has indexed them.
const provider = new ProviderAgent({
  pdsUrl: net.pdsUrl,
  identifier: rig.handle,
  password,
  exchangeUrl: consoleSrv.url,
  exchangeDid: market.did,
  keyFile: join(devDir, 'provider-key.json'),
  engine: new BuiltinEngine(),
  models: [DEMO_MODEL],
  label: 'demo provider (built-in engine)',
  reconnect: { initialMs: 200, maxMs: 2_000 },
})
const registered = new Promise<void>((resolve) => provider.once('registered', () => resolve()))
await provider.start()
await registered

const stack: StackInfo = {
  plcUrl: net.plcUrl,
  pdsUrl: net.pdsUrl,
  appviewUrl: appview.url,
  consoleUrl: consoleSrv.url,
  accounts: demo.map((d) => {
    const a = d.role === 'requester' ? accounts[d.handle]! : accounts[d.role]!
    return { handle: d.handle, did: a.did, password, role: d.role }
  }),
  startedAt: new Date().toISOString(),
}
writeFileSync(stackFile(config.dataDir), JSON.stringify(stack, null, 2) + '\n')

console.log(`
cocore is running on loopback (local network: PLC + PDS in-process)

  Console   ${consoleSrv.url}          <- sign in here, then Chat
  OpenAI    ${consoleSrv.url}/v1       (an API key from the console's API keys page; model "${DEMO_MODEL}")
  AppView   ${appview.url}/xrpc/dev.cocore.compute.listProviders
  PDS       ${net.pdsUrl}
  PLC       ${net.plcUrl}

  Demo accounts (password "${password}"):
${stack.accounts.map((a) => `    ${a.handle.padEnd(14)} ${a.role.padEnd(10)} ${a.did}`).join('\n')}

  Written to ${stackFile(config.dataDir)}. Ctrl-C stops everything.
`)

shutdownOn(['SIGINT', 'SIGTERM'], [
  () => provider.stop(),
  () => consoleSrv.close(),
  () => appview.stop(),
  () => net.close(),
  () => rmSync(stackFile(config.dataDir), { force: true }),
])
