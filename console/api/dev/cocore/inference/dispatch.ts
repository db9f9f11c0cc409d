/**
 * dev.cocore.inference.dispatch: run one job and stream it as Server-Sent
 * Events (`meta`, `chunk`, `complete`, `error`, as on the network).
 *
 * With `sealed`, the prompt was sealed by the client (the console's chat page
 * or the TypeScript client in src/client/) to the published keys of the
 * providers it chose; the exchange relays ciphertext both ways and `chunk`
 * events carry `ciphertext`. Without it (reference clients), the prompt is
 * sealed on receipt as the OpenAI-compatible API does, and chunks carry text.
 */
import type { Context } from 'hono'
import { streamSSE } from 'hono/streaming'
import { consoleLogger as log } from '../../../../../src/logger.ts'
import type { InferenceDispatchInput } from '../../../../../src/lexicon/generated/types.ts'
import { encodeInput, inputCommitment, type InputFormat } from '../../../../../src/protocol/input.ts'
import { constraintsProblem, type JobConstraints } from '../../../../../src/protocol/job-constraints.ts'
import { InvalidRequestError, MethodNotImplementedError, XrpcError } from '../../../../../src/xrpc/errors.ts'
import { ids } from '../../../../../src/lexicon/generated/ids.ts'
import { admit, AdmissionError } from '../../../../exchange/admission.ts'
import { ExchangeError, type ExchangeEvent, type JobInput, type Route } from '../../../../exchange/exchange.ts'
import { ReceiptSealer } from '../../../../exchange/receipt-sealer.ts'
import { machineId } from '../../../../exchange/gateway.ts'
import { ENC_SCHEMES, isEncScheme, sealedPlaintextBytes, type EncScheme } from '../../../../../src/crypto/enc-scheme.ts'
import { InvalidRecordError } from '../../../../publisher.ts'
import { callerOf, requireScope, type ApiDeps } from '../../../context.ts'

/** Placeholder `prompt` of a sealed request: the lexicon requires the field, and plaintext must not ride along. */
export const SEALED_PROMPT = 'sealed'

const pascal = (code: string) => code.replace(/(^|_)([a-z])/g, (_, __, ch: string) => ch.toUpperCase())

function toXrpc(err: unknown, confidential: boolean): unknown {
  // The request's own values (a ceiling's currency over 8 characters, more tokens than a job may ask for) would make its job record invalid.
  if (err instanceof InvalidRecordError) return new InvalidRequestError(`the job record would be invalid: ${err.message}`)
  if (err instanceof AdmissionError) return new XrpcError(err.code === 'insufficient_quota' ? 429 : 403, pascal(err.code), err.message)
  if (err instanceof ExchangeError) {
    if (confidential && (err.code === 'no_verified_providers' || err.code === 'verified_tier_unavailable')) return new XrpcError(400, 'ConfidentialUnavailable', err.message)
    return new XrpcError(err.status, pascal(err.code), err.message)
  }
  return err
}

