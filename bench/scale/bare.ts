/**
 * The "bare better-sqlite3 + Hono" baseline of `npm run bench:scale`: each
 * read method as the least a hand-written server would do to give the same
 * page. Query parameters read with `c.req.query()` (no lexicon validation),
 * the same SQL as the read API on statements prepared once, rows mapped to
 * the answer's shape (record bodies parsed), `c.json`. No middleware, no
 * router of methods, no output checks. Aggregates read the same kept tables
 * and are returned as their rows.
 */
import type Database from 'better-sqlite3'
import { Hono, type Context } from 'hono'
import { ids } from '../../src/lexicon/generated/ids.ts'
import { verifyReceipt } from '../../appview/verify/receipt.ts'
import { verifySettlement } from '../../appview/verify/settlement.ts'

const HIDDEN = 'SELECT did FROM accounts WHERE active = 0'
const RECORD = 'uri, cid, did, collection, rkey, body, sort_at AS sortAt, indexed_at AS indexedAt'
type Row = Record<string, any>

const cursorOf = (c: Context): [string, string] | undefined => {
  const raw = c.req.query('cursor')
  return raw ? (JSON.parse(Buffer.from(raw, 'base64url').toString()) as [string, string]) : undefined
}
const encode = (key: unknown[]) => Buffer.from(JSON.stringify(key)).toString('base64url')
const view = (r: Row) => ({ uri: r.uri, cid: r.cid, collection: r.collection, repo: r.did, rkey: r.rkey, body: JSON.parse(r.body), indexedAt: r.indexedAt })

