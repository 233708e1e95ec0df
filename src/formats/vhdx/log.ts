/**
 * The VHDX metadata log: a circular buffer of 4 KiB sectors holding entries (header,
 * descriptors, data sectors), each checksummed with CRC-32C over the whole entry.
 * Finding the active sequence, replaying it, and writing the one-entry transactions
 * qimg uses to update the BAT (as qemu does: log, flush, apply, flush, reset).
 */
import type { HostFile } from '../../io/host.js';
import { CorruptImageError } from '../../core/errors.js';
import { zeroFileRange } from '../../io/allocate.js';
import { crc32cUpdate } from './crc32c.js';
import { HEADER_SECTION_END, MiB } from './format.js';

export const LOG_SECTOR = 4096;
const LOG_SIGNATURE = 0x65676f6c; // "loge"
const DESC_SIGNATURE = 0x63736564; // "desc"
const ZERO_SIGNATURE = 0x6f72657a; // "zero"
const DATA_SIGNATURE = 0x61746164; // "data"
const ENTRY_HEADER_SIZE = 64;
const DESCRIPTOR_SIZE = 32;
/** largest log entry qimg reads (qemu's and Hyper-V's are a few sectors) */
const MAX_ENTRY_LENGTH = 64 * MiB;
/** how far a replay may grow the file beyond its size (last_file_offset) */
const MAX_REPLAY_GROWTH = 64 * 1024 * MiB;

export interface LogDescriptor {
  kind: 'data' | 'zero';
  fileOffset: number;
  /** bytes written: 4096 for data, zero_length for zero descriptors */
  length: number;
  /** the full 4 KiB sector (data descriptors) */
  data?: Buffer;
}

export interface LogEntry {
  /** byte position of the entry in the log */
  position: number;
  entryLength: number;
  tail: number;
  sequenceNumber: bigint;
  flushedFileOffset: number;
  lastFileOffset: number;
  descriptors: LogDescriptor[];
}

export interface LogLocation {
  offset: number;
  length: number;
  guid: Buffer;
}

/** Sectors of header + descriptors for `count` descriptors (the header takes two slots). */
export function descriptorSectors(count: number): number {
  return Math.ceil((count + 2) / 128);
}

/** Reads `count` log sectors from `pos` (wrapping at the end of the circular log). */
async function readLogSectors(file: HostFile, log: LogLocation, pos: number, count: number): Promise<Buffer> {
  const out = Buffer.alloc(count * LOG_SECTOR);
  let done = 0;
  let p = pos;
  while (done < count) {
    const run = Math.min(count - done, (log.length - p) / LOG_SECTOR);
    await file.read(out.subarray(done * LOG_SECTOR, (done + run) * LOG_SECTOR), log.offset + p);
    done += run;
    p = (p + run * LOG_SECTOR) % log.length;
  }
  return out;
}

/**
 * Parses and validates the entry at `pos`: signature, length, sequence, GUID,
 * descriptors and their data sectors, checksum over the whole entry. undefined when
 * anything does not hold (such an entry does not exist for the replay).
 */
