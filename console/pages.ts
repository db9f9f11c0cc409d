/**
 * Server-rendered pages (hono/html: every interpolation is escaped). No
 * scripts or assets from other origins; the CSP forbids them anyway.
 */
import { html, raw } from 'hono/html'
import type { HtmlEscapedString } from 'hono/utils/html'
import type { ConsoleSession } from './sessions.ts'

type Html = HtmlEscapedString | Promise<HtmlEscapedString>

const STYLE = raw(`<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#1b1b1b}
header{display:flex;gap:1rem;align-items:baseline;border-bottom:1px solid #ddd;margin-bottom:1rem}
header nav{display:flex;gap:.8rem;margin-left:auto} a{color:#1f5fbf} table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #eee;padding:.35rem;text-align:left;font-size:14px} .err{color:#a40000}
form.inline{display:inline} input[type=text]{padding:.4rem;width:22rem} button{padding:.35rem .8rem}
code{background:#f4f4f4;padding:0 .25rem}</style>`)

export function layout(title: string, body: Html, who?: { did: string; handle?: string | null }): Html {
  return html`<!doctype html>
    <html lang="en">
      <head>
        <meta charset="utf-8" />
        <meta name="viewport" content="width=device-width, initial-scale=1" />
        <title>${title} · cocore console</title>
        ${STYLE}
      </head>
      <body>
        <header>
          <h1><a href="/">cocore</a></h1>
          ${who
            ? html`<nav>
                <a href="/chat">Chat</a><a href="/profile">Profile</a><a href="/friends">Friends</a><a href="/machines">Machines</a>
                <a href="/keys">API keys</a><a href="/sessions">Sessions</a><a href="/audit">Activity</a><a href="/account">Your data</a>
                <form class="inline" method="post" action="/logout"><button>Sign out</button></form>
              </nav>`
            : ''}
        </header>
        <main>${body}</main>
      </body>
    </html>`
}

export function signInPage(error?: string, value = '', demo?: { handle: string; password: string; role: string }[]): Html {
  return layout(
    'Sign in',
    html`<h2>Sign in with your AT Protocol identity</h2>
      ${error ? html`<p class="err" role="alert">${error}</p>` : ''}
      <form method="post" action="/login">
        <label>Handle, DID or PDS URL<br /><input type="text" name="identifier" value="${value}" placeholder="alice.bsky.social" autofocus required /></label>
        <button type="submit">Sign in</button>
      </form>
      <p>You will be sent to your own PDS to approve access. The console asks only for what it writes on your behalf.</p>
      ${demo?.length
        ? html`<h3>Demo accounts on the local network</h3>
            <ul>${demo.map((a) => html`<li><code>${a.handle}</code> (${a.role}), password <code>${a.password}</code></li>`)}</ul>`
        : ''}`,
  )
}

/** The hop from the sign-in form to the PDS: the response's Refresh header moves on; the link is for when it does not. */
export function continueToPdsPage(to: string): Html {
  return layout('Continue to your PDS', html`<h2>Continue to your PDS</h2><p><a id="continue" href="${to}">Continue to your PDS to approve access</a>.</p>`)
}

export function errorPage(title: string, message: string, status: 'sign-in' | 'home' = 'home'): Html {
  return layout(title, html`<h2>${title}</h2><p class="err" role="alert">${message}</p><p><a href="/">${status === 'sign-in' ? 'Try again' : 'Back'}</a></p>`)
}

export interface LedgerView {
  balance: number
  floor: number
  ok: boolean
  entries: { txnId: number; kind: string; amount: number; meta: Record<string, unknown> | null; createdAt: string }[]
}

function ledgerSection(l: LedgerView): Html {
  return html`<h3>Tokens</h3>
    <p>Balance: <strong id="balance">${l.balance}</strong> tokens${l.ok ? '' : html` <span class="err">(under the admission floor of ${l.floor}: jobs are refused until it is reached)</span>`}</p>
    ${l.entries.length
      ? html`<table id="ledger">
          <tr><th>When</th><th>What</th><th>Tokens</th></tr>
          ${l.entries.map((e) => html`<tr><td>${e.createdAt}</td><td>${e.kind}${typeof e.meta?.receipt === 'string' ? html` <code>${e.meta.receipt}</code>` : ''}</td><td>${e.amount > 0 ? '+' : ''}${e.amount}</td></tr>`)}
        </table>`
      : html`<p>No movements yet.</p>`}`
}

