/** The AppView's XRPC methods, one handler file per NSID under `dev/cocore/`. */
import type { QueryHandler } from '../../src/xrpc/server.ts'
import { ids } from '../../src/lexicon/generated/ids.ts'
import type { ApiContext } from './util.ts'
import getProfile from './dev/cocore/account/getProfile.ts'
import listAccounts from './dev/cocore/account/listAccounts.ts'
import listFriendEdges from './dev/cocore/account/listFriendEdges.ts'
import listIncomingFriends from './dev/cocore/account/listIncomingFriends.ts'
import listProfiles from './dev/cocore/account/listProfiles.ts'
import latency from './dev/cocore/compute/latency.ts'
import listJobs from './dev/cocore/compute/listJobs.ts'
import listProviders from './dev/cocore/compute/listProviders.ts'
import listReceipts from './dev/cocore/compute/listReceipts.ts'
import listSettlements from './dev/cocore/compute/listSettlements.ts'
import modelActivity from './dev/cocore/compute/modelActivity.ts'
import verifyReceipt from './dev/cocore/compute/verifyReceipt.ts'
import verifySettlement from './dev/cocore/compute/verifySettlement.ts'

// Params arrive validated against each method's lexicon, so the typed signatures hold.
export const handlers = {
  [ids.AccountGetProfile]: getProfile,
  [ids.AccountListAccounts]: listAccounts,
  [ids.AccountListFriendEdges]: listFriendEdges,
  [ids.AccountListIncomingFriends]: listIncomingFriends,
  [ids.AccountListProfiles]: listProfiles,
  [ids.ComputeLatency]: latency,
  [ids.ComputeListJobs]: listJobs,
  [ids.ComputeListProviders]: listProviders,
  [ids.ComputeListReceipts]: listReceipts,
  [ids.ComputeListSettlements]: listSettlements,
  [ids.ComputeModelActivity]: modelActivity,
  [ids.ComputeVerifyReceipt]: verifyReceipt,
  [ids.ComputeVerifySettlement]: verifySettlement,
} as unknown as Record<string, QueryHandler<ApiContext>>
