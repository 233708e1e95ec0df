/**
 * PBKDF2 (node:crypto, run on the libuv pool) and QEMU 7.2's iteration calibration for
 * LUKS1 (crypto/pbkdf.c, crypto/block-luks.c):
 *   - qcrypto_pbkdf2_count_iters: run PBKDF2 with 2^15 iterations, and while it takes
 *     no more than 500 ms of CPU, retry with 10x the count (under 100 ms) or the count
 *     scaled to about 1 s; the result is iterations per second of CPU time.
 *   - key slot:   iters = per_sec * iter_time / 1000, at least 1000
 *   - master key digest (20 bytes out): iters = per_sec * iter_time / 1000 / 8, at least
 *     1000 (cryptsetup's /8, so trying all 8 slots' digests costs one iter-time)
 *   - more than UINT32_MAX iterations is an error (the header field is 32 bits).
 * QEMU measures the thread's user CPU time; Node offers the process's, which is the
 * same while the synchronous PBKDF2 below runs on this thread.
 */
import { pbkdf2 as pbkdf2Cb, pbkdf2Sync } from 'node:crypto';
import { hashDigestLength } from './sector-cipher.js';

export const LUKS_MIN_SLOT_KEY_ITERS = 1000;
export const LUKS_MIN_MASTER_KEY_ITERS = 1000;
export const LUKS_DEFAULT_ITER_TIME_MS = 2000;
const UINT32_MAX = 0xffffffff;
const ERANGE_TEXT = 'Numerical result out of range';

/** PBKDF2-HMAC-hash of password; the caller owns (and should zero) the result. */
export async function pbkdf2(hash: string, password: Buffer, salt: Buffer, iterations: number, keyLength: number): Promise<Buffer> {
  checkHash(hash);
  if (!Number.isSafeInteger(iterations) || iterations < 1 || iterations > UINT32_MAX) {
    return Promise.reject(new Error(`PBKDF iterations ${iterations} must be between 1 and ${UINT32_MAX}`));
  }
  return new Promise((resolve, reject) => {
    pbkdf2Cb(password, salt, iterations, keyLength, hash, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

/**
 * Iterations of PBKDF2 per second of CPU time for these inputs (QEMU's
 * qcrypto_pbkdf2_count_iters). Blocks the thread for roughly 0.5 to 1 s.
 */
export function pbkdf2CountIterations(hash: string, password: Buffer, salt: Buffer, keyLength: number): number {
  checkHash(hash);
  let iterations = 1 << 15;
  let deltaMs: number;
  for (;;) {
    const start = process.cpuUsage();
    const out = pbkdf2Sync(password, salt, iterations, keyLength, hash);
    deltaMs = process.cpuUsage(start).user / 1000;
    out.fill(0);
    if (deltaMs <= 0) throw new Error('Unable to get accurate CPU usage');
    if (deltaMs > 500) break;
    iterations = deltaMs < 100 ? iterations * 10 : Math.floor((iterations * 1000) / deltaMs);
  }
  return Math.floor((iterations * 1000) / deltaMs);
}

/** Measures iterations per second; injectable so callers (and tests) can fix or cache it. */
export type PbkdfCalibrator = (hash: string, password: Buffer, salt: Buffer, keyLength: number) => number | Promise<number>;

export const defaultCalibrator: PbkdfCalibrator = pbkdf2CountIterations;

/** Key slot iterations for iterTime ms at itersPerSec, as QEMU's qcrypto_block_luks_store_key. */
export function luksSlotIterations(itersPerSec: number, iterTimeMs: number): number {
  const iters = scale(itersPerSec, iterTimeMs);
  return Math.max(iters, LUKS_MIN_SLOT_KEY_ITERS);
}

/** Master key digest iterations for iterTime ms, as QEMU's qcrypto_block_luks_create. */
export function luksMasterKeyIterations(itersPerSec: number, iterTimeMs: number): number {
  const iters = scaleBig(itersPerSec, iterTimeMs) / 8n;
  if (iters > BigInt(UINT32_MAX)) throw new Error(`PBKDF iterations ${iters} larger than ${UINT32_MAX}: ${ERANGE_TEXT}`);
  return Math.max(Number(iters), LUKS_MIN_MASTER_KEY_ITERS);
}

function scale(itersPerSec: number, iterTimeMs: number): number {
  const iters = scaleBig(itersPerSec, iterTimeMs);
  if (iters > BigInt(UINT32_MAX)) throw new Error(`PBKDF iterations ${iters} larger than ${UINT32_MAX}: ${ERANGE_TEXT}`);
  return Number(iters);
}

/** per_sec * iter_time / 1000 in 64-bit unsigned arithmetic, refusing overflow as QEMU does. */
function scaleBig(itersPerSec: number, iterTimeMs: number): bigint {
  if (!Number.isSafeInteger(itersPerSec) || itersPerSec < 0) throw new Error(`Invalid PBKDF rate ${itersPerSec}`);
  if (!Number.isSafeInteger(iterTimeMs) || iterTimeMs < 0) throw new Error(`Invalid iter-time ${iterTimeMs}`);
  const ips = BigInt(itersPerSec);
  const t = BigInt(iterTimeMs);
  if (t > 0n && ips > 0xffffffffffffffffn / t) {
    throw new Error(`PBKDF iterations ${ips} too large to scale: ${ERANGE_TEXT}`);
  }
  return (ips * t) / 1000n;
}

function checkHash(hash: string): void {
  try {
    hashDigestLength(hash);
  } catch {
    throw new Error(`PBKDF does not support hash algorithm ${hash}`);
  }
}
