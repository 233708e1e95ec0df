/**
 * `measure`: the file size a new image needs, as qemu-img computes it: `required` for
 * the data a source actually holds (or none for --size) and `fully-allocated` for
 * every cluster, metadata included; qcow2 targets of a qcow2 source also count the
 * space persistent bitmaps would take.
 */
import type { BlockImage } from '../core/block-image.js';
import { extentAt } from '../core/block-status.js';
import { creationRefusal, findDriver } from '../core/driver.js';
import { QimgError } from '../core/errors.js';
import { parseOptions } from '../core/options.js';
import type { OptionValue } from '../core/options.js';
import type { SecretStore } from '../core/secrets.js';

export interface MeasureResult {
  /** exact: sizes reach 2^63 (qemu prints them as unsigned, JSON as signed 64-bit) */
  required: bigint;
  fullyAllocated: bigint;
  /** present when the target and source both support persistent bitmaps */
  bitmaps?: bigint;
}

const divUp = (a: bigint, b: bigint) => (a + b - 1n) / b;
const roundUp = (a: bigint, b: bigint) => divUp(a, b) * b;

/** Clusters the refcount table and blocks take to cover `clusters` clusters and themselves. */
export function refcountMetadataClusters(clusters: bigint, clusterSize: bigint, refcountBits: bigint): bigint {
  const perTableCluster = clusterSize / 8n;
  const perBlock = (clusterSize * 8n) / refcountBits;
  let table = 0n;
  let blocks = 0n;
  let last = -1n;
  let n = 0n;
  while (n !== last) {
    last = n;
    blocks = divUp(clusters + table + blocks, perBlock);
    table = divUp(blocks, perTableCluster);
    n = clusters + blocks + table;
  }
  return blocks + table;
}

/** Size of a fully allocated qcow2 image of `virtualSize` (data and every table). */
export function qcow2FullSize(virtualSize: bigint, clusterSize: bigint, refcountBits: bigint, extendedL2: boolean): bigint {
  const aligned = roundUp(virtualSize, clusterSize);
  const l2EntrySize = extendedL2 ? 16n : 8n;
  let meta = clusterSize; // header
  const l2Entries = roundUp(aligned / clusterSize, clusterSize / l2EntrySize);
  meta += l2Entries * l2EntrySize;
  const l1Entries = roundUp((l2Entries * l2EntrySize) / clusterSize, clusterSize / 8n);
  meta += l1Entries * 8n;
  meta += refcountMetadataClusters((meta + aligned) / clusterSize, clusterSize, refcountBits) * clusterSize;
  return meta + aligned;
}

/** Bytes of data clusters the source really holds, counted in whole target clusters. */
async function allocatedBytes(src: BlockImage, clusterSize: number): Promise<bigint> {
  const size = src.virtualSize;
  let required = 0n;
  for (let offset = 0; offset < size; ) {
    const e = await extentAt(src, offset, size - offset);
    let n = e.length;
    if (!e.zero && e.data) {
      // Extend to the end of the cluster; the next query starts there.
      n = Math.ceil((offset + n) / clusterSize) * clusterSize - offset;
      required += BigInt((offset % clusterSize) + n);
    }
    offset += n;
  }
  return required;
}

/**
 * The options qcow2's measure reads, validated as qemu's qcow2_measure does: only
 * cluster size (with extended L2), compat, refcount width and preallocation, in that
 * order and with its messages. Unlike create it accepts e.g. compat=0.10 with
 * lazy_refcounts, zstd or extended_l2 (and then measures extended L2 tables).
 */
