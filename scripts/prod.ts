/**
 * Production entry point: the same services as `npm start`, pointed by
 * configuration at a relay and/or PDSes and the public PLC directory.
 * Identity and repo fetches use the SSRF-safe default fetch (https only).
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
  console.error(`configuration error: ${err.message} (see the configuration table in README.md)`)
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
}).start()
const consoleSrv = await startConsole({
  port: config.consolePort,
  host: config.host,
  dbPath: config.consoleDbPath,
  dataDir: config.dataDir,
  mode: 'production',
  publicUrl: config.consoleUrl,
  secretKey: config.secretKey || undefined,
  apiKeyRatePerMinute: config.apiKeyRatePerMinute,
  dailyTokenLimit: config.dailyTokenLimit,
  index: appview.consoleIndex(),
  exchangeDid: config.exchangeDid || undefined,
  exchangeAccount:
    config.exchangeIdentifier && config.exchangePassword && config.exchangePdsUrl
      ? { identifier: config.exchangeIdentifier, password: config.exchangePassword, pdsUrl: config.exchangePdsUrl }
      : undefined,
  policy: policyFromConfig(config),
  signingKey: config.exchangeSigningKey || undefined,
  appviewUrl: config.appviewUrl,
})
log.info('started', { sources: config.firehoseSources, appview: appview.url, console: consoleSrv.url })

shutdownOn(['SIGINT', 'SIGTERM'], [() => consoleSrv.close(), () => appview.stop()])
