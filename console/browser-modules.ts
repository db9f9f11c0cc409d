/**
 * Serves the few source modules the console's pages run in the browser, so
 * the browser seals with the very code the TypeScript client and the
 * provider use (src/crypto/seal.ts, seal-ecies.ts), not a copy: `.ts` files with their
 * types stripped by Node, and the @noble packages they import, with bare
 * specifiers rewritten to this route. Only the listed files and packages are
 * served; nothing is bundled or built.
 */
import { readFileSync } from 'node:fs'
import { stripTypeScriptTypes } from 'node:module'
import { dirname, join, normalize, sep } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Hono } from 'hono'

export const MODULES_PATH = '/static/m'

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..')
/** Files and directories (ending in /) a page may load, relative to the repo root. */
const ALLOWED = [
  'console/browser/',
  'src/client/',
  'src/crypto/seal.ts',
  'src/crypto/seal-ecies.ts',
  'src/crypto/enc-scheme.ts',
  'src/crypto/canonical-json.ts',
  'src/protocol/input.ts',
  'src/lexicon/generated/ids.ts',
  'node_modules/@noble/ciphers/',
  'node_modules/@noble/curves/',
  'node_modules/@noble/hashes/',
]

const allowed = (rel: string) => !rel.includes('..') && ALLOWED.some((a) => (a.endsWith('/') ? rel.startsWith(a) : rel === a)) && /\.(ts|js)$/.test(rel)

/** `from '@noble/x/y.js'` and `import('@noble/...')` to this route. */
const rewriteBare = (code: string) => code.replace(/(from\s*|import\s*\(\s*|import\s+)(['"])@noble\//g, `$1$2${MODULES_PATH}/node_modules/@noble/`)

export function browserModules(): Hono {
  const cache = new Map<string, string>()
  const app = new Hono()
  app.get(`${MODULES_PATH}/*`, (c) => {
    const rel = normalize(c.req.path.slice(MODULES_PATH.length + 1)).split(sep).join('/')
    if (!allowed(rel)) return c.text('not found', 404)
    let code = cache.get(rel)
    if (code === undefined) {
      let source: string
      try {
        source = readFileSync(join(ROOT, rel), 'utf8')
      } catch {
        return c.text('not found', 404)
      }
      code = rewriteBare(rel.endsWith('.ts') ? stripTypeScriptTypes(source) : source)
      cache.set(rel, code)
    }
    c.header('Content-Type', 'text/javascript; charset=utf-8')
    return c.body(code)
  })
  return app
}
