/**
 * What a #commit frame says of its place in the repo's chain (`since`,
 * `prevData`), read from the raw frame: the events `@atproto/sync` hands on
 * carry neither, and commits of other collections yield no event at all.
 */

/** A commit frame as decoded (fields unchecked: commits of other collections skip the library's validation). */
export interface CommitFrame {
  repo: unknown
  rev: unknown
  since?: unknown
  prevData?: unknown
}

/** The rev of the repo's previous commit the frame names; null when it names none (or garbage). */
export const sinceOf = (frame: CommitFrame): string | null => (typeof frame.since === 'string' ? frame.since : null)

/** The MST root CID of the previous commit (sync 1.1), as a string; null when the frame carries none. */
export function prevDataOf(frame: CommitFrame): string | null {
  // A decoded CID: multiformats marks its CIDs with `asCID` pointing to themselves.
  const cid = frame.prevData as { asCID?: unknown } | null | undefined
  return typeof cid === 'object' && cid !== null && cid.asCID === cid ? String(cid) : null
}
