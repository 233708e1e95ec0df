/**
 * The internal snapshot table: variable-length entries, each padded to 8 bytes,
 * parsed with QEMU's limits. Unknown extra data is kept for a later writer.
 */
import { CorruptImageError } from '../../core/errors.js';
import { readU64 } from '../../core/units.js';
import type { HostFile } from '../../io/host.js';
import { MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_TABLE_BYTES, MAX_L1_BYTES } from './constants.js';

export interface Qcow2Snapshot {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: bigint;
  vmStateSize: number;
  /** virtual disk size when the snapshot was taken */
  diskSize: number;
  /** -1n when none is recorded */
  icount: bigint;
  /** raw extra data as stored (24 bytes or more are QEMU's known fields) */
  extraData: Buffer;
}

const ENTRY_HEADER = 40;

/**
 * A snapshot id or name as QEMU sees it: a C string, so it ends at the first NUL
 * (found by the fuzzer: hostile names printed NUL bytes in `check` and `info` lines).
 */
export function snapshotString(bytes: Buffer): string {
  const nul = bytes.indexOf(0);
  return (nul < 0 ? bytes : bytes.subarray(0, nul)).toString('utf8');
}
/** The table is read through a window: 65536 small entries are not 196608 reads. */
const WINDOW = 1024 * 1024;

/** Reads of a sequentially parsed table; returned buffers share the window (copy what is kept). */
function windowedReader(file: HostFile): (pos: number, len: number) => Promise<Buffer> {
  let buf: Buffer = Buffer.alloc(0);
  let start = 0;
  return async (pos, len) => {
    if (pos < start || pos + len > start + buf.length) {
      buf = await file.readBytes(pos, Math.max(len, WINDOW));
      start = pos;
    }
    return buf.subarray(pos - start, pos - start + len);
  };
}

export async function readSnapshotTable(
  file: HostFile,
  offset: number,
  count: number,
  version: number,
  imageSize: number,
): Promise<Qcow2Snapshot[]> {
  const out: Qcow2Snapshot[] = [];
  const name = file.path;
  let pos = offset;
  const read = windowedReader(file);
  for (let i = 0; i < count; i++) {
    const h = await read(pos, ENTRY_HEADER);
    const l1TableOffset = readU64(h, 0, 'Snapshot L1 table offset', name);
    const l1Size = h.readUInt32BE(8);
    const idSize = h.readUInt16BE(12);
    const nameSize = h.readUInt16BE(14);
    const dateSec = h.readUInt32BE(16);
    const dateNsec = h.readUInt32BE(20);
    const vmClockNsec = h.readBigUInt64BE(24);
    const vmState32 = h.readUInt32BE(32);
    const extraSize = h.readUInt32BE(36);
    pos += ENTRY_HEADER;
    if (extraSize > MAX_SNAPSHOT_EXTRA) {
      throw new CorruptImageError(name, `Too much extra metadata in snapshot table entry ${i}`);
    }
    const extra = await read(pos, extraSize);
    pos += extraSize;
    let vmStateSize = vmState32;
    let diskSize = imageSize;
    let icount = -1n;
    if (extraSize >= 8) vmStateSize = readU64(extra, 0, 'Snapshot VM state size', name);
    if (extraSize >= 16) diskSize = readU64(extra, 8, 'Snapshot disk size', name);
    if (extraSize >= 24) icount = extra.readBigInt64BE(16);
    void version; // v3 entries shorter than 16 bytes are accepted with the current size, as QEMU does
    const strings = await read(pos, idSize + nameSize);
    const id = snapshotString(strings.subarray(0, idSize));
    const sname = snapshotString(strings.subarray(idSize));
    pos += idSize + nameSize;
    pos = Math.ceil(pos / 8) * 8;
    if (pos - offset > MAX_SNAPSHOT_TABLE_BYTES) throw new CorruptImageError(name, 'Snapshot table is too big');
    if (l1Size > MAX_L1_BYTES / 8) throw new CorruptImageError(name, 'Snapshot L1 table too large');
    out.push({
      l1TableOffset,
      l1Size,
      id,
      name: sname,
      dateSec,
      dateNsec,
      vmClockNsec,
      vmStateSize,
      diskSize,
      icount,
      extraData: Buffer.from(extra),
    });
  }
  return out;
}