function qcow2MeasureSpec(o: Map<string, OptionValue>): { clusterSize: number; refcountBits: number; extendedL2: boolean; preallocation: string; version: number } {
  const extendedL2 = (o.get('extended_l2') as boolean | undefined) ?? false;
  const clusterSize = Number((o.get('cluster_size') as bigint | undefined) ?? 65536n);
  if (!Number.isInteger(Math.log2(clusterSize)) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024) {
    throw new QimgError('Cluster size must be a power of two between 512 and 2048k');
  }
  if (extendedL2 && clusterSize < 16384) throw new QimgError('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  const compat = o.get('compat') as string | undefined;
  let version = 3;
  if (compat === '0.10') version = 2;
  else if (compat !== undefined && compat !== '1.1') throw new QimgError(`Invalid compatibility level: '${compat}'`);
  const refcountBits = Number((o.get('refcount_bits') as number | undefined) ?? 16);
  if (!Number.isInteger(Math.log2(refcountBits)) || refcountBits > 64) {
    throw new QimgError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3 && refcountBits !== 16) {
    throw new QimgError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  const preallocation = (o.get('preallocation') as string | undefined) ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(preallocation)) throw new QimgError(`invalid parameter value: ${preallocation}`);
  return { clusterSize, refcountBits, extendedL2, preallocation, version };
}

/** QCOW_MAX_L1_SIZE: the L1 table may take at most 32 MiB. */
const MAX_L1_BYTES = 32 * 1024 * 1024;

export async function measure(opts: {
  format: string;
  optionStrings: string[];
  /** --size as given (bigint: sizes reach 2^63 - 1) */
  size?: bigint;
  source?: BlockImage;
  /** --object secrets (luks: `-o key-secret=ID` must name one) */
  secrets?: SecretStore;
}): Promise<MeasureResult | 'help'> {
  const driver = findDriver(opts.format);
  if (!driver) throw new QimgError(`Unknown file format '${opts.format}'`);
  const refusal = creationRefusal(driver);
  if (refusal) throw new QimgError(refusal, { file: '' });
  const parsed = parseOptions(opts.optionStrings, driver.createOptions);
  if (parsed.help) return 'help';
  const src = opts.source;
  const virtual = src ? BigInt(src.virtualSize) : (opts.size ?? 0n);
  if (driver.name === 'raw') {
    const required = src ? virtual : roundUp(virtual, 512n);
    return { required, fullyAllocated: required };
  }
  // formats with their own measure (luks): errors without a file name, as qemu-img's
  if (driver.measure) {
    try {
      return await driver.measure(virtual, parsed.values, { secrets: opts.secrets });
    } catch (err) {
      throw err instanceof QimgError && err.file === undefined ? new QimgError(err.message, { file: '', cause: err }) : err;
    }
  }
  if (driver.name !== 'qcow2') throw new QimgError(`Block driver '${driver.name}' does not support size measurement`, { file: '' });
  const spec = qcow2MeasureSpec(parsed.values);
  const clusterSize = BigInt(spec.clusterSize);
  const aligned = roundUp(virtual, clusterSize);
  const l2Tables = divUp(aligned / clusterSize, clusterSize / (spec.extendedL2 ? 16n : 8n));
  // (only for --size: qemu measures a source image whatever L1 table it would need)
  if (!src && l2Tables * 8n > BigInt(MAX_L1_BYTES)) throw new QimgError('The image size is too large (try using a larger cluster size)');
  let required = src ? await allocatedBytes(src, spec.clusterSize) : 0n;
  if (spec.preallocation === 'full' || spec.preallocation === 'falloc') required = aligned;
  const fullyAllocated = qcow2FullSize(virtual, clusterSize, BigInt(spec.refcountBits), spec.extendedL2);
  const result: MeasureResult = { required: fullyAllocated - aligned + required, fullyAllocated };
  // Only when the source supports persistent bitmaps too: qcow2 v3, not v2 (qemu-img omits the line)
  const srcV2 = src?.format === 'qcow2' && (await src.info()).formatSpecific?.data.compat === '0.10';
  if (spec.version >= 3 && src?.persistentBitmaps && !srcV2) {
    let bytes = 0n;
    let dir = 0n;
    for (const bm of await src.persistentBitmaps()) {
      const bitmapBytes = divUp(divUp(virtual, BigInt(bm.granularity)), 8n);
      const clusters = divUp(bitmapBytes, clusterSize);
      bytes += clusters * clusterSize + roundUp(clusters * 8n, clusterSize);
      dir += roundUp(24n + BigInt(Buffer.byteLength(bm.name)), 8n);
    }
    result.bitmaps = bytes + roundUp(dir, clusterSize);
  }
  return result;
}
