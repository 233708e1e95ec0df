/**
 * Decompression of qcow2 compressed clusters: raw deflate (zlib type) or zstd frames.
 * Input is sector-rounded, so trailing bytes after the stream are ignored; a cluster
 * is good when exactly one cluster of output was produced, as QEMU requires.
 */
import { createRequire } from 'node:module';
import { Decompress as ZstdStream } from 'fzstd';
import { COMPRESSION_ZSTD } from './constants.js';
import { zlib } from '../../core/lazy-builtins.js';

export class DecompressError extends Error {}

export function decompressCluster(type: number, input: Buffer, clusterSize: number): Buffer {
  return type === COMPRESSION_ZSTD ? zstdCluster(input, clusterSize) : deflateCluster(input, clusterSize);
}

function deflateCluster(input: Buffer, clusterSize: number): Buffer {
  let out: Buffer;
  try {
    // Z_SYNC_FLUSH: a stream cut short is not an error by itself; the length check decides.
    out = zlib().inflateRawSync(input, { finishFlush: zlib().constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') {
      // More output than a cluster: QEMU takes the first cluster of it.
      return inflateFirst(input, clusterSize);
    }
    throw new DecompressError(`Could not decompress cluster: ${(err as Error).message}`);
  }
  if (out.length !== clusterSize) throw new DecompressError('Could not decompress cluster: short output');
  return out;
}

/** The first `clusterSize` bytes of an over-long stream, chunk by chunk. */
function inflateFirst(input: Buffer, clusterSize: number): Buffer {
  // Decode growing prefixes of the input until one yields a full cluster.
  for (let n = 512; ; n = Math.min(input.length, n * 2)) {
    try {
      const out = zlib().inflateRawSync(input.subarray(0, n), { finishFlush: zlib().constants.Z_SYNC_FLUSH, maxOutputLength: 16 * clusterSize });
      if (out.length >= clusterSize) return out.subarray(0, clusterSize);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ERR_BUFFER_TOO_LARGE') {
        throw new DecompressError(`Could not decompress cluster: ${(err as Error).message}`);
      }
    }
    if (n >= input.length) throw new DecompressError('Could not decompress cluster');
  }
}

/**
 * zstd frames come from the image: they are checked before they are decoded (found by
 * the fuzzer). With libzstd (QEMU's decoder, loaded through koffi) every frame is
 * decoded as QEMU decodes it, corruption detected the same way; the window may be what
 * QEMU's default allows (128 MiB). Without it (another platform, QIMG_NO_NATIVE=1) fzstd
 * decodes, which allocates the whole window a frame header asks for (up to 2 GiB) and
 * moves all of it for every block, so that a hostile frame took seconds and gigabytes
 * per cluster: there the window is at most 8 MiB (qcow2 writers use the cluster size)
 * and the window bytes moved per cluster are bounded. fzstd also misses some corruption
 * that libzstd detects (it returns garbage where QEMU reports an I/O error).
 */
const ZSTD_MAX_WINDOW_NATIVE = 2 ** 27 + 1;
const ZSTD_MAX_WINDOW_JS = 8 * 1024 * 1024;
const ZSTD_MAX_BLOCK = 128 * 1024;
/** Window bytes fzstd may move per cluster (a real 2 MiB cluster needs ~40 MiB)... */
const ZSTD_MAX_WORK = 256 * 1024 * 1024;
/** ...where each frame counts as this much (so that frames are bounded too). */
const ZSTD_FRAME_WORK = 64 * 1024;
const ZSTD_MAGIC = 0xfd2fb528;

/** Decodes one whole frame into dst: bytes produced, or libzstd's error name. */
type ZstdFrameDecoder = (dst: Buffer, frame: Buffer) => number | string;
let nativeZstd: ZstdFrameDecoder | null | undefined;

function loadNativeZstd(): ZstdFrameDecoder | null {
  if (nativeZstd !== undefined) return nativeZstd;
  nativeZstd = null;
  if (process.env.QIMG_NO_NATIVE === '1') return nativeZstd;
  try {
    const koffi = createRequire(import.meta.url)('koffi');
    const lib = koffi.load('libzstd.so.1');
    const decompress = lib.func('size_t ZSTD_decompress(void *dst, size_t dstCapacity, const void *src, size_t srcSize)');
    const isError = lib.func('unsigned int ZSTD_isError(size_t code)');
    const errorName = lib.func('const char *ZSTD_getErrorName(size_t code)');
    nativeZstd = (dst, frame) => {
      const n = decompress(dst, dst.length, frame, frame.length);
      return isError(n) ? String(errorName(n)) : Number(n);
    };
  } catch {
    nativeZstd = null;
  }
  return nativeZstd;
}

/** Tests: decode with fzstd (false) or libzstd again (true), as without / with libzstd. */
export function useNativeZstdForTests(on: boolean): void {
  nativeZstd = on ? undefined : null;
}

