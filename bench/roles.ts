/**
 * A benchmark's system as child processes on loopback, one per role (the
 * network, the exchange, a provider...), as deployed: each role is started by
 * a function in its own process (fork of the bench script with `--role
 * <name>`), reports what the orchestrator needs (`info`), answers method calls
 * over IPC and stops on `close`. `inProcess` runs the same role in the calling
 * process instead, behind the same interface.
 */
import { fork, type ChildProcess } from 'node:child_process'

/** A started role: what it tells the orchestrator, what it can be asked, and how it stops. */
export interface Role<I, M extends Record<string, (...a: never[]) => Promise<unknown>>> {
  info: I
  methods: M
  close(): Promise<void>
}

export type RoleTable = Record<string, (params: any) => Promise<Role<unknown, any>>>

type Msg = { id: number; method: string; args: unknown[] } | { id: number; result?: unknown; error?: string } | { ready: unknown } | { failed: string }

/** The role's parameters travel in the environment of its process. */
const PARAMS_ENV = 'BENCH_ROLE_PARAMS'

/** In a child process: start the role named on the command line, answer calls, stop on `close`. */
export async function serveRole(roles: RoleTable, name: string): Promise<void> {
  const params = JSON.parse(process.env[PARAMS_ENV] ?? '{}') as never
  const send = (m: Msg) => process.send!(m)
  // The orchestrator is gone: so is this process (also while the role is still starting).
  process.on('disconnect', () => process.exit(0))
  let role: Role<unknown, Record<string, (...a: unknown[]) => Promise<unknown>>>
  try {
    role = (await roles[name]!(params)) as typeof role
  } catch (err) {
    send({ failed: (err as Error).stack ?? String(err) })
    process.exit(1)
  }
  process.on('message', (m: { id: number; method: string; args: unknown[] }) => {
    const run = m.method === 'close' ? role.close() : role.methods[m.method]!(...m.args)
    run.then(
      (result) => {
        send({ id: m.id, result })
        if (m.method === 'close') process.disconnect()
      },
      (err: Error) => send({ id: m.id, error: err.stack ?? String(err) }),
    )
  })
  send({ ready: role.info })
}

/** Starts a role in a child process running `script` (which calls serveRole), or in this one; the same interface either way. */
export async function startRole<T extends RoleTable, N extends keyof T & string>(
  script: string,
  roles: T,
  name: N,
  params: unknown,
  inProcess: boolean,
): Promise<Awaited<ReturnType<T[N]>> & { pid: number }> {
  type R = Awaited<ReturnType<T[N]>>
  if (inProcess) return Object.assign((await roles[name]!(params)) as R, { pid: process.pid })
  const child: ChildProcess = fork(script, ['--role', name], { env: { ...process.env, [PARAMS_ENV]: JSON.stringify(params) }, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  const pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>()
  let next = 0
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  child.once('exit', (code) => {
    for (const p of pending.values()) p.reject(new Error(`the ${name} process exited (${code})`))
    pending.clear()
  })
  const info = await new Promise<unknown>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`the ${name} process exited (${code}) before it was ready`)))
    child.on('message', (m: Msg) => {
      if ('ready' in m) return resolve(m.ready)
      if ('failed' in m) return reject(new Error(`the ${name} process failed to start: ${m.failed}`))
      if ('id' in m && !('method' in m)) {
        const p = pending.get(m.id)
        pending.delete(m.id)
        if (m.error !== undefined) p?.reject(new Error(`${name}: ${m.error}`))
        else p?.resolve(m.result)
      }
    })
  })
  const call = (method: string, ...a: unknown[]) =>
    new Promise<unknown>((resolve, reject) => {
      const id = next++
      pending.set(id, { resolve, reject })
      child.send({ id, method, args: a })
    })
  const methods = new Proxy({}, { get: (_, method: string) => (...a: unknown[]) => call(method, ...a) })
  return {
    info,
    methods,
    close: async () => {
      if (child.exitCode === null) await call('close').catch(() => undefined)
      await exited
    },
    pid: child.pid!,
  } as unknown as R & { pid: number }
}
