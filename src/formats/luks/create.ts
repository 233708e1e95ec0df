/**
 * `create -f luks` and `measure -O luks`, as qemu-img 7.2: preallocation first, the
 * algorithm names (QAPI enums), the key secret, QEMU's algorithm checks, then a LUKS1
 * header with key slot 0 and the payload area reserved (sparse unless preallocated;
 * unwritten payload decrypts to noise in QEMU too). Nothing of the key or passphrase
 * outlives the call.
 */
import type { FileHandle } from 'node:fs/promises';
import type { CreateContext } from '../../core/driver.js';
import { QimgError } from '../../core/errors.js';
import type { OptionValue } from '../../core/options.js';
import { createLuks1 } from '../../crypto/luks1.js';
import { defaultCalibrator, type PbkdfCalibrator } from '../../crypto/pbkdf.js';
import { allocateFile } from '../../io/allocate.js';
import { checkNewFileLength, writeNewFile } from '../../io/new-file.js';
import { truncateFile } from '../../io/file.js';
import { asQimg } from './options.js';
import { requireSecret } from '../../core/secrets.js';
import { checkSpecAlgorithms, ivgenCipherOf, parseLuksSpec, unavailableCipher, type LuksSpec } from './spec.js';

const U64_MAX = (1n << 64n) - 1n;
const ERANGE_TEXT = 'Numerical result out of range';

/** preallocation as qemu's luks driver takes it: metadata means off. */
function preallocationOf(o: Map<string, OptionValue>): 'off' | 'falloc' | 'full' {
  const p = (o.get('preallocation') as string | undefined) ?? 'off';
  if (p === 'metadata' || p === 'off') return 'off';
  if (p === 'falloc' || p === 'full') return p;
  throw new QimgError(`invalid parameter value: ${p}`);
}

/** Options, key secret and algorithms checked in qemu's order; the caller zeroes `passphrase`. */
function prepare(options: Map<string, OptionValue>, ctx: CreateContext | undefined): { spec: LuksSpec; passphrase: Buffer } {
  const parsed = parseLuksSpec(options);
  const passphrase = requireSecret(ctx?.secrets, options.get('key-secret') as string | undefined, 'key-secret');
  try {
    return { spec: checkSpecAlgorithms(parsed), passphrase };
  } catch (err) {
    passphrase.fill(0);
    throw err;
  }
}

/**
 * QEMU's calibration, refusing an iter-time whose product with the measured rate does
 * not fit 64 bits with its message (the iteration helpers take only safe integers).
 */
export function calibratorFor(iterTime: bigint, calibrate: PbkdfCalibrator): PbkdfCalibrator {
  return async (hash, password, salt, keyLength) => {
    const perSec = await calibrate(hash, password, salt, keyLength);
    if (iterTime > 0n && BigInt(perSec) > U64_MAX / iterTime) {
      throw new QimgError(`PBKDF iterations ${perSec} too large to scale: ${ERANGE_TEXT}`);
    }
    return perSec;
  };
}

export interface LuksCreateHooks {
  /** PBKDF2 speed measurement (tests pass a fixed one); QEMU's by default */
  calibrate?: PbkdfCalibrator;
}

export async function createLuksImage(
  path: string,
  size: number,
  options: Map<string, OptionValue>,
  ctx?: CreateContext,
  hooks: LuksCreateHooks = {},
): Promise<void> {
  const prealloc = preallocationOf(options);
  const { spec, passphrase } = prepare(options, ctx);
  try {
    // serpent, twofish (and cast5 without OpenSSL's legacy provider): before any file exists
    const missing = unavailableCipher(spec.cipherAlg) ?? unavailableCipher(ivgenCipherOf(spec));
    if (missing) throw new QimgError(missing);
    // an iter-time beyond 2^53 can only overflow; the helpers need a safe integer
    const iterTime = spec.iterTime > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(spec.iterTime);
    // an existing file stays as it is when the file system refuses the length
    await checkNewFileLength(path, BigInt(spec.payloadOffset) + BigInt(size)).catch((err: unknown) => {
      const code = (err as NodeJS.ErrnoException).code;
      throw code === 'EFBIG' || code === 'EINVAL' ? new QimgError('The requested file size is too large') : err;
    });
    await writeNewFile(
      path,
      async (handle) => {
        const vol = await createLuks1(handleWriter(handle), {
          passphrase,
          cipherAlg: spec.cipherAlg,
          cipherMode: spec.cipherMode,
          ivgenAlg: spec.ivgenAlg,
          ivgenHashAlg: spec.ivgenHashAlg,
          hashAlg: spec.hashAlg,
          iterTime,
          calibrate: calibratorFor(spec.iterTime, hooks.calibrate ?? defaultCalibrator),
          // QEMU's initfunc: the file becomes header area + payload, preallocated as asked
          init: (payloadOffset) => reserve(handle, payloadOffset + size, prealloc),
        });
        vol.masterKey.fill(0);
        await handle.datasync();
      },
      asQimg,
    );
  } finally {
    passphrase.fill(0);
  }
}

async function reserve(handle: FileHandle, length: number, prealloc: 'off' | 'falloc' | 'full'): Promise<void> {
  try {
    await truncateFile(handle, length);
  } catch (err) {
    // a length the file system (EFBIG) or off_t (EINVAL) cannot take, as qemu words it
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EFBIG' || code === 'EINVAL') throw new QimgError('The requested file size is too large');
    throw err;
  }
  if (prealloc === 'falloc') await allocateFile(handle.fd, length);
  if (prealloc === 'full') {
    const zeros = Buffer.alloc(Math.min(length, 4 * 1024 * 1024));
    for (let p = 0; p < length; p += zeros.length) await handle.write(zeros, 0, Math.min(zeros.length, length - p), p);
  }
}

function handleWriter(handle: FileHandle): (offset: number, buf: Buffer) => Promise<void> {
  return async (offset, buf) => {
    for (let done = 0; done < buf.length; ) {
      const { bytesWritten } = await handle.write(buf, done, buf.length - done, offset + done);
      done += bytesWritten;
    }
  };
}

/**
 * `measure -O luks`: header area + the size as given (QEMU's block_crypto_measure makes
 * the header in memory; only its layout matters, so no PBKDF runs here). The key secret
 * must still be given and exist, as in QEMU.
 */
export async function measureLuks(virtualSize: bigint, options: Map<string, OptionValue>, ctx?: CreateContext): Promise<{ required: bigint; fullyAllocated: bigint }> {
  const { spec, passphrase } = prepare(options, ctx);
  passphrase.fill(0);
  const required = BigInt(spec.payloadOffset) + virtualSize;
  return { required, fullyAllocated: required };
}
