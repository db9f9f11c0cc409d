/** The README and docs/: the generated configuration page is current. */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { configPage } from '../scripts/codegen.ts'

const root = join(import.meta.dirname, '..')
const docsDir = join(root, 'docs')

describe('docs', () => {
  it('docs/configuration.md is what npm run codegen makes of src/config.ts', () => {
    const page = readFileSync(join(docsDir, 'configuration.md'), 'utf8')
    expect(page, 'docs/configuration.md is stale: run npm run codegen').toBe(configPage())
  })
})
