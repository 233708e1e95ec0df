/**
 * Reading the member list of a tar archive (POSIX ustar, pax extended headers, GNU
 * long names) without unpacking it: an OVA is a tar, and its disks are read in place.
 */
import { CorruptImageError } from '../../core/errors.js';
import type { HostFile } from '../../io/host.js';

export const TAR_BLOCK = 512;
/** Members listed at most (an OVA has a handful; a hostile archive could claim millions). */
const MAX_MEMBERS = 10_000;
/** Largest pax or GNU long-name record read into memory. */
const MAX_META_RECORD = 1024 * 1024;

export interface TarMember {
  name: string;
  /** offset of the member's data in the archive */
  offset: number;
  size: number;
  /** '0' regular file, '5' directory, ... (regular files as '0') */
  type: string;
}

/** True when a 512-byte block is a valid tar header (ustar magic or a v7 header with a good checksum). */
export function isTarHeader(block: Buffer): boolean {
  if (block.length < TAR_BLOCK) return false;
  const magic = block.toString('latin1', 257, 262);
  if (magic !== 'ustar') return false;
  const sum = parseOctal(block.subarray(148, 156));
  return sum !== undefined && sum === headerChecksum(block);
}

/** The header checksum: all bytes, with the checksum field itself counted as spaces. */
function headerChecksum(block: Buffer): number {
  let sum = 0;
  for (let i = 0; i < TAR_BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : block[i];
  return sum;
}

/** An octal number field (NUL/space terminated); undefined when malformed. */
function parseOctal(field: Buffer): number | undefined {
  const text = field.toString('latin1').replace(/[\0 ]+$/, '').replace(/^ +/, '');
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) return undefined;
  const n = parseInt(text, 8);
  return Number.isSafeInteger(n) ? n : undefined;
}

/** A size field: octal, or GNU base-256 (high bit of the first byte set) for files ≥ 8 GiB. */
function parseSize(field: Buffer): number | undefined {
  if (field[0] & 0x80) {
    let n = BigInt(field[0] & 0x7f);
    for (let i = 1; i < field.length; i++) n = (n << 8n) | BigInt(field[i]);
    return n <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : undefined;
  }
  return parseOctal(field);
}

function cString(buf: Buffer): string {
  const nul = buf.indexOf(0);
  return buf.toString('utf8', 0, nul < 0 ? buf.length : nul);
}

/** pax records "LEN key=value\n"; only `path` and `size` matter here. */
function parsePax(data: Buffer, file: string): { path?: string; size?: number } {
  const out: { path?: string; size?: number } = {};
  let pos = 0;
  while (pos < data.length) {
    const space = data.indexOf(0x20, pos);
    if (space < 0) break;
    const len = Number(data.toString('latin1', pos, space));
    if (!Number.isInteger(len) || len <= space - pos || pos + len > data.length) {
      throw new CorruptImageError(file, 'invalid pax extended header in the archive');
    }
    const record = data.toString('utf8', space + 1, pos + len - 1);
    const eq = record.indexOf('=');
    if (eq > 0) {
      const key = record.slice(0, eq);
      const value = record.slice(eq + 1);
      if (key === 'path') out.path = value;
      if (key === 'size') {
        const n = Number(value);
        if (!Number.isSafeInteger(n) || n < 0) throw new CorruptImageError(file, 'invalid pax size in the archive');
        out.size = n;
      }
    }
    pos += len;
  }
  return out;
}

/** Lists the members of the tar archive in `host` (in archive order). */
export async function listTar(host: HostFile): Promise<TarMember[]> {
  const file = host.path;
  const members: TarMember[] = [];
  let pos = 0;
  let longName: string | undefined;
  let pax: { path?: string; size?: number } = {};
  for (;;) {
    if (pos + TAR_BLOCK > host.size) {
      // archives written without the two zero blocks at the end are common enough
      if (pos >= host.size && members.length > 0) break;
      throw new CorruptImageError(file, 'truncated tar archive');
    }
    const block = await host.readBytes(pos, TAR_BLOCK);
    if (block.every((b) => b === 0)) break;
    const magic = block.toString('latin1', 257, 262);
    const sum = parseOctal(block.subarray(148, 156));
    if (magic !== 'ustar' || sum === undefined || sum !== headerChecksum(block)) {
      throw new CorruptImageError(file, `invalid tar header at offset ${pos}`);
    }
    let size = parseSize(block.subarray(124, 136));
    if (size === undefined) throw new CorruptImageError(file, `invalid member size in the tar header at offset ${pos}`);
    const type = String.fromCharCode(block[156] || 0x30);
    const dataOffset = pos + TAR_BLOCK;
    const next = (sz: number) => dataOffset + Math.ceil(sz / TAR_BLOCK) * TAR_BLOCK;
    if (type === 'x' || type === 'L' || type === 'g') {
      if (size > MAX_META_RECORD) throw new CorruptImageError(file, 'tar extended header too large');
      if (dataOffset + size > host.size) throw new CorruptImageError(file, 'truncated tar archive');
      const data = await host.readBytes(dataOffset, size);
      if (type === 'x') pax = parsePax(data, file);
      if (type === 'L') longName = cString(data);
      pos = next(size);
      continue;
    }
    if (pax.size !== undefined) size = pax.size;
    const prefix = cString(block.subarray(345, 500));
    const base = cString(block.subarray(0, 100));
    const name = pax.path ?? longName ?? (prefix ? `${prefix}/${base}` : base);
    if (dataOffset + size > host.size && (type === '0' || type === '7')) {
      throw new CorruptImageError(file, `tar member '${name}' extends beyond the end of the archive`);
    }
    members.push({ name, offset: dataOffset, size, type: type === '7' ? '0' : type });
    if (members.length > MAX_MEMBERS) throw new CorruptImageError(file, `more than ${MAX_MEMBERS} members in the archive`);
    longName = undefined;
    pax = {};
    pos = next(type === '0' || type === '7' ? size : 0);
  }
  return members;
}
