/** Compressing a single cluster in-process (rebase -c), the same way the workers do. */
import compressCluster from './compress-worker.js';

export function compressUnit(algorithm: 'deflate' | 'zlib' | 'zstd', data: Buffer, clusterSize: number, always = false): Buffer | null {
  const out = compressCluster({ data, algorithm, clusterSize, always });
  return out ? Buffer.from(out.buffer, out.byteOffset, out.byteLength) : null;
}
