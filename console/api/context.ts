/** What the console's XRPC handlers get: the services, and the authenticated caller. */
import type { Context } from 'hono'
import { ForbiddenError } from '../../src/xrpc/errors.ts'
import type { ApiKeys, Scope, UsageCounters } from '../api-keys.ts'
import type { AuditLog, ConsoleSessions } from '../sessions.ts'
import type { InferenceDeps } from '../exchange/admission.ts'
import type { ServiceAuth } from '../service-auth.ts'
import type { DevicePairing } from '../device-pairs.ts'

export interface Caller {
  did: string
  /** A console session, or a service-auth token (for its one method), may do everything its owner may; a key only what its scopes say. */
  via: 'session' | 'key' | 'service-auth'
  keyId?: string
  /** A key's own expiry: keys it creates cannot outlive it. */
  expiresAt?: string
  scopes: readonly Scope[]
  ipHash: string | null
}

export interface ApiDeps {
  keys: ApiKeys
  usage: UsageCounters
  audit: AuditLog
  sessions: ConsoleSessions
  /** The exchange, when this console is one. */
  inference?: InferenceDeps
  /** Service-auth tokens addressed to this console's DID (or, forwarded by the AppView, to the AppView's); absent, they are refused. */
  serviceAuth?: ServiceAuth
  /** Device pairing (dev.cocore.devicePair.*). */
  pairing: DevicePairing
}

export const callerOf = (c: Context): Caller => c.get('caller') as Caller

/** The client address every per-address limit uses (set by `authenticate` for every call, public ones too). */
export const clientAddressOf = (c: Context): string | undefined => c.get('clientAddress') as string | undefined

export function requireScope(caller: Caller, scope: Scope): void {
  if (!caller.scopes.includes(scope)) throw new ForbiddenError(`this API key lacks the ${scope} scope`, 'InsufficientScope')
}
