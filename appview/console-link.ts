/**
 * The methods the network's AppView serves that are the console's business
 * here: API keys, dispatch and device pairing. The console holds the keys,
 * the exchange and the pairings, so it serves them (console/api/); reference
 * clients send them to the AppView, directly or through their PDS, which
 * proxies a call to the AppView's `#cocore_appview` service with a
 * service-auth token whose audience is the AppView's DID. The AppView hands
 * each such call, as it came, to the console in its process, saying from
 * which address and under which DID. The console checks the credentials, so
 * every token is verified, and its `jti` spent, in one place.
 */
import { ids } from '../src/lexicon/generated/ids.ts'

/** The network's AppView serves these (graze-social/cocore packages/appview/src/api/server.ts); here the console does. */
export const CONSOLE_METHODS: readonly string[] = [
  ids.AccountCreateApiKey,
  ids.AccountListApiKeys,
  ids.AccountRevokeApiKey,
  ids.AccountDeleteApiKey,
  ids.InferenceDispatch,
  ids.DevicePairStart,
  ids.DevicePairPoll,
  ids.DevicePairConfirm,
]

/** What the AppView tells the console about a call it forwards. */
export interface Forwarded {
  /** The caller's address as the AppView saw it (after its trusted proxies), for the per-address limits. */
  clientAddress: string | undefined
  /** The AppView's DID: service-auth tokens of forwarded calls must name it. */
  audience: string
}

/** The console, as the AppView reaches it. */
export interface ConsoleLink {
  fetch(req: Request, from: Forwarded): Promise<Response>
}

/**
 * What a forwarded call keeps: its method, target, body and the headers that
 * describe its credentials and body. Never cookies: the AppView's door takes
 * bearer credentials only, so no page of another origin can act with a
 * console session through it.
 */
const KEPT_HEADERS = ['authorization', 'content-type', 'content-length', 'accept', 'user-agent']

export function forwardedRequest(req: Request): Request {
  const headers = new Headers()
  for (const name of KEPT_HEADERS) {
    const value = req.headers.get(name)
    if (value !== null) headers.set(name, value)
  }
  const body = req.method === 'GET' || req.method === 'HEAD' ? undefined : req.body
  // The caller's signal goes along: a dispatch whose caller went away is cancelled at the provider.
  return new Request(req.url, { method: req.method, headers, body, signal: req.signal, duplex: 'half' } as RequestInit)
}
