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
                <a href="/sessions">Sessions</a><a href="/audit">Activity</a>
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

export function errorPage(title: string, message: string, status: 'sign-in' | 'home' = 'home'): Html {
  return layout(title, html`<h2>${title}</h2><p class="err" role="alert">${message}</p><p><a href="/">${status === 'sign-in' ? 'Try again' : 'Back'}</a></p>`)
}

export function dashboardPage(who: { did: string; handle?: string | null }, appviewUrl: string): Html {
  return layout(
    'Account',
    html`<h2>Signed in as ${who.handle ?? who.did}</h2>
      <p><code>${who.did}</code></p>
      <ul>
        <li><a href="/sessions">Your sessions</a>: where you are signed in, revoke any.</li>
        <li><a href="/audit">Activity</a>: sign-ins and other security events of your account.</li>
        <li><a href="${appviewUrl}/xrpc/dev.cocore.compute.listProviders">Providers on the network</a> (AppView)</li>
      </ul>
      <form method="post" action="/logout-everywhere">
        <button>Sign out everywhere</button> (ends every console session and revokes the console's access to your PDS)
      </form>`,
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