async function readEntry(file: HostFile, log: LogLocation, pos: number, first: Buffer): Promise<LogEntry | undefined> {
  if (first.readUInt32LE(0) !== LOG_SIGNATURE) return undefined;
  const entryLength = first.readUInt32LE(8);
  const tail = first.readUInt32LE(12);
  const seq = first.readBigUInt64LE(16);
  const count = first.readUInt32LE(24);
  if (entryLength === 0 || entryLength % LOG_SECTOR !== 0 || entryLength > log.length || entryLength > MAX_ENTRY_LENGTH) return undefined;
  if (seq === 0n || tail % LOG_SECTOR !== 0 || tail >= log.length) return undefined;
  if (!first.subarray(32, 48).equals(log.guid)) return undefined;
  const descSectors = descriptorSectors(count);
  // every descriptor needs room, and each data descriptor one sector of its own
  if (count * DESCRIPTOR_SIZE > entryLength || descSectors * LOG_SECTOR > entryLength) return undefined;
  const entry = await readLogSectors(file, log, pos, entryLength / LOG_SECTOR);
  let crc = crc32cUpdate(0xffffffff, entry.subarray(0, 4));
  crc = crc32cUpdate(crc, Buffer.alloc(4));
  crc = (crc32cUpdate(crc, entry.subarray(8)) ^ 0xffffffff) >>> 0;
  if (crc !== entry.readUInt32LE(4)) return undefined;

  const descriptors: LogDescriptor[] = [];
  let dataSector = descSectors;
  for (let i = 0; i < count; i++) {
    const d = entry.subarray(ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE, ENTRY_HEADER_SIZE + (i + 1) * DESCRIPTOR_SIZE);
    const sig = d.readUInt32LE(0);
    const fileOffset = Number(d.readBigUInt64LE(16));
    if (d.readBigUInt64LE(24) !== seq || fileOffset % LOG_SECTOR !== 0) return undefined;
    if (sig === ZERO_SIGNATURE) {
      const zeroLength = Number(d.readBigUInt64LE(8));
      if (zeroLength % LOG_SECTOR !== 0) return undefined;
      descriptors.push({ kind: 'zero', fileOffset, length: zeroLength });
    } else if (sig === DESC_SIGNATURE) {
      if ((dataSector + 1) * LOG_SECTOR > entryLength) return undefined;
      const s = entry.subarray(dataSector * LOG_SECTOR, (dataSector + 1) * LOG_SECTOR);
      dataSector++;
      const sectorSeq = (BigInt(s.readUInt32LE(4)) << 32n) | BigInt(s.readUInt32LE(4092));
      if (s.readUInt32LE(0) !== DATA_SIGNATURE || sectorSeq !== seq) return undefined;
      // bytes 0-7 and 4092-4095 of the data live in the descriptor
      const data = Buffer.alloc(LOG_SECTOR);
      d.copy(data, 0, 8, 16);
      s.copy(data, 8, 8, 4092);
      d.copy(data, 4092, 4, 8);
      descriptors.push({ kind: 'data', fileOffset, length: LOG_SECTOR, data });
    } else {
      return undefined;
    }
  }
  return {
    position: pos,
    entryLength,
    tail,
    sequenceNumber: seq,
    flushedFileOffset: Number(first.readBigUInt64LE(48)),
    lastFileOffset: Number(first.readBigUInt64LE(56)),
    descriptors,
  };
}

/**
 * Finds the active log sequence: the chain of valid entries with consecutive
 * sequence numbers that ends with the highest sequence number. Empty when the log
 * holds nothing to replay. Only the part of the log inside the file is scanned
 * (sectors past the end read as zeros and hold no entry).
 */
export async function findActiveSequence(file: HostFile, log: LogLocation): Promise<LogEntry[]> {
  const entries = new Map<number, LogEntry>();
  const scanEnd = Math.min(log.length, Math.max(0, file.size - log.offset));
  const WINDOW = MiB;
  for (let base = 0; base < scanEnd; base += WINDOW) {
    const win = await file.readBytes(log.offset + base, Math.min(WINDOW, log.length - base));
    for (let off = 0; off + LOG_SECTOR <= win.length; off += LOG_SECTOR) {
      if (win.readUInt32LE(off) !== LOG_SIGNATURE) continue;
      const e = await readEntry(file, log, base + off, win.subarray(off, off + LOG_SECTOR));
      if (e) entries.set(base + off, e);
    }
  }
  if (entries.size === 0) return [];
  // the successor of each entry: the next position, one sequence number higher
  const next = (e: LogEntry): LogEntry | undefined => {
    const n = entries.get((e.position + e.entryLength) % log.length);
    return n && n.sequenceNumber === e.sequenceNumber + 1n ? n : undefined;
  };
  const hasPredecessor = new Set<number>();
  for (const e of entries.values()) {
    const n = next(e);
    if (n) hasPredecessor.add(n.position);
  }
  let best: LogEntry[] = [];
  for (const start of entries.values()) {
    if (hasPredecessor.has(start.position)) continue;
    const chain = [start];
    for (let n = next(start); n && chain.length <= entries.size; n = next(n)) chain.push(n);
    const last = chain[chain.length - 1];
    if (best.length === 0 || last.sequenceNumber > best[best.length - 1].sequenceNumber) best = chain;
  }
  return best;
}

/**
 * Writes a sequence's descriptors into the file (the caller resets the log GUID in
 * the headers afterwards). Refuses entries that would write into the header section,
 * into the log itself, or far beyond the end of the file.
 */
