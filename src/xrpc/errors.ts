/**
 * Typed XRPC errors. Each maps to one HTTP status and serializes as the XRPC
 * error body `{ error, message }`.
 */
export class XrpcError extends Error {
  readonly status: number
  readonly error: string
  constructor(status: number, error: string, message: string) {
    super(message)
    this.status = status
    this.error = error
  }
  toJSON() {
    return { error: this.error, message: this.message }
  }
}

export class InvalidRequestError extends XrpcError {
  override name = 'InvalidRequestError'
  constructor(message: string, error = 'InvalidRequest') {
    super(400, error, message)
  }
}

export class NotFoundError extends XrpcError {
  override name = 'NotFoundError'
  constructor(message: string) {
    super(404, 'NotFound', message)
  }
}

export class AuthRequiredError extends XrpcError {
  override name = 'AuthRequiredError'
  constructor(message = 'Authentication required', error = 'AuthenticationRequired') {
    super(401, error, message)
  }
}

export class ForbiddenError extends XrpcError {
  override name = 'ForbiddenError'
  constructor(message: string, error = 'Forbidden') {
    super(403, error, message)
  }
}

export class RateLimitExceededError extends XrpcError {
  override name = 'RateLimitExceededError'
  readonly retryAfterSec: number
  constructor(retryAfterSec: number) {
    super(429, 'RateLimitExceeded', `Rate limit exceeded; retry after ${retryAfterSec} s`)
    this.retryAfterSec = retryAfterSec
  }
}

export class MethodNotImplementedError extends XrpcError {
  override name = 'MethodNotImplementedError'
  constructor(nsid: string) {
    super(501, 'MethodNotImplemented', `Method not implemented: ${nsid}`)
  }
}

export class PayloadTooLargeError extends XrpcError {
  override name = 'PayloadTooLargeError'
  constructor(message = 'Request body too large') {
    super(413, 'PayloadTooLarge', message)
  }
}

export class InternalServerError extends XrpcError {
  override name = 'InternalServerError'
  constructor(message = 'Internal server error') {
    super(500, 'InternalServerError', message)
  }
}
