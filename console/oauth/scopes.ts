/**
 * The narrowest OAuth scope the console needs: `atproto`, plus `repo:<nsid>`
 * for each collection it edits on the user's behalf, create (never update)
 * for the job records the exchange publishes for the requester, plus delete
 * access to every other dev.cocore collection, which "wipe all my data" must
 * remove.
 */
import { ids, recordCollections } from '../../src/lexicon/generated/ids.ts'

/** Collections the console creates and updates. */
export const WRITTEN_COLLECTIONS = [ids.AccountProfile, ids.AccountFriend, ids.ComputeProvider] as const

/** Collections the exchange creates for a requester (a job and its payment authorization); never updated. */
export const CREATED_COLLECTIONS = [ids.ComputePaymentAuthorization, ids.ComputeJob] as const

export function consoleScope(): string {
  const written = new Set<string>(WRITTEN_COLLECTIONS)
  const created = new Set<string>(CREATED_COLLECTIONS)
  return [
    'atproto',
    ...WRITTEN_COLLECTIONS.map((c) => `repo:${c}`),
    ...CREATED_COLLECTIONS.map((c) => `repo:${c}?action=create&action=delete`),
    ...recordCollections.filter((c) => !written.has(c) && !created.has(c)).map((c) => `repo:${c}?action=delete`),
  ].join(' ')
}
