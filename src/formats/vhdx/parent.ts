/**
 * The parent locator of a differencing VHDX (a Hyper-V checkpoint, .avhdx): key/value
 * pairs (UTF-16LE) naming the parent by a relative path, a volume path and an absolute
 * Windows path, and the parent's DataWriteGuid (parent_linkage) it was made from.
 */
import { existsSync } from 'node:fs';
import { CorruptImageError } from '../../core/errors.js';
import { PARENT_TYPE_VHDX_GUID, guidFromString } from './format.js';

const LOCATOR_HEADER_SIZE = 20;
const LOCATOR_ENTRY_SIZE = 12;

export interface ParentLocator {
  entries: Map<string, string>;
  /** parent_linkage as GUID bytes */
  linkage: Buffer;
  /** parent_linkage2, an alternative the parent may also match */
  linkage2?: Buffer;
}

/** Parses the locator item (already bounded to its metadata length). */
export function parseParentLocator(item: Buffer, filename: string): ParentLocator {
  const bad = (what: string) => new CorruptImageError(filename, `VHDX parent locator ${what}`);
  if (item.length < LOCATOR_HEADER_SIZE) throw bad('is too short');
  if (!item.subarray(0, 16).equals(PARENT_TYPE_VHDX_GUID)) throw bad('is not of the VHDX parent type');
  const count = item.readUInt16LE(18);
  if (LOCATOR_HEADER_SIZE + count * LOCATOR_ENTRY_SIZE > item.length) throw bad('has more entries than fit in it');
  const entries = new Map<string, string>();
  const str = (off: number, len: number, what: string): string => {
    if (off === 0 || len === 0 || len % 2 !== 0 || off + len > item.length) throw bad(`${what} lies outside the locator`);
    return item.subarray(off, off + len).toString('utf16le');
  };
  for (let i = 0; i < count; i++) {
    const p = LOCATOR_HEADER_SIZE + i * LOCATOR_ENTRY_SIZE;
    const key = str(item.readUInt32LE(p), item.readUInt16LE(p + 8), 'key');
    const value = str(item.readUInt32LE(p + 4), item.readUInt16LE(p + 10), 'value');
    if (entries.has(key)) throw bad(`has the key ${key} twice`);
    entries.set(key, value);
  }
  const text = entries.get('parent_linkage');
  const linkage = text !== undefined ? guidFromString(text) : undefined;
  if (!linkage) throw bad('has no valid parent_linkage');
  const text2 = entries.get('parent_linkage2');
  return { entries, linkage, linkage2: text2 !== undefined ? guidFromString(text2) : undefined };
}

/** Builds a locator item (for tests and for creating differencing images). */
export function serializeParentLocator(pairs: Array<[string, string]>): Buffer {
  const keys = pairs.map(([k, v]) => [Buffer.from(k, 'utf16le'), Buffer.from(v, 'utf16le')] as const);
  let off = LOCATOR_HEADER_SIZE + pairs.length * LOCATOR_ENTRY_SIZE;
  const total = off + keys.reduce((n, [k, v]) => n + k.length + v.length, 0);
  const b = Buffer.alloc(total);
  PARENT_TYPE_VHDX_GUID.copy(b, 0);
  b.writeUInt16LE(pairs.length, 18);
  keys.forEach(([k, v], i) => {
    const p = LOCATOR_HEADER_SIZE + i * LOCATOR_ENTRY_SIZE;
    b.writeUInt32LE(off, p);
    k.copy(b, off);
    off += k.length;
    b.writeUInt32LE(off, p + 4);
    v.copy(b, off);
    off += v.length;
    b.writeUInt16LE(k.length, p + 8);
    b.writeUInt16LE(v.length, p + 10);
  });
  return b;
}

/** A Windows path as a name relative to the child's directory ("..\\a\\b.vhdx" -> "../a/b.vhdx"). */
function windowsRelative(path: string): string {
  return path.replace(/\\/g, '/').replace(/^\.\//, '');
}

/** The last component of a Windows path ("C:\\vms\\base.vhdx" -> "base.vhdx"). */
function windowsBasename(path: string): string {
  const parts = path.split(/[\\/]/).filter((p) => p.length > 0);
  return parts[parts.length - 1] ?? '';
}

/**
 * Candidate parent names, in the spec's order of preference, as names relative to
 * the child (absolute Windows paths cannot exist here: their file name is looked
 * for beside the child).
 */
export function parentCandidates(loc: ParentLocator): string[] {
  const out: string[] = [];
  const rel = loc.entries.get('relative_path');
  if (rel) out.push(windowsRelative(rel));
  for (const key of ['volume_path', 'absolute_win32_path']) {
    const v = loc.entries.get(key);
    const base = v ? windowsBasename(v) : '';
    if (base && !out.includes(base)) out.push(base);
  }
  return out.filter((name) => name.length > 0 && !name.includes('\0'));
}

/** The first candidate that exists beside the child (or the first, for messages). */
export function chooseParent(candidates: string[], resolve: (name: string) => string): string | undefined {
  return candidates.find((c) => existsSync(resolve(c))) ?? candidates[0];
}
