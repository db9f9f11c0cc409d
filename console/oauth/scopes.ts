/**
 * The narrowest OAuth scope the console needs: `atproto`, plus `repo:<nsid>`
 * for each collection it writes on the user's behalf, plus delete-only access
 * to the other dev.cocore collections, which "wipe all my data" must remove.
 */
import { ids, recordCollections } from '../../src/lexicon/generated/ids.ts'

/** Collections the console creates and updates. */
export const WRITTEN_COLLECTIONS = [ids.AccountProfile, ids.AccountFriend, ids.ComputeProvider] as const

export function consoleScope(): string {
  const written = new Set<string>(WRITTEN_COLLECTIONS)
  return [
    'atproto',
    ...WRITTEN_COLLECTIONS.map((c) => `repo:${c}`),
    ...recordCollections.filter((c) => !written.has(c)).map((c) => `repo:${c}?action=delete`),
  ].join(' ')
}
