/** The README and docs/: the generated configuration page is current, and every link lands. */
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { dirname, join, relative } from 'node:path'
import { describe, expect, it } from 'vitest'
import { configPage } from '../scripts/codegen.ts'

const root = join(import.meta.dirname, '..')
const docsDir = join(root, 'docs')
const pages = [join(root, 'README.md'), ...readdirSync(docsDir).filter((f) => f.endsWith('.md')).map((f) => join(docsDir, f))]

/** Text outside fenced code blocks and inline code, where links are links. */
const prose = (md: string) => md.replace(/^```[\s\S]*?^```/gm, '').replace(/`[^`\n]*`/g, '')

/** GitHub's heading anchors: lowercased, punctuation dropped, spaces to hyphens, repeats numbered. */
function anchors(md: string): Set<string> {
  const seen = new Map<string, number>()
  const out = new Set<string>()
  for (const [, text] of md.replace(/^```[\s\S]*?^```/gm, '').matchAll(/^#{1,6}\s+(.+?)\s*#*\s*$/gm)) {
    const slug = text!
      .replace(/\[([^\]]*)\]\([^)]*\)/g, '$1')
      .toLowerCase()
      .replace(/[^\p{L}\p{N}\s_-]/gu, '')
      .replace(/\s/g, '-')
    const n = seen.get(slug) ?? 0
    seen.set(slug, n + 1)
    out.add(n ? `${slug}-${n}` : slug)
  }
  return out
}

describe('docs', () => {
  it('docs/configuration.md is what npm run codegen makes of src/config.ts', () => {
    const page = readFileSync(join(docsDir, 'configuration.md'), 'utf8')
    expect(page, 'docs/configuration.md is stale: run npm run codegen').toBe(configPage())
  })

  it('every relative link in the README and docs/ names a file that exists, and an anchor it has', () => {
    const broken: string[] = []
    for (const page of pages) {
      const md = readFileSync(page, 'utf8')
      for (const [, target] of prose(md).matchAll(/\]\(([^)\s]+)\)/g)) {
        if (/^[a-z][a-z+.-]*:/i.test(target!)) continue
        const [path, anchor] = target!.split('#') as [string, string | undefined]
        const file = path ? join(dirname(page), decodeURI(path)) : page
        const where = `${relative(root, page)}: ${target}`
        if (!existsSync(file)) broken.push(`${where} (no such file)`)
        else if (anchor !== undefined && (!file.endsWith('.md') || !anchors(readFileSync(file, 'utf8')).has(anchor))) broken.push(`${where} (no such anchor)`)
      }
    }
    expect(broken).toEqual([])
  })

  it('keeps the README short: the detail lives in docs/', () => {
    expect(readFileSync(join(root, 'README.md'), 'utf8').split('\n').length).toBeLessThan(200)
  })
})
