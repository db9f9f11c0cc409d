/**
 * Sign-in under `form-action 'self'`: browsers apply form-action to every
 * redirect of a form submission, so the sign-in form's answer stays on this
 * origin (a 303 to /login/continue), and that page sends the browser to the
 * PDS with a Refresh, a navigation that is not a form submission. The hop
 * goes only where POST /login said (a MAC), so it is no open redirect.
 * Against the local PDS, without a browser (console-signin.test.ts completes
 * sign-ins in one).
 *
 *   npx vitest run test/console-form-action.test.ts
 */
import { afterAll, beforeAll, expect, it } from 'vitest'
import { startStack, type Stack } from './fixture/stack.ts'

let stack: Stack
beforeAll(async () => {
  stack = await startStack({ accounts: ['alice.test'], browser: false })
}, 120_000)
afterAll(async () => {
  await stack?.close()
})

const login = (identifier: string) =>
  fetch(`${stack.svc.url}/login`, { method: 'POST', redirect: 'manual', headers: { origin: stack.svc.url, 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams({ identifier }) })

it("answers the sign-in form on this origin, then sends the browser to the PDS's authorization page", async () => {
  const start = await login('alice.test')
  expect(start.status).toBe(303)
  expect(start.headers.get('set-cookie')).toMatch(/cocore_oauth_binding=/)
  const hop = new URL(start.headers.get('location')!)
  expect(hop.origin).toBe(new URL(stack.svc.url).origin)
  expect(hop.pathname).toBe('/login/continue')

  const page = await fetch(hop, { redirect: 'manual' })
  expect(page.status).toBe(200)
  expect(page.headers.get('content-security-policy')).toMatch(/(^|; )form-action 'self'(;|$)/)
  const refresh = /^0; url=(.+)$/.exec(page.headers.get('refresh') ?? '')
  const to = new URL(refresh![1]!)
  expect(to.origin).toBe(new URL(stack.net.pdsUrl).origin)
  expect(to.pathname).toBe('/oauth/authorize')
  expect(to.searchParams.get('request_uri')).toMatch(/^urn:/)
  expect(to.toString()).toBe(hop.searchParams.get('to'))
  expect(await page.text()).toContain(`href="${to.toString().replaceAll('&', '&amp;')}"`)
})

it('goes nowhere it was not sent: another address, a changed one, or no MAC is refused', async () => {
  const hop = new URL((await login('alice.test')).headers.get('location')!)
  const mac = hop.searchParams.get('mac')!
  const tries = [
    new URLSearchParams({ to: 'https://evil.example/', mac }),
    new URLSearchParams({ to: `${hop.searchParams.get('to')}&x=1`, mac }),
    new URLSearchParams({ to: hop.searchParams.get('to')! }),
    new URLSearchParams({ to: hop.searchParams.get('to')!, mac: `${mac.slice(0, -1)}${mac.endsWith('A') ? 'B' : 'A'}` }),
  ]
  for (const q of tries) {
    const res = await fetch(`${stack.svc.url}/login/continue?${q}`, { redirect: 'manual' })
    expect(res.status, q.toString()).toBe(400)
    expect(res.headers.get('refresh'), q.toString()).toBeNull()
    expect(await res.text()).toContain('Sign-in refused')
  }
})