export function bareApp(db: Database.Database): Hono {
  const app = new Hono()
  const prepared = new Map<string, Database.Statement>()
  const st = (sql: string) => prepared.get(sql) ?? prepared.set(sql, db.prepare(sql)).get(sql)!

  /** A record list with optional equality filters, newest first. */
  const list = (nsid: string, field: string, collection: string, filters: Record<string, string>, defaultLimit: number) =>
    app.get(`/xrpc/${nsid}`, (c) => {
      const limit = Number(c.req.query('limit') ?? defaultLimit)
      const after = cursorOf(c)
      const where = ['collection = ?', `did NOT IN (${HIDDEN})`]
      const args: unknown[] = [collection]
      for (const [param, column] of Object.entries(filters)) {
        const v = c.req.query(param)
        if (v) {
          where.push(`${column} = ?`)
          args.push(v)
        }
      }
      if (after) where.push('(sort_at, uri) < (?, ?)'), args.push(...after)
      const rows = st(`SELECT ${RECORD} FROM records WHERE ${where.join(' AND ')} ORDER BY sort_at DESC, uri DESC LIMIT ?`).all(...args, limit + 1) as Row[]
      const page = rows.slice(0, limit)
      const last = page[page.length - 1]
      return c.json({ [field]: page.map(view), cursor: rows.length > limit && last ? encode([last.sortAt, last.uri]) : undefined })
    })
  list(ids.ComputeListReceipts, 'receipts', ids.ComputeReceipt, { provider: 'provider_did', requester: 'requester_did', job: 'job_uri' }, 50)
  list(ids.ComputeListJobs, 'jobs', ids.ComputeJob, { requester: 'requester_did' }, 50)
  list(ids.ComputeListProviders, 'providers', ids.ComputeProvider, { provider: 'provider_did' }, 50)
  list(ids.ComputeListSettlements, 'settlements', ids.ComputeSettlement, { receipt: 'receipt_uri', requester: 'requester_did' }, 50)
  list(ids.AccountListProfiles, 'profiles', ids.AccountProfile, {}, 50)

  app.get(`/xrpc/${ids.AccountListAccounts}`, (c) => {
    const limit = Number(c.req.query('limit') ?? 24)
    const after = cursorOf(c)
    const rows = st(
      `SELECT s.did, s.handle, s.last_at AS lastAt, s.joined_at AS joinedAt, s.machines, p.body FROM (
        SELECT * FROM account_stats s WHERE s.hidden = 0 ${after ? 'AND s.last_at <= ? AND (s.last_at < ? OR s.did > ?)' : ''} ORDER BY s.last_at DESC, s.did LIMIT ?
      ) s LEFT JOIN records p ON p.uri = 'at://' || s.did || '/${ids.AccountProfile}/self' ORDER BY s.last_at DESC, s.did`,
    ).all(...(after ? [after[0], after[0], after[1]] : []), limit + 1) as Row[]
    const total = st('SELECT COUNT(*) AS n FROM account_stats WHERE hidden = 0').get() as Row
    const page = rows.slice(0, limit)
    const last = page[page.length - 1]
    return c.json({
      accounts: page.map((r) => {
        const p = r.body ? JSON.parse(r.body) : {}
        return { did: r.did, handle: r.handle, displayName: p.displayName ?? null, avatarUrl: p.avatarUrl ?? null, joinedAt: r.joinedAt || null, lastActivityAt: r.lastAt || null, providerCount: r.machines, isProvider: r.machines > 0 }
      }),
      total: total.n,
      cursor: rows.length > limit && last ? encode([last.lastAt, last.did]) : undefined,
    })
  })

  app.get(`/xrpc/${ids.AccountListFriendEdges}`, (c) => {
    const limit = Number(c.req.query('limit') ?? 5000)
    const after = cursorOf(c)
    const rows = st(
      `SELECT friender, subject, first_at, created_at FROM friend_edges WHERE friender_hidden = 0 AND subject_hidden = 0 AND friender <> subject ${after ? 'AND (friender, subject) > (?, ?)' : ''} ORDER BY friender, subject LIMIT ?`,
    ).all(...(after ?? []), limit + 1) as Row[]
    const total = st("SELECT n FROM index_counts WHERE name = 'friend_edges'").get() as Row | undefined
    const page = rows.slice(0, limit)
    const last = page[page.length - 1]
    return c.json({ edges: page.map((r) => ({ friender: r.friender, subject: r.subject, createdAt: r.created_at ?? r.first_at })), total: total?.n ?? 0, cursor: rows.length > limit && last ? encode([last.friender, last.subject]) : undefined })
  })

  app.get(`/xrpc/${ids.AccountListIncomingFriends}`, (c) => {
    const did = c.req.query('did')!
    const limit = Number(c.req.query('limit') ?? 100)
    const after = cursorOf(c)
    const rows = st(
      `SELECT e.friender, e.first_uri AS uri, e.first_at AS sortAt, e.created_at AS createdAt, a.handle FROM friend_edges e LEFT JOIN accounts a ON a.did = e.friender
      WHERE e.subject = ? AND e.friender_hidden = 0 ${after ? 'AND e.first_at <= ? AND (e.first_at < ? OR e.friender > ?)' : ''} ORDER BY e.first_at DESC, e.friender LIMIT ?`,
    ).all(did, ...(after ? [after[0], after[0], after[1]] : []), limit + 1) as Row[]
    const total = st('SELECT n FROM friend_counts WHERE subject = ?').get(did) as Row | undefined
    const page = rows.slice(0, limit)
    const last = page[page.length - 1]
    return c.json({
      friends: page.map((r) => ({ friender: r.friender, frienderHandle: r.handle ?? undefined, subject: did, uri: r.uri, createdAt: r.createdAt ?? r.sortAt })),
      total: total?.n ?? 0,
      cursor: rows.length > limit && last ? encode([last.sortAt, last.friender]) : undefined,
    })
  })

  app.get(`/xrpc/${ids.AccountGetProfile}`, (c) => {
    const did = c.req.query('did')!
    const stats = st('SELECT * FROM account_stats WHERE did = ? AND hidden = 0').get(did) as Row | undefined
    if (!stats) return c.json({ error: 'NotFound', message: 'not found' }, 404)
    const profile = st('SELECT body FROM records WHERE uri = ?').get(`at://${did}/${ids.AccountProfile}/self`) as Row | undefined
    const machines = st(`SELECT rkey, body FROM records WHERE did = ? AND collection = ? ORDER BY sort_at DESC, uri DESC`).all(did, ids.ComputeProvider) as Row[]
    const weeks = st('SELECT * FROM account_weeks WHERE did = ? AND week >= ?').all(did, new Date(Date.now() - 365 * 86400_000).toISOString().slice(0, 10))
    const friends = st('SELECT n FROM friend_counts WHERE subject = ?').get(did) as Row | undefined
    const latency = st(`SELECT json_extract(body, '$.startedAt') AS s, json_extract(body, '$.completedAt') AS e FROM records WHERE did = ? AND collection = ? ORDER BY sort_at DESC, uri DESC LIMIT 100`).all(did, ids.ComputeReceipt)
    return c.json({ profile: { stats, body: profile ? JSON.parse(profile.body) : null, machines: machines.map((m) => ({ rkey: m.rkey, ...JSON.parse(m.body) })), weeks, incomingFriendsCount: friends?.n ?? 0, latency } })
  })

  app.get(`/xrpc/${ids.ComputeModelActivity}`, (c) =>
    c.json({ windows: st('SELECT * FROM activity_windows').all(), models: st(`SELECT * FROM model_activity WHERE month_requests > 0 AND provider NOT IN (${HIDDEN})`).all() }),
  )
  app.get(`/xrpc/${ids.ComputeLatency}`, (c) => c.json({ scopes: st('SELECT kind, key, n, sum, p50, p95, last_ms FROM latency_stats').all() }))

  const indexed = (uri: string | undefined) => {
    if (!uri) return undefined
    const r = st(`SELECT uri, cid, did, collection, body FROM records WHERE uri = ? AND did NOT IN (${HIDDEN})`).get(uri) as Row | undefined
    return r ? { ...r, body: JSON.parse(r.body) } : undefined
  }
  app.get(`/xrpc/${ids.ComputeVerifyReceipt}`, (c) => {
    const receipt = indexed(c.req.query('uri'))
    if (!receipt) return c.json({ error: 'NotFound' }, 404)
    return c.json(verifyReceipt(receipt as never, indexed(receipt.body.job?.uri) as never, indexed(receipt.body.attestation?.uri) as never))
  })
  app.get(`/xrpc/${ids.ComputeVerifySettlement}`, (c) => {
    const s = indexed(c.req.query('uri'))
    if (!s) return c.json({ error: 'NotFound' }, 404)
    return c.json(verifySettlement(s as never, indexed(s.body.receipt?.uri) as never, indexed(s.body.requesterAuthorization?.uri) as never, indexed(s.body.exchangeAttestation?.uri) as never, null))
  })
  return app
}
