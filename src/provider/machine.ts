/**
 * What the provider states about its machine, on Linux: the hardware and OS
 * facts of its provider record, and the hashes of its attestation. Nothing
 * here is hardware-backed (trust level self-attested); the hashes let anyone
 * see when the machine or the agent's code changed.
 */
import { readFileSync, readdirSync } from 'node:fs'
import { cpus, hostname, machine, release, totalmem, type } from 'node:os'
import { fileURLToPath } from 'node:url'
import { join } from 'node:path'
import { sha256Hex } from '../crypto/p256.ts'

export interface MachineFacts {
  chip: string
  ramGB: number
  cpuCores: number
  /** Distribution name and version, e.g. "Debian GNU/Linux 12 (bookworm)". */
  os: string
  /** Kernel, e.g. "Linux 6.8.0-45-generic". */
  osVersion: string
  hardwareModel: string
  /** The machine's stable identity (machine-id, else the hostname); only ever published hashed with the DID. */
  machineId: string
  /** sha256 hex over the agent's own code: the modules that see prompts and hold keys. */
  binaryHash: string
}

const MAX = 64
const readTrimmed = (path: string): string | null => {
  try {
    return readFileSync(path, 'utf8').trim() || null
  } catch {
    return null
  }
}

function distribution(): string | null {
  const text = readTrimmed('/etc/os-release')
  const m = text?.match(/^PRETTY_NAME="?([^"\n]*)"?$/m)
  return m?.[1] || null
}

/**
 * The code the attestation vouches for: every module under src/provider,
 * src/protocol and src/crypto, by path and content, in a fixed order. An
 * interpreted agent has no single executable, so this stands for the
 * lexicon's "provider executable".
 */
function codeHash(): string {
  const src = fileURLToPath(new URL('..', import.meta.url))
  const parts: string[] = []
  for (const dir of ['provider', 'protocol', 'crypto']) {
    for (const name of readdirSync(join(src, dir)).filter((f) => f.endsWith('.ts')).sort()) {
      parts.push(`${dir}/${name}\0${readFileSync(join(src, dir, name), 'utf8')}\0`)
    }
  }
  return sha256Hex(parts.join(''))
}

export function machineFacts(): MachineFacts {
  const cpuList = cpus()
  return {
    chip: (cpuList[0]?.model.trim() || machine()).slice(0, MAX),
    ramGB: Math.max(1, Math.round(totalmem() / 2 ** 30)),
    cpuCores: Math.max(1, cpuList.length),
    os: (distribution() ?? `${type()} ${release()}`).slice(0, MAX),
    osVersion: `${type()} ${release()}`.slice(0, MAX),
    hardwareModel: (readTrimmed('/sys/class/dmi/id/product_name') ?? machine()).slice(0, MAX),
    machineId: readTrimmed('/etc/machine-id') ?? readTrimmed('/var/lib/dbus/machine-id') ?? hostname(),
    binaryHash: codeHash(),
  }
}

/** sha256 hex of the machine identity followed by the owner's DID: stable per machine and owner, unlinkable across owners. */
export const machineFingerprint = (facts: MachineFacts, did: string): string => sha256Hex(facts.machineId + did)
