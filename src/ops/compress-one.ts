/** Compressing a single cluster in-process (rebase -c), the same way the workers do. */
import compressCluster from './compress-worker.js';

export function compressUnit(algorithm: 'deflate' | 'zstd', data: Buffer, clusterSize: number): Buffer | null {
  const out = compressCluster({ data, algorithm, clusterSize });
  return out ? Buffer.from(out.buffer, out.byteOffset, out.byteLength) : null;
}
