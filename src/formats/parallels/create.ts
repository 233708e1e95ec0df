/** `create -f parallels`: qemu's validation order and messages, its header and layout. */
import { FILE_PROTOCOL_OPTIONS, type OptionSpec, type OptionValue, type ParsedOptions } from '../../core/options.js';
import { QimgError, describeSystemError } from '../../core/errors.js';
import { native } from '../../io/native.js';
import {
  DEFAULT_CLUSTER_SIZE,
  HEADS_NUMBER,
  SECTOR_SIZE,
  SEC_IN_CYL,
  batEntryOffset,
  serializeHeader,
} from './header.js';
import { writeNewFile } from '../../io/new-file.js';

export const parallelsCreateOptions: readonly OptionSpec[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'cluster_size', type: 'size', help: 'Parallels image cluster size' },
  // the file protocol's options: accepted as qemu-img accepts them (the image is
  // rewritten from an empty file afterwards, so they change nothing but nocow)
  ...FILE_PROTOCOL_OPTIONS.filter((o) => o.name !== 'size').map((o) => ({ ...o, choices: undefined })),
];

/** qemu's Formatting line lists the file protocol's options in its own order. */
const PROTOCOL_ORDER = ['nocow', 'preallocation', 'extent_size_hint'];

export function describeParallelsCreate(size: bigint, o: ParsedOptions): string {
  const cs = (o.values.get('cluster_size') as bigint | undefined) ?? BigInt(DEFAULT_CLUSTER_SIZE);
  const parts = [`size=${size}`, `cluster_size=${cs}`];
  for (const name of PROTOCOL_ORDER) {
    const v = o.values.get(name);
    if (v === undefined) continue;
    parts.push(`${name}=${typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v)}`);
  }
  return parts.join(' ');
}

/** qemu's MAX_PARALLELS_IMAGE_FACTOR: at most 2^32 clusters */
const MAX_IMAGE_FACTOR = 2n ** 32n;
const INT64_MAX = 2n ** 63n - 1n;

export async function createParallels(path: string, size: number, options: Map<string, OptionValue>): Promise<void> {
  const prealloc = options.get('preallocation') as string | undefined;
  if (prealloc === 'metadata') throw new QimgError('Unsupported preallocation mode: metadata');
  if (prealloc !== undefined && !['off', 'falloc', 'full'].includes(prealloc)) throw new QimgError(`invalid parameter value: ${prealloc}`);
  const round = (v: bigint) => ((v + 511n) / 512n) * 512n;
  const total = round(BigInt(size));
  const cl = round((options.get('cluster_size') as bigint | undefined) ?? BigInt(DEFAULT_CLUSTER_SIZE));
  if (cl >= INT64_MAX / MAX_IMAGE_FACTOR) throw new QimgError('Cluster size is too large');
  if (total >= MAX_IMAGE_FACTOR * cl) throw new QimgError('Image size is too large for this cluster size');
  const clusterSize = Number(cl);
  const totalSize = Number(total);
  const batEntries = Math.ceil(totalSize / clusterSize);
  const batSectors = (Math.ceil(batEntryOffset(batEntries) / clusterSize) * clusterSize) / SECTOR_SIZE;
  const header = serializeHeader({
    ext: true,
    heads: HEADS_NUMBER,
    cylinders: Math.floor(totalSize / SECTOR_SIZE / HEADS_NUMBER / SEC_IN_CYL),
    tracks: clusterSize / SECTOR_SIZE,
    batEntries,
    nbSectors: Math.ceil(totalSize / SECTOR_SIZE),
    inUse: 0,
    dataOff: batSectors,
    flags: 0,
    extOff: 0n,
  });
  await writeNewFile(path, async (handle) => {
    // header sector, then a zeroed BAT up to the cluster-aligned data area
    const first = Buffer.alloc(SECTOR_SIZE);
    header.copy(first);
    await handle.write(first, 0, SECTOR_SIZE, 0);
    const end = batSectors * SECTOR_SIZE;
    await handle.truncate(end);
    // qemu zeroes the BAT area with allocated zeros (its disk size counts them)
    if (end > SECTOR_SIZE) native()?.fallocate(handle.fd, 0, SECTOR_SIZE, end - SECTOR_SIZE);
    await handle.datasync();
  }, (err) => new QimgError(`Failed to create Parallels image: ${describeSystemError(err)}`, { cause: err }));
}
