/**
 * The QED driver: probing, open (QEMU's validation, unknown autoclear bits dropped,
 * a consistency check before writing to an image flagged QED_F_NEED_CHECK), create
 * with qemu-img's options and messages, and `check`.
 */
import type { BlockImage } from '../../core/block-image.js';
import type { FormatCheckOptions, FormatDriver, ImageCheckCounts } from '../../core/driver.js';
import { QimgError, describeSystemError } from '../../core/errors.js';
import type { OpenContext } from '../../core/open.js';
import type { OptionSpec, OptionValue, ParsedOptions } from '../../core/options.js';
import { openStorage } from '../../io/storage.js';
import type { HostFile } from '../../io/host.js';
import { checkQedFile } from './check.js';
import {
  isClusterSizeValid,
  isImageSizeValid,
  isTableSizeValid,
  maxImageSize,
  parseQedHeader,
  probeQed,
  QED_AUTOCLEAR_FEATURE_MASK,
  QED_DEFAULT_CLUSTER_SIZE,
  QED_DEFAULT_TABLE_SIZE,
  QED_F_BACKING_FILE,
  QED_F_BACKING_FORMAT_NO_PROBE,
  QED_F_NEED_CHECK,
  QED_HEADER_BYTES,
  QED_MAX_CLUSTER_SIZE,
  QED_MAX_TABLE_SIZE,
  QED_MIN_CLUSTER_SIZE,
  QED_MIN_TABLE_SIZE,
  serializeQedHeader,
  type QedHeader,
} from './header.js';
import { QedImage } from './image.js';
import { writeNewFile } from '../../io/new-file.js';

/** `qemu-img create -f qed -o help`, in its order. */
export const qedCreateOptions: readonly OptionSpec[] = [
  { name: 'backing_file', type: 'string', help: 'File name of a base image' },
  { name: 'backing_fmt', type: 'string', help: 'Image format of the base image' },
  { name: 'cluster_size', type: 'size', help: 'Cluster size (in bytes)', default: String(QED_DEFAULT_CLUSTER_SIZE) },
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'table_size', type: 'size', help: 'L1/L2 table size (in clusters)' },
];

/** QEMU 7.2's BlockdevDriver names (what backing_fmt accepts). */
const QEMU_DRIVERS = new Set(
  ('blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write copy-on-read dmg file ftp ftps gluster ' +
    'host_cdrom host_device http https io_uring iscsi luks nbd nfs null-aio null-co nvme nvme-io_uring parallels preallocate ' +
    'qcow qcow2 qed quorum raw rbd replication snapshot-access ssh throttle vdi vhdx virtio-blk-vfio-pci virtio-blk-vhost-user ' +
    'virtio-blk-vhost-vdpa vmdk vpc vvfat').split(' '),
);

interface Opened {
  header: QedHeader;
  backingName: string | undefined;
  l1: Buffer;
}

/** Header, backing name and L1 table, validated. */
async function readQed(file: HostFile): Promise<Opened> {
  const name = file.path;
  const header = parseQedHeader(await file.readBytes(0, QED_HEADER_BYTES), file.size, name);
  let backingName: string | undefined;
  if (header.features & QED_F_BACKING_FILE) {
    const raw = await file.readBytes(header.backingFilenameOffset, header.backingFilenameSize);
    // QEMU reads it as a C string: it ends at the first NUL
    const nul = raw.indexOf(0);
    backingName = (nul < 0 ? raw : raw.subarray(0, nul)).toString('utf8');
  }
  const l1 = await file.readBytes(header.l1TableOffset, header.clusterSize * header.tableSize);
  return { header, backingName, l1 };
}

async function openQed(file: HostFile, ctx: OpenContext): Promise<BlockImage> {
  const name = file.path;
  const { header, backingName, l1 } = await readQed(file);
  if (file.writable && header.autoclearFeatures & ~QED_AUTOCLEAR_FEATURE_MASK) {
    // Unknown autoclear bits are dropped by any writer that does not know them.
    header.autoclearFeatures &= QED_AUTOCLEAR_FEATURE_MASK;
    await file.write(serializeQedHeader(header), 0);
    await file.flush();
  }
  if (file.writable && header.features & QED_F_NEED_CHECK && !ctx.repairedDirty) {
    // Not closed cleanly: repair before writing (read-only opens are left as they are).
    let r: ImageCheckCounts;
    try {
      r = await checkQedFile(file, header, l1, true);
    } catch (err) {
      throw new QimgError(`Image corrupted: ${err instanceof Error ? err.message : String(err)}`, { file: name });
    }
    if (r.checkErrors > 0) throw new QimgError('Image corrupted', { file: name });
    ctx.repairedDirty = true;
  }
  let backing: BlockImage | null = null;
  if (backingName !== undefined && !ctx.options.metadataOnly && !ctx.options.noBacking) {
    const format = header.features & QED_F_BACKING_FORMAT_NO_PROBE ? 'raw' : ctx.chain.length === 1 ? ctx.options.backingFormat : undefined;
    backing = await ctx.openBacking(backingName, format, name);
  }
  return new QedImage(file, name, header, backingName, l1, backing);
}