export function dashboardPage(who: { did: string; handle?: string | null }, appviewUrl: string, ledger?: LedgerView): Html {
  return layout(
    'Account',
    html`<h2>Signed in as ${who.handle ?? who.did}</h2>
      <p><code>${who.did}</code></p>
      ${ledger ? ledgerSection(ledger) : ''}
      <ul>
        <li><a href="/sessions">Your sessions</a>: where you are signed in, revoke any.</li>
        <li><a href="/audit">Activity</a>: sign-ins and other security events of your account.</li>
        <li><a href="/profile">Profile</a>, <a href="/friends">friends</a> and <a href="/machines">machines</a>: published on your own PDS.</li>
        <li><a href="/keys">API keys</a> and <a href="/account">your data</a> (export, wipe).</li>
      </ul>
      <p>The network's index (AppView) is served at <code>${appviewUrl}</code>.</p>
      <form method="post" action="/logout-everywhere">
        <button>Sign out everywhere</button> (ends every console session and revokes the console's access to your PDS)
      </form>`,
    who,
  )
}

/** The chat: everything happens in the browser (console/browser/chat.ts); the page only lays it out. */
export function chatPage(who: Who, appviewUrl: string, moduleUrl: string): Html {
  return layout(
    'Chat',
    html`<h2>Chat</h2>
      <div id="chat" data-appview="${appviewUrl}">
        <p>Your prompt is sealed in this browser to the provider's published key (read from the AppView) before it is sent; the console only relays ciphertext.</p>
        <div id="transcript"></div>
        <form>
          <label>Model <select name="model"></select></label><br />
          <textarea name="prompt" rows="3" cols="60" required></textarea><br />
          <button type="submit">Send</button>
        </form>
        <p id="status" role="status"></p>
      </div>
      <script type="module" src="${moduleUrl}"></script>`,
    who,
  )
}

export function sessionsPage(who: { did: string; handle?: string | null }, sessions: ConsoleSession[], currentId: string): Html {
  return layout(
    'Sessions',
    html`<h2>Your sessions</h2>
      <p>For each sign-in we keep the browser's user agent and a keyed hash of its IP address, never the address itself.</p>
      <table>
        <tr><th>Signed in</th><th>Last seen</th><th>Browser</th><th>IP (keyed hash)</th><th></th></tr>
        ${sessions.map(
          (s) => html`<tr>
            <td>${s.createdAt.slice(0, 16).replace('T', ' ')}</td>
            <td>${s.lastSeenAt.slice(0, 16).replace('T', ' ')}</td>
            <td>${s.userAgent ?? ''}${s.id === currentId ? html` <strong>(this one)</strong>` : ''}</td>
            <td><code>${s.ipHash?.slice(0, 12) ?? ''}</code></td>
            <td><form class="inline" method="post" action="/sessions/${s.id}/revoke"><button>Revoke</button></form></td>
          </tr>`,
        )}
      </table>`,
    who,
  )
}

export function auditPage(who: { did: string; handle?: string | null }, rows: { action: string; detail: string | null; ipHash: string | null; at: string }[]): Html {
  return layout(
    'Activity',
    html`<h2>Activity</h2>
      <table>
        <tr><th>When</th><th>What</th><th>Details</th><th>IP (keyed hash)</th></tr>
        ${rows.map((r) => html`<tr><td>${r.at.slice(0, 19).replace('T', ' ')}</td><td>${r.action}</td><td>${r.detail ?? ''}</td><td><code>${r.ipHash?.slice(0, 12) ?? ''}</code></td></tr>`)}
      </table>`,
    who,
  )
}

type Who = { did: string; handle?: string | null }

const notice = (error?: string, saved?: boolean) =>
  error ? html`<p class="err" role="alert">${error}</p>` : saved ? html`<p role="status">Saved to your PDS.</p>` : ''

export function profilePage(who: Who, profile: { displayName?: string; bio?: string } | null, opts: { error?: string; saved?: boolean } = {}): Html {
  return layout(
    'Profile',
    html`<h2>Your cocore profile</h2>
      ${notice(opts.error, opts.saved)}
      <form method="post" action="/profile">
        <p><label>Display name<br /><input type="text" name="displayName" value="${profile?.displayName ?? ''}" /></label></p>
        <p><label>Bio<br /><textarea name="bio" rows="4" cols="60">${profile?.bio ?? ''}</textarea></label></p>
        <button type="submit">Save profile</button>
      </form>
      <p>Stored on your own PDS as <code>dev.cocore.account.profile</code>.</p>`,
    who,
  )
}

