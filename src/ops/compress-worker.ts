/**
 * Worker thread body for convert -c: compresses one cluster as the target stores it,
 * raw deflate with a 12-bit window (qcow2's zlib type), a zlib stream (RFC 1950, as
 * VMDK grains) or a zstd frame. Returns null when the result would not be smaller than
 * the cluster (it is then stored uncompressed), unless the target always compresses.
 */
import { deflateRawSync, deflateSync } from 'node:zlib';
import { createRequire } from 'node:module';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { Piscina } from 'piscina';

export interface CompressTask {
  data: Uint8Array;
  algorithm: 'deflate' | 'zlib' | 'zstd';
  clusterSize: number;
  /** keep the compressed form even when it is not smaller */
  always?: boolean;
}

type ZstdCompress = (src: Uint8Array) => Uint8Array;
let zstd: ZstdCompress | null = null;

function loadZstd(): ZstdCompress {
  if (zstd) return zstd;
  const require = createRequire(import.meta.url);
  let lib;
  try {
    const koffi = require('koffi');
    lib = koffi.load('libzstd.so.1');
    const bound = lib.func('size_t ZSTD_compressBound(size_t srcSize)');
    const compress = lib.func('size_t ZSTD_compress(void *dst, size_t dstCapacity, const void *src, size_t srcSize, int level)');
    const isError = lib.func('unsigned int ZSTD_isError(size_t code)');
    zstd = (src) => {
      const dst = Buffer.allocUnsafe(Number(bound(src.length)));
      const n = compress(dst, dst.length, src, src.length, 3);
      if (isError(n)) throw new Error('zstd compression failed');
      return dst.subarray(0, Number(n));
    };
    return zstd;
  } catch (err) {
    throw new Error(`zstd compression needs libzstd (Debian: libzstd1): ${(err as Error).message}`, { cause: err });
  }
}

/** Compresses one cluster; null when it would not be smaller than the cluster. */
export default function compressCluster(task: CompressTask): Uint8Array | null {
  const input = Buffer.from(task.data.buffer, task.data.byteOffset, task.data.byteLength);
  const out =
    task.algorithm === 'zstd' ? loadZstd()(input) : task.algorithm === 'zlib' ? deflateSync(input) : deflateRawSync(input, { windowBits: 12, memLevel: 9 });
  // QEMU stores a cluster compressed only when it fits in less than a cluster.
  return task.always || out.length < task.clusterSize ? out : null;
}

/**
 * The pool's entry point: the compressed bytes, or the cluster itself when it does not
 * shrink (then exactly a cluster long, which compressed data never is unless the task
 * says `always`), moved back to the caller without a copy.
 */
export function compressTask(task: CompressTask): unknown {
  collectNow();
  const out = compressCluster(task);
  return Piscina.move(out ? new Uint8Array(out) : task.data);
}

/**
 * Each cluster leaves a cluster-sized ArrayBuffer or two behind (in the worker and in
 * the caller), and V8 collects such external memory only after about 64 MiB of it: a
 * young collection every few MiB keeps each thread small (peak memory of convert -c).
 */
const COLLECT_EVERY = 16;
let tasksSinceGc = 0;
function collectNow(): void {
  if (++tasksSinceGc < COLLECT_EVERY) return;
  tasksSinceGc = 0;
  collectYoung();
}

let minorGc: (() => void) | null | undefined;
/** A young-generation collection of this thread's heap (nothing when unavailable). */
export function collectYoung(): void {
  if (minorGc === undefined) {
    minorGc = null;
    try {
      setFlagsFromString('--expose-gc');
      const gc = runInNewContext('gc') as (o?: { type: string }) => void;
      minorGc = () => gc({ type: 'minor' });
    } catch {
      minorGc = null;
    }
  }
  minorGc?.();
}
