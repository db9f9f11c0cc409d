/**
 * The console's OAuth client (`@atproto/oauth-client-node`), PAR + PKCE +
 * DPoP. Local network: a loopback client against the local PDS. Production:
 * a confidential client authenticating with `private_key_jwt` (ES256 key
 * created on first start in the data dir, mode 0600), whose metadata and JWKS
 * the console serves.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname } from 'node:path'
import { JoseKey, NodeOAuthClient, requestLocalLock } from '@atproto/oauth-client-node'
import { buildAtprotoLoopbackClientMetadata } from '@atproto/oauth-types'
import type { Db } from '../../src/db/index.ts'
import type { SecretBox } from '../../src/crypto/secretbox.ts'
import { IDENTITY_FETCH, outboundFetch } from '../../src/net/safe-fetch.ts'
import { consoleScope } from './scopes.ts'
import { sessionStore, stateStore } from './stores.ts'

export interface OAuthClientOpts {
  db: Db
  box: SecretBox
  /** Where the console is reached; the callback is `<url>/oauth/callback`. */
  consoleUrl: string
  mode: 'dev' | 'production'
  /** The PLC directory (COCORE_PLC_URL; dev: the embedded one). Default https://plc.directory. */
  plcUrl?: string
  /** dev: the embedded PDS (handles resolve there). */
  handleResolverUrl?: string
  /** production: file of the ES256 client key. */
  clientKeyFile?: string
}

export const CALLBACK_PATH = '/oauth/callback'
export const CLIENT_METADATA_PATH = '/oauth/client-metadata.json'
export const JWKS_PATH = '/oauth/jwks.json'

async function clientKey(file: string): Promise<JoseKey> {
  if (!existsSync(file)) {
    mkdirSync(dirname(file), { recursive: true })
    const key = await JoseKey.generate(['ES256'], `console-${Date.now().toString(36)}`)
    writeFileSync(file, JSON.stringify(key.privateJwk), { mode: 0o600, flag: 'wx' })
  }
  return JoseKey.fromImportable(readFileSync(file, 'utf8'))
}

export async function createOAuthClient(opts: OAuthClientOpts): Promise<NodeOAuthClient> {
  const scope = consoleScope()
  const stores = { stateStore: stateStore(opts.db, opts.box), sessionStore: sessionStore(opts.db, opts.box) }
  if (opts.mode === 'dev') {
    return new NodeOAuthClient({
      clientMetadata: buildAtprotoLoopbackClientMetadata({ scope, redirect_uris: [`${opts.consoleUrl}${CALLBACK_PATH}` as `http://127.0.0.1:${string}`] }),
      allowHttp: true,
      plcDirectoryUrl: opts.plcUrl,
      handleResolver: opts.handleResolverUrl,
      requestLock: requestLocalLock,
      ...stores,
    })
  }
  const base = opts.consoleUrl.replace(/\/+$/, '')
  return new NodeOAuthClient({
    clientMetadata: {
      client_id: `${base}${CLIENT_METADATA_PATH}`,
      client_name: 'cocore console',
      client_uri: base,
      redirect_uris: [`${base}${CALLBACK_PATH}` as `https://${string}`],
      scope,
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      application_type: 'web',
      token_endpoint_auth_method: 'private_key_jwt',
      token_endpoint_auth_signing_alg: 'ES256',
      dpop_bound_access_tokens: true,
      jwks_uri: `${base}${JWKS_PATH}`,
    },
    keyset: [await clientKey(opts.clientKeyFile!)],
    ...(opts.plcUrl ? { plcDirectoryUrl: opts.plcUrl } : {}),
    // Users type handles, DIDs and PDS addresses: fetch them SSRF-safely (https
    // only, no private or loopback addresses after resolution, each redirect hop
    // checked, size and time limits). Only the configured PLC directory is trusted.
    fetch: outboundFetch({ local: false, trusted: opts.plcUrl ? [opts.plcUrl] : [], ...IDENTITY_FETCH }),
    // Refresh tokens are single use: one refresh at a time per session.
    requestLock: requestLocalLock,
    ...stores,
  })
}
