/**
 * npm run provider: the reference provider agent. Serves a model to an
 * exchange, from the builtin engine or an OpenAI-compatible upstream
 * (Ollama, llama.cpp server, vLLM). Every option can also come from the
 * environment (COCORE_PROVIDER_<NAME>); the command line wins.
 */
import { parseArgs } from 'node:util'
import { ENC_SCHEMES, isEncScheme } from '../src/crypto/enc-scheme.ts'
import { ProviderAgent } from '../src/provider/agent.ts'
import { BuiltinEngine, chatCompletionsUrl, OpenAIUpstreamEngine, type Engine } from '../src/provider/engine.ts'
import { setLogLevel } from '../src/logger.ts'
import { shutdownOn } from '../src/shutdown.ts'

const USAGE = `Usage: npm run provider -- [options]

Required:
  --pds URL              the PDS of the provider's account
  --identifier ID        the account's handle or DID
  --password PW          its password (prefer COCORE_PROVIDER_PASSWORD: arguments show in ps)
  --exchange URL         the exchange to serve (its /v1/agent is used)
  --exchange-did DID     the exchange's DID

Optional:
  --key-file PATH        keys and record keys, created with mode 0600 (default data/provider-key.json)
  --enc-scheme SCHEME    the encryption key prompts are sealed to: x25519 (default) or p256-ecies-se
                         (a P-256 key, in the key file: the codec of Secure Enclave providers, not an enclave)
  --models M1,M2         models served (default: the upstream's /v1/models, or "builtin")
  --upstream URL         an OpenAI-compatible server to run the jobs
  --upstream-key KEY     its API key, if it needs one
  --engine NAME          builtin or openai (default: openai with --upstream, else builtin)
  --label NAME           the machine's name on its provider record (default: the hostname)
  --max-concurrent N     jobs run at once (default 4)
  --token-delay-ms MS    builtin engine: pause before each piece, as a real model streams (default 0)
  --log-level LEVEL      debug, info, warn, error or silent (default info)
  --help                 this text

Each option may also be set as COCORE_PROVIDER_<NAME>, e.g. COCORE_PROVIDER_EXCHANGE_DID.
`

const OPTIONS = {
  pds: { type: 'string' },
  identifier: { type: 'string' },
  password: { type: 'string' },
  exchange: { type: 'string' },
  'exchange-did': { type: 'string' },
  'key-file': { type: 'string' },
  'enc-scheme': { type: 'string' },
  models: { type: 'string' },
  upstream: { type: 'string' },
  'upstream-key': { type: 'string' },
  engine: { type: 'string' },
  label: { type: 'string' },
  'max-concurrent': { type: 'string' },
  'token-delay-ms': { type: 'string' },
  'log-level': { type: 'string' },
  help: { type: 'boolean' },
} as const
type Name = Exclude<keyof typeof OPTIONS, 'help'>

class UsageError extends Error {
  override name = 'UsageError'
}

const envName = (name: Name) => `COCORE_PROVIDER_${name.toUpperCase().replace(/-/g, '_')}`

