import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import type { AccountGetProfileMachineView, AccountGetProfileOutput, AccountGetProfileParams, AccountGetProfileProfileView } from '../../../../../src/lexicon/generated/types.ts'
import { NotFoundError } from '../../../../../src/xrpc/errors.ts'
import { accountTotals, profileSeries, receiptLatency } from '../../../aggregates.ts'
import { statement, visible, type ApiContext } from '../../../util.ts'

/** A non-empty string, else null (the reference's reading of every optional text field). */
const text = (v: unknown): string | null => (typeof v === 'string' && v.length > 0 ? v : null)

function machineView(rkey: string, body: Record<string, unknown>): AccountGetProfileMachineView {
  return {
    rkey,
    machineLabel: text(body.machineLabel),
    chip: text(body.chip),
    ramGB: Number.isSafeInteger(body.ramGB) ? (body.ramGB as number) : null,
    supportedModels: Array.isArray(body.supportedModels) ? body.supportedModels.filter((m): m is string => typeof m === 'string') : [],
    active: typeof body.active === 'boolean' ? body.active : null,
    createdAt: text(body.createdAt),
    trustLevel: text(body.trustLevel),
  }
}

/**
 * One account's profile page, as the reference AppView answers it: profile
 * fields (null when absent), its machines, counts of its jobs, receipts and
 * incoming friends, 52 weeks of activity and its recent latency. 404 when
 * the account has no visible record at all.
 */
export default function getProfile(ctx: ApiContext, params: AccountGetProfileParams): AccountGetProfileOutput {
  const did = params.did
  const totals = accountTotals(ctx.db, did)
  if (totals.recordCount === 0) throw new NotFoundError('the network holds no cocore record of this account')

  const head = statement(
    ctx.db,
    `SELECT a.handle AS handle, p.body AS body FROM (SELECT ? AS did) x
    LEFT JOIN accounts a ON a.did = x.did
    LEFT JOIN records p ON p.uri = ?`,
  ).get(did, `at://${did}/${ids.AccountProfile}/self`) as { handle: string | null; body: string | null }
  const profile = head.body ? (JSON.parse(head.body) as Record<string, unknown>) : {}
  const machines = statement(ctx.db, `SELECT rkey, body FROM records INDEXED BY records_did_collection WHERE did = ? AND collection = ? AND ${visible()} ORDER BY sort_at DESC, uri DESC`).all(did, ids.ComputeProvider) as {
    rkey: string
    body: string
  }[]
  const { weekSeries, incomingFriendsCount } = profileSeries(ctx.db, did, Date.now())

  const view: AccountGetProfileProfileView = {
    did,
    // The handle of the DID document (verified by the indexer), else the one the profile claims.
    handle: text(head.handle) ?? text(profile.handle),
    displayName: text(profile.displayName),
    bio: text(profile.bio),
    avatarUrl: text(profile.avatarUrl),
    joinedAt: totals.joinedAt,
    lastActivityAt: totals.lastActivityAt,
    machines: machines.map((m) => machineView(m.rkey, JSON.parse(m.body) as Record<string, unknown>)),
    jobCount: totals.jobCount,
    receiptCount: totals.receiptCount,
    incomingFriendsCount,
    weekSeries,
    latency: receiptLatency(ctx.db, did),
  }
  return { profile: view }
}
