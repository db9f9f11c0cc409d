/**
 * Loggers are declared here, one child per subsystem. Lines are JSON on
 * stderr. Nothing user-private is ever logged: no prompt, reply, token or key.
 */
const LEVELS = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 } as const
export type Level = keyof typeof LEVELS

let threshold: number = LEVELS[(process.env.COCORE_LOG_LEVEL as Level) ?? 'info'] ?? LEVELS.info

export function setLogLevel(level: string): void {
  threshold = LEVELS[level as Level] ?? LEVELS.info
}

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void
  info(msg: string, fields?: Record<string, unknown>): void
  warn(msg: string, fields?: Record<string, unknown>): void
  error(msg: string, fields?: Record<string, unknown>): void
}

function make(name: string): Logger {
  const emit = (level: Exclude<Level, 'silent'>) => (msg: string, fields?: Record<string, unknown>) => {
    if (LEVELS[level] < threshold) return
    const line: Record<string, unknown> = { t: new Date().toISOString(), level, name, msg, ...fields }
    if (fields?.err instanceof Error) line.err = { name: fields.err.name, message: fields.err.message, cause: String(fields.err.cause ?? '') || undefined }
    process.stderr.write(JSON.stringify(line) + '\n')
  }
  return { debug: emit('debug'), info: emit('info'), warn: emit('warn'), error: emit('error') }
}

export const indexerLogger = make('indexer')
export const appviewLogger = make('appview')
export const consoleLogger = make('console')
export const devLogger = make('dev')