function parse() {
  let values: Partial<Record<Name, string>> & { help?: boolean }
  try {
    values = parseArgs({ options: OPTIONS, strict: true, allowPositionals: false }).values
  } catch (err) {
    throw new UsageError((err as Error).message)
  }
  if (values.help) return null
  const get = (name: Name): string | undefined => values[name] ?? (process.env[envName(name)] || undefined)
  const required = ['pds', 'identifier', 'password', 'exchange', 'exchange-did'] as const
  const missing = required.filter((n) => !get(n))
  if (missing.length) throw new UsageError(`missing ${missing.map((n) => `--${n} (or ${envName(n)})`).join(', ')}`)
  const engine = get('engine') ?? (get('upstream') ? 'openai' : 'builtin')
  if (engine !== 'builtin' && engine !== 'openai') throw new UsageError(`--engine must be builtin or openai, got "${engine}"`)
  if (engine === 'openai' && !get('upstream')) throw new UsageError('--engine openai needs --upstream URL')
  if (engine === 'builtin' && get('upstream')) throw new UsageError('--upstream is for --engine openai; leave one of them out')
  const maxConcurrent = get('max-concurrent') === undefined ? undefined : Number(get('max-concurrent'))
  if (maxConcurrent !== undefined && !(Number.isSafeInteger(maxConcurrent) && maxConcurrent > 0)) throw new UsageError('--max-concurrent must be a positive integer')
  const tokenDelayMs = get('token-delay-ms') === undefined ? undefined : Number(get('token-delay-ms'))
  if (tokenDelayMs !== undefined && !(Number.isSafeInteger(tokenDelayMs) && tokenDelayMs >= 0)) throw new UsageError('--token-delay-ms must be a non-negative integer')
  if (tokenDelayMs !== undefined && engine !== 'builtin') throw new UsageError('--token-delay-ms is for the builtin engine')
  const encScheme = get('enc-scheme')
  if (encScheme !== undefined && !isEncScheme(encScheme)) throw new UsageError(`--enc-scheme must be ${ENC_SCHEMES.join(' or ')}, got "${encScheme}"`)
  const models = get('models')
    ?.split(',')
    .map((m) => m.trim())
    .filter(Boolean)
  return { get, engine, maxConcurrent, tokenDelayMs, models, encScheme }
}

/** The models an upstream serves, from its /v1/models. */
async function upstreamModels(url: string, key: string | undefined): Promise<string[]> {
  const modelsUrl = chatCompletionsUrl(url).replace(/\/chat\/completions$/, '/models')
  const res = await fetch(modelsUrl, { headers: key ? { authorization: `Bearer ${key}` } : {}, signal: AbortSignal.timeout(10_000) }).catch((err: Error) => {
    throw new UsageError(`could not reach the upstream at ${modelsUrl}: ${err.message}`)
  })
  const body = (await res.json().catch(() => null)) as { data?: { id?: unknown }[] } | null
  const ids = (body?.data ?? []).map((m) => m.id).filter((id): id is string => typeof id === 'string')
  if (!res.ok || ids.length === 0) throw new UsageError(`the upstream at ${modelsUrl} listed no models (HTTP ${res.status}); name them with --models`)
  return ids
}

async function main(): Promise<void> {
  const opts = parse()
  if (!opts) return void process.stdout.write(USAGE)
  const { get } = opts
  if (get('log-level')) setLogLevel(get('log-level')!)
  let engine: Engine
  let models = opts.models
  if (opts.engine === 'openai') {
    engine = new OpenAIUpstreamEngine(get('upstream')!, get('upstream-key'))
    models ??= await upstreamModels(get('upstream')!, get('upstream-key'))
  } else {
    engine = new BuiltinEngine({ delayMs: opts.tokenDelayMs })
    models ??= ['builtin']
  }
  const agent = new ProviderAgent({
    pdsUrl: get('pds')!,
    identifier: get('identifier')!,
    password: get('password')!,
    exchangeUrl: get('exchange')!,
    exchangeDid: get('exchange-did')!,
    keyFile: get('key-file') ?? 'data/provider-key.json',
    encScheme: opts.encScheme,
    engine,
    models,
    label: get('label'),
    maxConcurrent: opts.maxConcurrent,
  })
  shutdownOn(['SIGINT', 'SIGTERM'], [() => agent.stop()])
  await agent.start()
  process.stderr.write(`provider ${agent.did} serving ${models.join(', ')} to ${get('exchange')}\n`)
}

main().catch((err: unknown) => {
  const e = err as Error
  process.stderr.write(`provider: ${e instanceof UsageError ? `${e.message}\n\n${USAGE}` : `${e.message}\n`}`)
  process.exit(e instanceof UsageError ? 2 : 1)
})
