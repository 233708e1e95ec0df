/**
 * `measure`: the file size a new image needs, as qemu-img computes it: `required` for
 * the data a source actually holds (or none for --size) and `fully-allocated` for
 * every cluster, metadata included; qcow2 targets of a qcow2 source also count the
 * space persistent bitmaps would take.
 */
import type { BlockImage } from '../core/block-image.js';
import { extentAt } from '../core/block-status.js';
import { findDriver } from '../core/driver.js';
import { QimgError } from '../core/errors.js';
import { parseOptions } from '../core/options.js';
import { qcow2SpecFromOptions } from '../formats/qcow2/create.js';

export interface MeasureResult {
  required: number;
  fullyAllocated: number;
  /** present when the target and source both support persistent bitmaps */
  bitmaps?: number;
}

const divUp = (a: number, b: number) => Math.ceil(a / b);
const roundUp = (a: number, b: number) => divUp(a, b) * b;

/** Clusters the refcount table and blocks take to cover `clusters` clusters and themselves. */
export function refcountMetadataClusters(clusters: number, clusterSize: number, refcountBits: number): number {
  const perTableCluster = clusterSize / 8;
  const perBlock = (clusterSize * 8) / refcountBits;
  let table = 0;
  let blocks = 0;
  let last = -1;
  let n = 0;
  while (n !== last) {
    last = n;
    blocks = divUp(clusters + table + blocks, perBlock);
    table = divUp(blocks, perTableCluster);
    n = clusters + blocks + table;
  }
  return blocks + table;
}

/** Size of a fully allocated qcow2 image of `virtualSize` (data and every table). */
export function qcow2FullSize(virtualSize: number, clusterSize: number, refcountBits: number, extendedL2: boolean): number {
  const aligned = roundUp(virtualSize, clusterSize);
  const l2EntrySize = extendedL2 ? 16 : 8;
  let meta = clusterSize; // header
  const l2Entries = roundUp(aligned / clusterSize, clusterSize / l2EntrySize);
  meta += l2Entries * l2EntrySize;
  const l1Entries = roundUp((l2Entries * l2EntrySize) / clusterSize, clusterSize / 8);
  meta += l1Entries * 8;
  meta += refcountMetadataClusters((meta + aligned) / clusterSize, clusterSize, refcountBits) * clusterSize;
  return meta + aligned;
}

/** Bytes of data clusters the source really holds, counted in whole target clusters. */
async function allocatedBytes(src: BlockImage, clusterSize: number): Promise<number> {
  const size = src.virtualSize;
  let required = 0;
  for (let offset = 0; offset < size; ) {
    const e = await extentAt(src, offset, size - offset);
    let n = e.length;
    if (!e.zero && e.data) {
      // Extend to the end of the cluster; the next query starts there.
      n = roundUp(offset + n, clusterSize) - offset;
      required += (offset % clusterSize) + n;
    }
    offset += n;
  }
  return required;
}

export async function measure(opts: { format: string; optionStrings: string[]; size?: bigint; source?: BlockImage }): Promise<MeasureResult | 'help'> {
  const driver = findDriver(opts.format);
  if (!driver) throw new QimgError(`Unknown file format '${opts.format}'`);
  const parsed = parseOptions(opts.optionStrings, driver.createOptions);
  if (parsed.help) return 'help';
  const src = opts.source;
  if (driver.name === 'raw') {
    const required = src ? src.virtualSize : Number(roundUp(Number(opts.size ?? 0n), 512));
    return { required, fullyAllocated: required };
  }
  if (driver.name !== 'qcow2') throw new QimgError(`Format driver '${driver.name}' does not support measure`);
  const virtual = src ? src.virtualSize : Number(opts.size ?? 0n);
  const spec = qcow2SpecFromOptions(virtual, parsed.values);
  const aligned = roundUp(virtual, spec.clusterSize);
  let required = src ? await allocatedBytes(src, spec.clusterSize) : 0;
  if (spec.preallocation === 'full' || spec.preallocation === 'falloc') required = aligned;
  const fullyAllocated = qcow2FullSize(virtual, spec.clusterSize, spec.refcountBits, spec.extendedL2);
  const result: MeasureResult = { required: fullyAllocated - aligned + required, fullyAllocated };
  if (spec.version >= 3 && src?.persistentBitmaps) {
    let bytes = 0;
    let dir = 0;
    for (const bm of await src.persistentBitmaps()) {
      const bitmapBytes = divUp(divUp(src.virtualSize, bm.granularity), 8);
      const clusters = divUp(bitmapBytes, spec.clusterSize);
      bytes += clusters * spec.clusterSize + roundUp(clusters * 8, spec.clusterSize);
      dir += roundUp(24 + Buffer.byteLength(bm.name), 8);
    }
    result.bitmaps = bytes + roundUp(dir, spec.clusterSize);
  }
  return result;
}
