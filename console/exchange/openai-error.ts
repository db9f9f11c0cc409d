/** OpenAI error objects, as the OpenAI-compatible API answers them (the SDKs read `code` and `param`). */

export type ErrorType =
  | 'invalid_request_error'
  | 'authentication_error'
  | 'permission_error'
  | 'rate_limit_error'
  | 'insufficient_quota'
  | 'not_found_error'
  | 'service_unavailable_error'
  | 'server_error'

export class OpenAiError extends Error {
  override name = 'OpenAiError'
  readonly status: number
  readonly type: ErrorType
  readonly code: string
  readonly param: string | null
  readonly retryAfterSec?: number
  constructor(status: number, type: ErrorType, code: string, message: string, param: string | null = null, retryAfterSec?: number) {
    super(message)
    this.status = status
    this.type = type
    this.code = code
    this.param = param
    this.retryAfterSec = retryAfterSec
  }
  toJSON() {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } }
  }
}

/** A 400 naming the request field at fault. */
export const invalid = (message: string, param: string | null, code = 'invalid_value') => new OpenAiError(400, 'invalid_request_error', code, message, param)