export function friendsPage(who: Who, friends: { uri: string; value: { subject: string; note?: string; createdAt: string } }[], opts: { error?: string; saved?: boolean } = {}): Html {
  return layout(
    'Friends',
    html`<h2>Friends</h2>
      <p>Friends can use your machines through the private tier. The list lives on your PDS.</p>
      ${notice(opts.error, opts.saved)}
      <table>
        <tr><th>Friend</th><th>Note</th><th>Since</th><th></th></tr>
        ${friends.map(
          (f) => html`<tr><td><code>${f.value.subject}</code></td><td>${f.value.note ?? ''}</td><td>${f.value.createdAt.slice(0, 10)}</td>
            <td><form class="inline" method="post" action="/friends/${f.uri.split('/').pop()}/remove"><button>Remove</button></form></td></tr>`,
        )}
      </table>
      <form method="post" action="/friends">
        <p><label>Handle or DID<br /><input type="text" name="subject" required /></label>
        <label>Note<br /><input type="text" name="note" /></label></p>
        <button type="submit">Add friend</button>
      </form>`,
    who,
  )
}

export function machinesPage(
  who: Who,
  machines: { uri: string; value: { machineLabel: string; supportedModels: string[]; desiredModels?: string[]; active?: boolean; proBono?: { mode?: string }; shareLocation?: boolean } }[],
  opts: { error?: string; saved?: boolean } = {},
): Html {
  return layout(
    'Machines',
    html`<h2>Your machines</h2>
      ${notice(opts.error, opts.saved)}
      ${machines.length === 0 ? html`<p>No provider machine is published on your PDS yet. Run the provider agent to add one.</p>` : ''}
      ${machines.map((m) => {
        const rkey = m.uri.split('/').pop()
        return html`<form method="post" action="/machines/${rkey}">
          <h3>${m.value.machineLabel}</h3>
          <p>Serves: <code>${m.value.supportedModels.join(', ')}</code></p>
          <p><label>Models you want it to serve (comma-separated)<br /><input type="text" name="desiredModels" value="${(m.value.desiredModels ?? []).join(', ')}" /></label></p>
          <p><label><input type="checkbox" name="active" value="1" ${m.value.active === false ? '' : 'checked'} /> Active</label>
          <label><input type="checkbox" name="shareLocation" value="1" ${m.value.shareLocation ? 'checked' : ''} /> Share coarse location</label></p>
          <p><label>Pro bono <select name="proBono">
            <option value="" ${m.value.proBono ? '' : 'selected'}>off</option>
            <option value="any" ${m.value.proBono?.mode === 'any' ? 'selected' : ''}>anyone</option>
            <option value="direct" ${m.value.proBono?.mode === 'direct' ? 'selected' : ''}>friends who pick this machine</option>
          </select></label></p>
          <button type="submit">Save ${m.value.machineLabel}</button>
        </form>`
      })}`,
    who,
  )
}

export function keysPage(
  who: Who,
  keys: { id: string; name: string; prefix: string; scopes?: string[]; createdAt: string; expiresAt?: string; revokedAt?: string; lastUsedAt?: string }[],
  opts: { created?: { name: string; secret: string }; error?: string } = {},
): Html {
  return layout(
    'API keys',
    html`<h2>API keys</h2>
      ${opts.error ? html`<p class="err" role="alert">${opts.error}</p>` : ''}
      ${opts.created
        ? html`<div role="status"><p>Your new key <strong>${opts.created.name}</strong>. Copy it now: it is shown only once and cannot be recovered.</p>
            <p><code id="new-key">${opts.created.secret}</code></p></div>`
        : ''}
      <table>
        <tr><th>Name</th><th>Key</th><th>Scopes</th><th>Created</th><th>Last used</th><th>Status</th><th></th></tr>
        ${keys.map(
          (k) => html`<tr>
            <td>${k.name}</td><td><code>${k.prefix}…</code></td><td>${(k.scopes ?? []).join(' ')}</td>
            <td>${k.createdAt.slice(0, 10)}</td><td>${k.lastUsedAt?.slice(0, 16).replace('T', ' ') ?? 'never'}</td>
            <td>${k.revokedAt ? 'revoked' : k.expiresAt && k.expiresAt < new Date().toISOString() ? 'expired' : 'active'}</td>
            <td>
              ${k.revokedAt ? '' : html`<form class="inline" method="post" action="/keys/${k.id}/revoke"><button>Revoke</button></form>`}
              <form class="inline" method="post" action="/keys/${k.id}/delete"><button>Delete</button></form>
            </td>
          </tr>`,
        )}
      </table>
      <h3>New key</h3>
      <form method="post" action="/keys">
        <p><label>Name<br /><input type="text" name="name" required maxlength="100" /></label></p>
        <p>${['read', 'inference', 'records:write', 'keys:manage'].map(
          (s) => html`<label><input type="checkbox" name="scopes" value="${s}" ${s === 'read' || s === 'inference' ? 'checked' : ''} /> ${s}</label> `,
        )}</p>
        <p><label>Expires (optional)<br /><input type="date" name="expires" /></label></p>
        <button type="submit">Create key</button>
      </form>`,
    who,
  )
}