function u32(v: OptionValue | undefined, def: number): number {
  // QEMU passes these 64-bit option values on as 32-bit fields
  return v === undefined ? def : Number(BigInt(v as bigint) & 0xffffffffn);
}

async function createQed(path: string, size: number, o: Map<string, OptionValue>): Promise<void> {
  const backingFmt = o.get('backing_fmt') as string | undefined;
  if (backingFmt !== undefined && !QEMU_DRIVERS.has(backingFmt)) throw new QimgError(`Parameter 'backing-fmt' does not accept value '${backingFmt}'`);
  const clusterSize = u32(o.get('cluster_size'), QED_DEFAULT_CLUSTER_SIZE);
  const tableSize = u32(o.get('table_size'), QED_DEFAULT_TABLE_SIZE);
  if (!isClusterSizeValid(clusterSize)) {
    throw new QimgError(`QED cluster size must be within range [${QED_MIN_CLUSTER_SIZE}, ${QED_MAX_CLUSTER_SIZE}] and power of 2`);
  }
  if (!isTableSizeValid(tableSize)) throw new QimgError(`QED table size must be within range [${QED_MIN_TABLE_SIZE}, ${QED_MAX_TABLE_SIZE}] and power of 2`);
  if (!isImageSizeValid(BigInt(size), clusterSize, tableSize)) {
    throw new QimgError(`QED image size must be a non-zero multiple of cluster size and less than ${maxImageSize(clusterSize, tableSize)} bytes`);
  }
  const backingFile = o.get('backing_file') as string | undefined;
  const nameBytes = Buffer.from(backingFile ?? '', 'utf8');
  const header: QedHeader = {
    clusterSize,
    tableSize,
    headerSize: 1,
    features: 0n,
    compatFeatures: 0n,
    autoclearFeatures: 0n,
    l1TableOffset: clusterSize,
    imageSize: size,
    backingFilenameOffset: 0,
    backingFilenameSize: 0,
  };
  if (backingFile !== undefined) {
    header.features |= QED_F_BACKING_FILE;
    header.backingFilenameOffset = QED_HEADER_BYTES;
    header.backingFilenameSize = nameBytes.length;
    if (backingFmt === 'raw') header.features |= QED_F_BACKING_FORMAT_NO_PROBE;
  }
  await writeNewFile(path, async (handle) => {
    // The L1 table first, the header (which makes the file a QED image) last.
    const l1 = Buffer.alloc(clusterSize * tableSize);
    await handle.write(l1, 0, l1.length, clusterSize);
    const head = Buffer.concat([serializeQedHeader(header), nameBytes]);
    await handle.write(head, 0, head.length, 0);
    await handle.datasync();
  }, (err) => new QimgError(describeSystemError(err), { cause: err }));
}

function describeQedCreate(size: bigint, o: ParsedOptions): string {
  const parts = [`size=${size}`];
  for (const k of ['backing_file', 'backing_fmt']) if (o.raw.has(k)) parts.push(`${k}=${o.raw.get(k)}`);
  parts.push(`cluster_size=${o.values.get('cluster_size') ?? QED_DEFAULT_CLUSTER_SIZE}`);
  if (o.values.has('table_size')) parts.push(`table_size=${o.values.get('table_size')}`);
  return parts.join(' ');
}

async function checkQed(filename: string, opts: FormatCheckOptions): Promise<ImageCheckCounts> {
  const file = await openStorage(filename, { writable: opts.fix !== 0 });
  try {
    const { header, l1 } = await readQed(file);
    return await checkQedFile(file, header, l1, opts.fix !== 0);
  } finally {
    await file.close();
  }
}

export const qedDriver: FormatDriver = {
  name: 'qed',
  probe: (head) => probeQed(head),
  open: openQed,
  createOptions: qedCreateOptions,
  describeCreate: describeQedCreate,
  create: createQed,
  check: checkQed,
};
