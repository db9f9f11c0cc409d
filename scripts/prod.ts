/**
 * Production entry point: the same services as `npm start`, pointed by
 * configuration at a relay and/or PDSes and the public PLC directory.
 * Every fetch of an address from user data (DID documents, handles, PDS
 * endpoints, sign-in identifiers) is SSRF-safe: `src/net/safe-fetch.ts`.
 */
import { AppView } from '../appview/index.ts'
import { startConsole } from '../console/index.ts'
import { policyFromConfig } from '../console/exchange/policy.ts'
import { ConfigError, loadConfig, type Config } from '../src/config.ts'
import { appviewLogger as log, setLogLevel } from '../src/logger.ts'
import { shutdownOn } from '../src/shutdown.ts'

let config: Config
try {
  config = loadConfig({ COCORE_MODE: 'production', ...process.env })
} catch (err) {
  if (!(err instanceof ConfigError)) throw err
  console.error(`configuration error: ${err.message} (see docs/configuration.md)`)
  process.exit(2)
}
setLogLevel(config.logLevel)

const appview = await new AppView({
  dbPath: config.appviewDbPath,
  sources: config.firehoseSources,
  plcUrl: config.plcUrl,
  didCacheSize: config.didCacheSize,
  didCacheTtlSec: config.didCacheTtlSec,
  port: config.appviewPort,
  host: config.host,
  publicUrl: config.appviewUrl,
  trustedProxies: config.trustedProxies,
  trustedBrokerages: config.trustedBrokerages,
}).start()
const consoleSrv = await startConsole({
  port: config.consolePort,
  host: config.host,
  dbPath: config.consoleDbPath,
  dataDir: config.dataDir,
  mode: 'production',
  // Sign-in and the provider gateway resolve DIDs at the configured directory too.
  plcUrl: config.plcUrl,
  publicUrl: config.consoleUrl,
  secretKey: config.secretKey || undefined,
  secretKeyFile: config.secretKeyFile,
  apiKeyRatePerMinute: config.apiKeyRatePerMinute,
  apiKeyIpRatePerMinute: config.apiKeyIpRatePerMinute,
  apiKeyIpFailuresPerMinute: config.apiKeyIpFailuresPerMinute,
  trustedProxies: config.trustedProxies,
  dailyTokenLimit: config.dailyTokenLimit,
  devicePair: { startsPerMinute: config.devicePairStartsPerMinute, pollsPerMinute: config.devicePairPollsPerMinute },
  index: appview.consoleIndex(),
  exchangeDid: config.exchangeDid || undefined,
  exchangeAccount:
    config.exchangeIdentifier && config.exchangePassword && config.exchangePdsUrl
      ? { identifier: config.exchangeIdentifier, password: config.exchangePassword, pdsUrl: config.exchangePdsUrl }
      : undefined,
  policy: policyFromConfig(config),
  signingKey: config.exchangeSigningKey || undefined,
  brokerageDid: config.brokerageDid,
  brokerageSigningKey: config.brokerageSigningKey || undefined,
  appviewUrl: config.appviewUrl,
})
// Reference clients send the API-key, dispatch and pairing methods to the AppView: it hands them to the console.
appview.linkConsole(consoleSrv.appviewLink)
log.info('started', { sources: config.firehoseSources, appview: appview.url, console: consoleSrv.url })

shutdownOn(['SIGINT', 'SIGTERM'], [() => consoleSrv.close(), () => appview.stop()])