/** Where a pairing device sends its owner (its verificationUri, `?code=`): the code it shows, to approve or deny. */
export function devicePage(who: Who, code: string, opts: { done?: 'approved' | 'denied'; error?: string } = {}): Html {
  const body =
    opts.done === 'approved'
      ? html`<p role="status">Approved. The device picks up its API key now; the key is on your <a href="/keys">API keys</a> page, where you can revoke it.</p>`
      : opts.done === 'denied'
        ? html`<p role="status">Denied. The device gets no key.</p>`
        : html`<p>Approve only a device you are setting up yourself that shows this code: it gets an API key of your account (read and inference).</p>
            <form method="post" action="/devices/new">
              <p><label>Code<br /><input type="text" name="code" value="${code}" required maxlength="20" autocomplete="off" /></label></p>
              <button type="submit" name="decision" value="approve">Approve</button>
              <button type="submit" name="decision" value="deny">Deny</button>
            </form>`
  return layout('Pair a device', html`<h2>Pair a device</h2>${opts.error ? html`<p class="err" role="alert">${opts.error}</p>` : ''}${body}`, who)
}

export function accountPage(who: Who, opts: { error?: string } = {}): Html {
  return layout(
    'Your data',
    html`<h2>Your data</h2>
      <h3>Take it with you</h3>
      <form method="post" action="/account/export"><button type="submit">Download everything this service holds about you</button> (JSON)</form>
      <p>
      Your records themselves live on your own PDS: <code>com.atproto.sync.getRepo?did=${who.did}</code> exports the whole repository at any time.</p>
      <h3>Wipe all my data</h3>
      ${opts.error ? html`<p class="err" role="alert">${opts.error}</p>` : ''}
      <p>Deletes every <code>dev.cocore.*</code> record from your PDS, removes them from the index, and deletes your API keys,
      sessions, usage counters and activity log here; then revokes the console's access to your PDS. This cannot be undone.</p>
      <form method="post" action="/account/wipe">
        <p><label>Type <strong>wipe ${who.handle ?? who.did}</strong> to confirm<br /><input type="text" name="confirm" autocomplete="off" required /></label></p>
        <button type="submit">Wipe all my data</button>
      </form>`,
    who,
  )
}

export function wipePage(job: { status: string; phase: string; report: { removed: Record<string, number>; failed: Record<string, string>; local: Record<string, number>; remaining: Record<string, number>; kept: string[]; error?: string } }): Html {
  const running = job.status === 'running'
  const r = job.report
  const total = Object.values(r.removed).reduce((a, b) => a + b, 0)
  return html`<!doctype html>
    <html lang="en">
      <head>
        <meta charset="utf-8" />
        ${running ? raw('<meta http-equiv="refresh" content="2" />') : ''}
        <title>Wipe · cocore console</title>
        ${STYLE}
      </head>
      <body>
        <main>
          <h2>${running ? 'Wiping your data…' : job.status === 'done' ? 'Your data is wiped' : 'The wipe did not finish'}</h2>
          <p role="status">Status: <strong id="wipe-status">${job.status}</strong> (${job.phase}). ${total} records deleted from your PDS${running ? ' so far' : ''}.</p>
          ${r.error ? html`<p class="err" role="alert">${r.error}</p>` : ''}
          <h3>Deleted from your PDS</h3>
          <table>
            <tr><th>Collection</th><th>Records</th></tr>
            ${Object.entries(r.removed).map(([c, n]) => html`<tr><td><code>${c}</code></td><td>${n}</td></tr>`)}
          </table>
          ${Object.keys(r.failed).length
            ? html`<h3>Could not be deleted</h3><ul>${Object.entries(r.failed).map(([c, e]) => html`<li><code>${c}</code>: ${e}</li>`)}</ul>`
            : ''}
          ${Object.keys(r.remaining).length && !running
            ? html`<h3>Still on your PDS</h3><ul>${Object.entries(r.remaining).map(([c, n]) => html`<li><code>${c}</code>: ${n}</li>`)}</ul>`
            : ''}
          ${Object.keys(r.local).length
            ? html`<h3>Removed from this service</h3><ul>${Object.entries(r.local).map(([k, n]) => html`<li>${k}: ${n}</li>`)}</ul>`
            : ''}
          <h3>What is kept, and why</h3>
          <ul>${r.kept.map((k) => html`<li>${k}</li>`)}</ul>
          ${running ? '' : html`<p><a href="/">Back to the console</a></p>`}
        </main>
      </body>
    </html>`
}
