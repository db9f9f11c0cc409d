/**
 * "Export my data": everything this service holds about an account, as one
 * JSON document. Every list is read to its end, page by page: nothing is cut off.
 */
import type { ConsoleIndex } from '../appview/index.ts'
import type { ApiDeps } from './api/context.ts'
import type { OAuthSessionInfo } from './oauth/stores.ts'
import type { AuditLog, ConsoleSessions } from './sessions.ts'

const PAGE = 1000

export interface ExportDeps {
  api: ApiDeps
  sessions: ConsoleSessions
  audit: AuditLog
  /** The AppView index, when it runs in this process. */
  index?: Pick<ConsoleIndex, 'records' | 'accountRows'>
  /** The OAuth session's metadata (never its tokens or key). */
  oauthSession: (did: string) => Promise<OAuthSessionInfo | null>
}

/** Every page of a newest-first list whose pages continue `before` the last row's id. */
function everyPage<T>(page: (before: number | undefined) => T[], idOf: (row: T) => number): T[] {
  const out: T[] = []
  for (let before: number | undefined; ; before = idOf(out.at(-1)!)) {
    const rows = page(before)
    out.push(...rows)
    if (rows.length < PAGE) return out
  }
}

export async function exportAccount(deps: ExportDeps, did: string, handle: string | null): Promise<Record<string, unknown>> {
  const economy = deps.api.inference?.economy
  return {
    exportedAt: new Date().toISOString(),
    did,
    handle,
    howToGetYourRepo: `Every record you published is on your own PDS. Download the whole repository with com.atproto.sync.getRepo?did=${did} on your PDS, at any time, without this service.`,
    apiKeys: deps.api.keys.list(did),
    sessions: deps.sessions.list(did),
    oauthSession: await deps.oauthSession(did),
    usage: deps.api.usage.list(did),
    activity: everyPage((before) => deps.audit.list(did, PAGE, before), (r) => r.id),
    indexedAccount: deps.index?.accountRows(did) ?? null,
    indexedRecords: deps.index?.records(did) ?? [],
    ledger: economy
      ? {
          balance: economy.ledger.balance(did),
          entries: everyPage((before) => economy.ledger.history(did, PAGE, before), (r) => r.txnId),
          settlements: economy.settlementsOf(did),
        }
      : null,
  }
}