export async function replaySequence(file: HostFile, log: LogLocation, seq: LogEntry[], filename: string): Promise<void> {
  for (const e of seq) {
    if (e.flushedFileOffset > file.size) {
      throw new CorruptImageError(filename, `VHDX log entry ${e.sequenceNumber} needs a file of ${e.flushedFileOffset} bytes; the image has probably been truncated`);
    }
    if (e.lastFileOffset > file.size + MAX_REPLAY_GROWTH) {
      throw new CorruptImageError(filename, `VHDX log entry ${e.sequenceNumber} has an invalid last file offset ${e.lastFileOffset}`);
    }
    const limit = Math.max(file.size, Math.ceil(e.lastFileOffset / MiB) * MiB);
    for (const d of e.descriptors) {
      const end = d.fileOffset + d.length;
      const intoLog = d.fileOffset < log.offset + log.length && end > log.offset;
      if (d.fileOffset < HEADER_SECTION_END || end > limit || intoLog) {
        throw new CorruptImageError(filename, `VHDX log entry ${e.sequenceNumber} writes outside the image's metadata (offset ${d.fileOffset}, length ${d.length})`);
      }
    }
  }
  for (const e of seq) {
    for (const d of e.descriptors) {
      if (d.kind === 'data') {
        await file.write(d.data!, d.fileOffset);
      } else if (!(await zeroFileRange(file, d.fileOffset, d.length, false)) || d.fileOffset + d.length > file.size) {
        const zeros = Buffer.alloc(Math.min(d.length, MiB));
        for (let p = 0; p < d.length; p += zeros.length) await file.write(zeros.subarray(0, Math.min(zeros.length, d.length - p)), d.fileOffset + p);
      }
    }
    if (file.size < e.lastFileOffset) await file.truncate(Math.ceil(e.lastFileOffset / MiB) * MiB);
  }
  await file.flush();
}

/** A 4 KiB-aligned sector of metadata to write through the log. */
export interface LogWrite {
  fileOffset: number;
  data: Buffer;
}

/**
 * Builds one log entry (header, data descriptors, data sectors) for whole 4 KiB
 * sectors, with its checksum.
 */
export function buildLogEntry(opts: {
  guid: Buffer;
  sequenceNumber: bigint;
  tail: number;
  flushedFileOffset: number;
  lastFileOffset: number;
  writes: LogWrite[];
}): Buffer {
  const n = opts.writes.length;
  const descSectors = descriptorSectors(n);
  const entry = Buffer.alloc((descSectors + n) * LOG_SECTOR);
  entry.writeUInt32LE(LOG_SIGNATURE, 0);
  entry.writeUInt32LE(entry.length, 8);
  entry.writeUInt32LE(opts.tail, 12);
  entry.writeBigUInt64LE(opts.sequenceNumber, 16);
  entry.writeUInt32LE(n, 24);
  opts.guid.copy(entry, 32);
  entry.writeBigUInt64LE(BigInt(opts.flushedFileOffset), 48);
  entry.writeBigUInt64LE(BigInt(opts.lastFileOffset), 56);
  const seqHigh = Number(opts.sequenceNumber >> 32n);
  const seqLow = Number(opts.sequenceNumber & 0xffffffffn);
  opts.writes.forEach((w, i) => {
    if (w.data.length !== LOG_SECTOR || w.fileOffset % LOG_SECTOR !== 0) throw new Error('log writes are whole aligned sectors');
    const d = ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE;
    entry.writeUInt32LE(DESC_SIGNATURE, d);
    w.data.copy(entry, d + 4, 4092, 4096); // trailing bytes
    w.data.copy(entry, d + 8, 0, 8); // leading bytes
    entry.writeBigUInt64LE(BigInt(w.fileOffset), d + 16);
    entry.writeBigUInt64LE(opts.sequenceNumber, d + 24);
    const s = (descSectors + i) * LOG_SECTOR;
    entry.writeUInt32LE(DATA_SIGNATURE, s);
    entry.writeUInt32LE(seqHigh, s + 4);
    w.data.copy(entry, s + 8, 8, 4092);
    entry.writeUInt32LE(seqLow, s + 4092);
  });
  let crc = crc32cUpdate(0xffffffff, entry);
  crc = (crc ^ 0xffffffff) >>> 0;
  entry.writeUInt32LE(crc, 4);
  return entry;
}

/** Log sectors one entry of `writes` sectors takes. */
export function entrySectors(writes: number): number {
  return descriptorSectors(writes) + writes;
}
