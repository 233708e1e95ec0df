/**
 * `amend` for qcow2: compat up and down (a downgrade expands zero clusters), lazy
 * refcounts on and off, a new refcount width (the refcount structure is rewritten
 * after the end of the image, then the header switched to it), the external data
 * file's name and its raw flag — with qemu-img's refusals, all checked before the
 * image is touched.
 */
import { QimgError } from '../../core/errors.js';
import type { OptionValue } from '../../core/options.js';
import { openStorage } from '../../io/storage.js';
import type { HostFile } from '../../io/host.js';
import { writeU64 } from '../../core/units.js';
import * as C from './constants.js';
import type { Qcow2Header } from './header.js';
import { serializeHeader } from './header-serialize.js';
import { readRefcountEntry, writeRefcountEntry } from './refcount.js';
import type { Qcow2Image } from './driver.js';
import { ENCRYPT_AMEND_KEYS } from './encryption-amend.js';

/** Options qcow2 can change on an existing image. */
const AMENDABLE = new Set([
  'compat', 'lazy_refcounts', 'refcount_bits', 'data_file', 'data_file_raw', 'backing_file', 'backing_fmt', 'size',
  ...ENCRYPT_AMEND_KEYS,
]);

export interface AmendPlan {
  version: number;
  lazyRefcounts: boolean;
  refcountBits: number;
  dataFile?: string;
  dataFileRaw: boolean;
}

