/**
 * The provider agent's logger: the shared JSON logger under the name
 * "provider" (src/logger.ts declares no provider child yet; the line's `name`
 * field is taken from the fields given, so the output is the same).
 *
 * The privacy policy promises prompt and reply content is never logged: only
 * session ids, DIDs, URIs, counts and error classes go into these lines.
 */
import { devLogger, type Logger } from '../logger.ts'

const named = (name: string): Logger => ({
  debug: (msg, fields) => devLogger.debug(msg, { ...fields, name }),
  info: (msg, fields) => devLogger.info(msg, { ...fields, name }),
  warn: (msg, fields) => devLogger.warn(msg, { ...fields, name }),
  error: (msg, fields) => devLogger.error(msg, { ...fields, name }),
})

export const log = named('provider')
