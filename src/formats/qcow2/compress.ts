/**
 * Decompression of qcow2 compressed clusters: raw deflate (zlib type) or zstd frames.
 * Input is sector-rounded, so trailing bytes after the stream are ignored; a cluster
 * is good when exactly one cluster of output was produced, as QEMU requires.
 */
import { inflateRawSync, constants as zc } from 'node:zlib';
import { Decompress as ZstdStream } from 'fzstd';
import { COMPRESSION_ZSTD } from './constants.js';

export class DecompressError extends Error {}

export function decompressCluster(type: number, input: Buffer, clusterSize: number): Buffer {
  return type === COMPRESSION_ZSTD ? zstdCluster(input, clusterSize) : deflateCluster(input, clusterSize);
}

function deflateCluster(input: Buffer, clusterSize: number): Buffer {
  let out: Buffer;
  try {
    // Z_SYNC_FLUSH: a stream cut short is not an error by itself; the length check decides.
    out = inflateRawSync(input, { finishFlush: zc.Z_SYNC_FLUSH, maxOutputLength: clusterSize });
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
      const out = inflateRawSync(input.subarray(0, n), { finishFlush: zc.Z_SYNC_FLUSH, maxOutputLength: 16 * clusterSize });
      if (out.length >= clusterSize) return out.subarray(0, clusterSize);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ERR_BUFFER_TOO_LARGE') {
        throw new DecompressError(`Could not decompress cluster: ${(err as Error).message}`);
      }
    }
    if (n >= input.length) throw new DecompressError('Could not decompress cluster');
  }
}

function zstdCluster(input: Buffer, clusterSize: number): Buffer {
  const out = Buffer.alloc(clusterSize);
  let filled = 0;
  const stream = new ZstdStream((chunk: Uint8Array) => {
    const take = Math.min(chunk.length, clusterSize - filled);
    out.set(chunk.subarray(0, take), filled);
    filled += take;
  });
  try {
    stream.push(input, true);
  } catch (err) {
    // Garbage after the frame(s) once the cluster is full is the next cluster's data.
    if (filled < clusterSize) throw new DecompressError(`Could not decompress cluster: ${(err as Error).message}`);
  }
  if (filled !== clusterSize) throw new DecompressError('Could not decompress cluster: short output');
  return out;
}