/** Validates the requested changes against the image (nothing is written). */
export function planAmend(img: Qcow2Image, values: Map<string, OptionValue>): AmendPlan {
  const h = img.header;
  for (const key of values.keys()) {
    if (!AMENDABLE.has(key)) throw new QimgError(`Invalid parameter '${key}' (this option is only supported for image creation)`);
  }
  if (values.has('backing_file') || values.has('backing_fmt')) {
    throw new QimgError("Cannot amend the backing file; use 'qimg rebase' instead");
  }
  if (values.has('size') && Number(values.get('size')) !== h.size) {
    throw new QimgError('Changing the virtual size with amend is not supported; resize the image instead');
  }
  let version = h.version;
  const compat = values.get('compat') as string | undefined;
  if (compat !== undefined) {
    if (compat === '0.10' || compat === 'v2') version = 2;
    else if (compat === '1.1' || compat === 'v3') version = 3;
    else throw new QimgError(`Unknown compatibility level ${compat}`);
  }
  const currentBits = 1 << h.refcountOrder;
  const refcountBits = (values.get('refcount_bits') as number | undefined) ?? currentBits;
  if (!Number.isInteger(Math.log2(refcountBits)) || refcountBits < 1 || refcountBits > 64) {
    throw new QimgError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (values.has('refcount_bits') && version < 3 && refcountBits !== 16) {
    throw new QimgError('Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  const hadLazy = (h.compatibleFeatures & C.COMPAT_LAZY_REFCOUNTS) !== 0n;
  let lazyRefcounts = (values.get('lazy_refcounts') as boolean | undefined) ?? hadLazy;
  if (values.get('lazy_refcounts') === true && version < 3) {
    throw new QimgError('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  const hasDataFile = (h.incompatibleFeatures & C.INCOMPAT_DATA_FILE) !== 0n;
  const dataFile = (values.get('data_file') as string | undefined) ?? h.dataFile;
  if (values.has('data_file') && !hasDataFile) {
    throw new QimgError('data-file can only be set for images that use an external data file');
  }
  const wasRaw = (h.autoclearFeatures & C.AUTOCLEAR_DATA_FILE_RAW) !== 0n;
  const dataFileRaw = (values.get('data_file_raw') as boolean | undefined) ?? wasRaw;
  if (dataFileRaw && !wasRaw) throw new QimgError('data-file-raw cannot be set on existing images');

  if (version < h.version) {
    if (hasDataFile) throw new QimgError('Cannot downgrade an image with a data file');
    const blocking = h.incompatibleFeatures & ~(C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT | C.INCOMPAT_DATA_FILE);
    if (blocking !== 0n) throw new QimgError(`Cannot downgrade an image with incompatible features 0x${blocking.toString(16)} set`);
    if (refcountBits !== 16) throw new QimgError('compat=0.10 requires refcount_bits=16');
    if (h.bitmaps) throw new QimgError('Cannot downgrade an image with persistent bitmaps');
    // v2 has no lazy refcounts: they are switched off on the way down.
    lazyRefcounts = false;
  }
  return { version, lazyRefcounts, refcountBits, dataFile, dataFileRaw };
}

/** Carries out a validated plan. The image must be open read-write and is closed. */
export async function amendQcow2(img: Qcow2Image, plan: AmendPlan): Promise<void> {
  const h = img.header;
  if (plan.version < h.version) await img.expandZeroClusters();
  await img.close();

  const file = await openStorage(img.filename, { writable: true });
  try {
    if (plan.refcountBits !== 1 << h.refcountOrder) await rewriteRefcounts(file, h, plan.refcountBits);
    h.version = plan.version;
    if (plan.version < 3) {
      h.incompatibleFeatures = 0n;
      h.compatibleFeatures = 0n;
      h.autoclearFeatures = 0n;
      h.refcountOrder = 4;
      h.compressionType = C.COMPRESSION_ZLIB;
      h.unknownHeaderFields = Buffer.alloc(0);
    } else {
      if (h.headerLength < C.HEADER_V3_LENGTH && h.unknownHeaderFields.length < C.HEADER_V3_LENGTH - C.HEADER_V3_MIN_LENGTH - 1) {
        h.unknownHeaderFields = Buffer.alloc(C.HEADER_V3_LENGTH - C.HEADER_V3_MIN_LENGTH - 1);
      }
      h.compatibleFeatures = plan.lazyRefcounts ? h.compatibleFeatures | C.COMPAT_LAZY_REFCOUNTS : h.compatibleFeatures & ~C.COMPAT_LAZY_REFCOUNTS;
      if (!plan.dataFileRaw) h.autoclearFeatures &= ~C.AUTOCLEAR_DATA_FILE_RAW;
      h.dataFile = plan.dataFile;
    }
    const clusterSize = 2 ** h.clusterBits;
    const head = Buffer.alloc(clusterSize);
    serializeHeader(h).copy(head);
    await file.write(head, 0);
    await file.flush();
  } finally {
    await file.close();
  }
}

/**
 * A new refcount structure of `bits`-wide entries, written after the end of the image
 * (crash before the header switch: the old structure is still the valid one); then
 * the header points at it and the old table and blocks are simply no longer counted.
 */
async function rewriteRefcounts(file: HostFile, h: Qcow2Header, bits: number): Promise<void> {
  const cs = 2 ** h.clusterBits;
  const oldBits = 1 << h.refcountOrder;
  const oldEntries = (cs * 8) / oldBits;
  const table = await file.readBytes(h.refcountTableOffset, h.refcountTableClusters * cs);
  const fileClusters = Math.ceil(file.size / cs);
  const counts = new Float64Array(fileClusters);
  const oldStructure: number[] = [];
  for (let c = 0; c < h.refcountTableClusters; c++) oldStructure.push(h.refcountTableOffset / cs + c);
  for (let i = 0; i < table.length / 8; i++) {
    const off = Number(table.readBigUInt64BE(i * 8) & ~0x1ffn);
    if (off === 0) continue;
    if (off % cs !== 0) throw new QimgError('the refcount table is damaged; run check -r all first', { file: file.path });
    oldStructure.push(off / cs);
    const block = await file.readBytes(off, cs);
    for (let k = 0; k < oldEntries; k++) {
      const c = i * oldEntries + k;
      const rc = readRefcountEntry(block, k, oldBits);
      if (rc === 0) continue;
      if (c >= fileClusters) throw new QimgError(`cluster ${c} has a refcount but lies beyond the end of the image`, { file: file.path });
      counts[c] = rc;
    }
  }
  // storage of a fixed size (an NBD export) has no "end of file" to append at: the new
  // structure goes after the last cluster in use, old structure included
  let inUseEnd = 0;
  for (let c = 0; c < fileClusters; c++) if (counts[c] > 0) inUseEnd = c + 1;
  for (const c of oldStructure) inUseEnd = Math.max(inUseEnd, c + 1);
  // The old structure is dropped with the switch.
  for (const c of oldStructure) counts[c] = 0;
  const max = bits === 64 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
  for (let c = 0; c < fileClusters; c++) {
    if (counts[c] > max) throw new QimgError(`Cannot change the refcount width to ${bits} bits: cluster ${c} has refcount ${counts[c]}`, { file: file.path });
  }
  // Table and blocks go after the end of the file (never over the old structure,
  // which stays valid until the header switch); they count themselves.
  const used = file.remote ? inUseEnd : fileClusters;
  const entries = (cs * 8) / bits;
  let tableClusters = 1;
  let blocks = 1;
  for (;;) {
    const total = used + tableClusters + blocks;
    const needBlocks = Math.ceil(total / entries);
    const needTable = Math.ceil((needBlocks * 8) / cs);
    if (needBlocks <= blocks && needTable <= tableClusters) break;
    blocks = Math.max(blocks, needBlocks);
    tableClusters = Math.max(tableClusters, needTable);
  }
  const tableAt = used;
  const blocksAt = used + tableClusters;
  const newTable = Buffer.alloc(tableClusters * cs);
  const newBlocks = Buffer.alloc(blocks * cs);
  const set = (c: number, v: number) => {
    const b = Math.floor(c / entries);
    writeRefcountEntry(newBlocks.subarray(b * cs, (b + 1) * cs), c % entries, bits, v);
  };
  for (let c = 0; c < used; c++) if (counts[c] > 0) set(c, counts[c]);
  for (let c = tableAt; c < blocksAt + blocks; c++) set(c, 1);
  for (let b = 0; b < blocks; b++) writeU64(newTable, b * 8, (blocksAt + b) * cs);
  await file.write(newTable, tableAt * cs);
  await file.write(newBlocks, blocksAt * cs);
  await file.flush();
  h.refcountTableOffset = tableAt * cs;
  h.refcountTableClusters = tableClusters;
  h.refcountOrder = Math.log2(bits);
}