/** Thrown from fzstd's output callback when a frame gives more than the cluster holds. */
const OVERFLOW = new Error('overflow');

function zstdFail(why: string): never {
  throw new DecompressError(`Could not decompress cluster: ${why}`);
}

/** Little-endian unsigned integer of `n` bytes (exact below 2^53, large enough above). */
function readLE(buf: Buffer, pos: number, n: number): number {
  let v = 0;
  for (let i = n - 1; i >= 0; i--) v = v * 256 + buf[pos + i];
  return v;
}

interface FrameLimits {
  maxWindow: number;
  /** bound fzstd's work (window bytes moved per block) */
  countWork: boolean;
}

/**
 * Length of the zstd frame (or skippable frame) at `pos`, after checking that its
 * header and block headers lie inside `input` and stay within `limits`.
 */
function zstdFrameLength(input: Buffer, pos: number, budget: { work: number }, limits: FrameLimits): { length: number; skippable: boolean } {
  const truncated = () => zstdFail('truncated zstd frame');
  if (pos + 8 > input.length) truncated();
  budget.work += ZSTD_FRAME_WORK;
  const magic = input.readUInt32LE(pos);
  if ((magic & 0xfffffff0) >>> 0 === 0x184d2a50) return { length: 8 + input.readUInt32LE(pos + 4), skippable: true };
  if (magic !== ZSTD_MAGIC) zstdFail('invalid zstd data');
  const fhd = input[pos + 4];
  if (fhd & 8) zstdFail('invalid zstd data');
  const single = (fhd >> 5) & 1;
  let p = pos + 5;
  let window = 0;
  if (!single) {
    const wd = input[p++];
    const base = 2 ** (10 + (wd >> 3));
    window = base + (base / 8) * (wd & 7);
  }
  const dictBytes = [0, 1, 2, 4][fhd & 3];
  const fcsBytes = [single, 2, 4, 8][fhd >> 6];
  if (p + dictBytes + fcsBytes > input.length) truncated();
  if (readLE(input, p, dictBytes) !== 0) zstdFail('zstd dictionary required');
  p += dictBytes;
  const fcs = readLE(input, p, fcsBytes) + (fcsBytes === 2 ? 256 : 0);
  p += fcsBytes;
  if (single) window = fcs;
  if (window > limits.maxWindow) zstdFail(`zstd window of ${window} bytes is too large`);
  const blockMax = Math.min(window, ZSTD_MAX_BLOCK);
  for (;;) {
    if (p + 3 > input.length) truncated();
    const h = input[p] | (input[p + 1] << 8) | (input[p + 2] << 16);
    p += 3;
    const type = (h >> 1) & 3;
    const size = h >>> 3;
    if (type === 3 || size > blockMax) zstdFail('invalid zstd data');
    p += type === 1 ? 1 : size;
    if (p > input.length) truncated();
    if (limits.countWork) {
      budget.work += window;
      if (budget.work > ZSTD_MAX_WORK) zstdFail('too many zstd blocks');
    }
    if (h & 1) break;
  }
  if ((fhd >> 2) & 1) p += 4; // content checksum
  if (p > input.length) truncated();
  return { length: p - pos, skippable: false };
}

/**
 * One cluster from zstd frames: frames are decoded one after the other until the
 * cluster is full; what follows then is the next cluster's data (input is sector
 * rounded) and is not looked at. As in QEMU, the frame that fills the cluster must end
 * there: a frame with more data than the cluster is an error (QEMU: EIO).
 */
function zstdCluster(input: Buffer, clusterSize: number): Buffer {
  const native = loadNativeZstd();
  const limits: FrameLimits = native
    ? { maxWindow: ZSTD_MAX_WINDOW_NATIVE, countWork: false }
    : { maxWindow: ZSTD_MAX_WINDOW_JS, countWork: true };
  const out = Buffer.alloc(clusterSize);
  let filled = 0;
  const budget = { work: 0 };
  for (let pos = 0; filled < clusterSize && pos < input.length; ) {
    const frame = zstdFrameLength(input, pos, budget, limits);
    const bytes = input.subarray(pos, pos + frame.length);
    pos += frame.length;
    if (frame.skippable) continue;
    if (native) {
      const n = native(out.subarray(filled), bytes);
      if (typeof n === 'string') zstdFail(/too small/i.test(n) ? 'more data than a cluster' : n);
      filled += n;
      continue;
    }
    const stream = new ZstdStream((chunk: Uint8Array) => {
      if (chunk.length > clusterSize - filled) throw OVERFLOW;
      out.set(chunk, filled);
      filled += chunk.length;
    });
    try {
      stream.push(bytes, true);
    } catch (err) {
      zstdFail(err === OVERFLOW ? 'more data than a cluster' : (err as Error).message);
    }
  }
  if (filled !== clusterSize) zstdFail('short output');
  return out;
}