export default async function dispatch(deps: ApiDeps, _params: unknown, c: Context, raw?: unknown): Promise<Response> {
  const inference = deps.inference
  if (!inference) throw new MethodNotImplementedError(ids.InferenceDispatch)
  const caller = callerOf(c)
  requireScope(caller, 'inference')
  const input = raw as InferenceDispatchInput
  const confidential = input.requireConfidential === true
  const route: Route = {
    model: input.model,
    requesterDid: caller.did,
    ...(confidential ? { tier: 'verified' as const } : {}),
    ...(input.targetProviderDid ? { targetProviderDid: input.targetProviderDid } : {}),
  }

  let job: Omit<JobInput, 'signal'>
  let open: ((provider: { did: string; key: string }, ciphertext: string, channel: string) => string) | null = null
  let wipe = () => {}
  if (input.sealed) {
    const sealed = input.sealed
    if (input.prompt !== SEALED_PROMPT) throw new InvalidRequestError(`with sealed, prompt must be "${SEALED_PROMPT}": plaintext does not travel with a sealed prompt`)
    for (const scheme of [sealed.scheme, ...sealed.envelopes.map((e) => e.scheme ?? sealed.scheme)]) {
      if (!isEncScheme(scheme)) throw new InvalidRequestError(`unsupported sealing scheme "${scheme}" (${ENC_SCHEMES.join(' or ')})`, 'UnsupportedScheme')
    }
    const format = (sealed.inputFormat ?? 'messages-v1') as InputFormat
    if (format !== 'messages-v1' && format !== 'text') throw new InvalidRequestError(`unknown input format "${sealed.inputFormat}"`)
    if (!/^[0-9a-f]{64}$/.test(sealed.inputCommitment)) throw new InvalidRequestError('inputCommitment is the sha256 hex of the sealed plaintext')
    const envelopes = new Map(sealed.envelopes.map((e) => [machineId(e.providerDid, e.encryptionPubKey), e]))
    route.onlyMachines = [...envelopes.keys()]
    job = {
      route,
      inputCommitment: sealed.inputCommitment,
      inputFormat: format,
      // The prompt's bytes bound its tokens (and the job's ceiling): the largest envelope's plaintext.
      inputBytes: Math.max(...sealed.envelopes.map((e) => sealedPlaintextBytes(e.ciphertext, (e.scheme ?? sealed.scheme) as EncScheme)), 0),
      maxTokensOut: input.maxTokensOut,
      params: {},
      ceiling: input.priceCeiling,
      sealedByRequester: true,
      // Envelopes name the machine (DID and key) they were sealed to; no other machine is tried.
      seal: (p) => {
        const e = envelopes.get(p.machine)
        return e ? { ciphertext: e.ciphertext, requesterPubKey: e.ephemeralPubKey } : null
      },
    }
  } else {
    const plaintext = encodeInput([{ role: 'user', content: input.prompt }])
    const sealer = new ReceiptSealer(plaintext)
    open = (p, ciphertext, channel) => sealer.open(p, ciphertext, channel)
    wipe = () => sealer.wipe()
    job = { route, inputCommitment: inputCommitment(plaintext), inputFormat: 'messages-v1', inputBytes: plaintext.length, maxTokensOut: input.maxTokensOut, params: {}, ceiling: input.priceCeiling, seal: sealer.seal }
  }

  // The job's public constraints, published on its record and sent to the provider (as the network passes them on).
  const constraints: JobConstraints = {
    ...(input.outputSchema ? { outputSchema: input.outputSchema } : {}),
    ...(input.tools?.length ? { tools: input.tools } : {}),
    ...(input.tools?.length && input.toolChoice ? { toolChoice: input.toolChoice } : {}),
    ...(input.tools?.length && input.toolChoiceFunction ? { toolChoiceFunction: input.toolChoiceFunction } : {}),
  }
  const problem = constraintsProblem(constraints)
  if (problem) {
    wipe()
    throw new InvalidRequestError(`the job record could not hold ${problem}`)
  }
  if (constraints.outputSchema || constraints.tools) job.constraints = constraints

  const ac = new AbortController()
  c.req.raw.signal.addEventListener('abort', () => ac.abort())
  let first: IteratorResult<ExchangeEvent>
  const events = inference.exchange.run({ ...job, signal: ac.signal })
  try {
    admit(inference, caller.did)
    inference.exchange.route(route)
    // Routing and publishing errors are plain XRPC errors: the stream starts with the first event.
    first = await events.next()
  } catch (err) {
    wipe()
    throw toXrpc(err, confidential)
  }
  return streamSSE(c, async (s) => {
    s.onAbort(() => ac.abort())
    const send = (event: string, data: unknown) => s.writeSSE({ event, data: JSON.stringify(data) })
    let provider: { did: string; key: string } | null = null
    try {
      for (let next = first; !next.done; next = await events.next()) {
        const e = next.value
        if (e.kind === 'meta') {
          provider = { did: e.providerDid, key: e.encryptionPubKey }
          await send('meta', { jobUri: e.jobUri, jobCid: e.jobCid, authUri: e.authUri, inputCommitment: e.inputCommitment, providerDid: e.providerDid, sessionId: e.sessionId, encryptionPubKey: e.encryptionPubKey, tier: 'best-effort' })
        } else if (e.kind === 'chunk') {
          // The channel as the provider tagged it: the answer, reasoning, or a tool call's JSON fragment.
          const channel = e.channel ?? 'content'
          await send('chunk', open ? { seq: e.seq, channel, text: open(provider!, e.ciphertext, channel) } : { seq: e.seq, channel, ciphertext: e.ciphertext })
        } else {
          inference.usage.add(caller.did, caller.keyId ?? null, { tokensIn: e.tokensIn, tokensOut: e.tokensOut })
          await send('complete', { tokensIn: e.tokensIn, tokensOut: e.tokensOut, finishReason: e.finishReason, receiptUri: e.receiptUri ?? null, tier: 'best-effort' })
        }
      }
    } catch (err) {
      if (ac.signal.aborted) return
      if (!(err instanceof ExchangeError)) log.error('dispatch stream error', { err: err as Error })
      await send('error', err instanceof ExchangeError ? { code: err.code, reason: err.message } : { code: 'internal_error', reason: 'the exchange could not complete this job' })
    } finally {
      await events.return(undefined)
      wipe()
    }
  })
}
