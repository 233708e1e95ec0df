/**
 * JSON shaped as qemu-img prints it: qemu pretty-prints with 4-space indents and its
 * own member order (QDict hash order), which scripts that diff output rely on.
 */
import type { Extent, ImageInfo, SnapshotInfo } from '../../core/block-image.js';
import { intString } from '../../core/units.js';

/**
 * A JSON string as qemu's JSON writer quotes it (quoted_str): the usual escapes for
 * '"', '\\', \b \f \n \r \t; every other character below 0x20 and everything from
 * 0x7F up as \uXXXX with upper-case hex (surrogate pairs beyond the BMP).
 */
export function quoteJson(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    switch (c) {
      case 0x22:
        out += '\\"';
        break;
      case 0x5c:
        out += '\\\\';
        break;
      case 0x08:
        out += '\\b';
        break;
      case 0x0c:
        out += '\\f';
        break;
      case 0x0a:
        out += '\\n';
        break;
      case 0x0d:
        out += '\\r';
        break;
      case 0x09:
        out += '\\t';
        break;
      default:
        // UTF-16 code units are exactly the \u escapes qemu prints (a lone
        // surrogate cannot come from valid UTF-8; qemu would print U+FFFD)
        if (c < 0x20 || c >= 0x7f) {
          const lone =
            (c >= 0xd800 && c <= 0xdbff && !(s.charCodeAt(i + 1) >= 0xdc00 && s.charCodeAt(i + 1) <= 0xdfff)) ||
            (c >= 0xdc00 && c <= 0xdfff && !(s.charCodeAt(i - 1) >= 0xd800 && s.charCodeAt(i - 1) <= 0xdbff));
          out += '\\u' + (lone ? 0xfffd : c).toString(16).toUpperCase().padStart(4, '0');
        } else {
          out += s[i];
        }
    }
  }
  return out + '"';
}

/** qemu's pretty JSON: 4-space indents, empty containers span two lines ("[\n    ]"). */
export function prettyJson(value: unknown, indent = 0): string {
  const pad = ' '.repeat(indent * 4);
  const inner = ' '.repeat((indent + 1) * 4);
  if (Array.isArray(value)) {
    if (value.length === 0) return `[\n${pad}]`;
    return `[\n${value.map((v) => inner + prettyJson(v, indent + 1)).join(',\n')}\n${pad}]`;
  }
  if (typeof value === 'object' && value !== null) {
    const entries = Object.entries(value).filter(([, v]) => v !== undefined);
    if (entries.length === 0) return `{\n${pad}}`;
    return `{\n${entries.map(([k, v]) => `${inner}${quoteJson(k)}: ${prettyJson(v, indent + 1)}`).join(',\n')}\n${pad}}`;
  }
  if (typeof value === 'string') return quoteJson(value);
  if (typeof value === 'number' && Number.isInteger(value)) return intString(value);
  if (typeof value === 'bigint') return value.toString();
  return JSON.stringify(value);
}

/** QEMU's tdb_hash (qobject/qdict.c) of a key, as an unsigned 32-bit value. */
export function qdictHash(key: string): number {
  const bytes = Buffer.from(key, 'utf8');
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) value = (value + ((bytes[i] << ((i * 5) % 24)) >>> 0)) >>> 0;
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

/**
 * The member order of a QDict holding these keys: by hash bucket (tdb_hash % 512);
 * within a bucket the last inserted comes first. `obj`'s own order stands for the
 * insertion (QAPI schema) order. Nested objects and arrays are reordered too.
 */
export function qdictOrder<T>(value: T): T {
  if (Array.isArray(value)) return value.map((v) => qdictOrder(v)) as T;
  if (typeof value !== 'object' || value === null) return value;
  const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined);
  const keyed = entries.map(([k, v], i) => ({ k, v, i, bucket: qdictHash(k) % 512 }));
  keyed.sort((a, b) => a.bucket - b.bucket || b.i - a.i);
  const out: Record<string, unknown> = {};
  for (const e of keyed) out[e.k] = qdictOrder(e.v);
  return out as T;
}

export function snapshotJson(s: SnapshotInfo): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  if (s.icount !== undefined) o.icount = s.icount;
  o['vm-clock-nsec'] = s.vmClockNsec;
  o.name = s.name;
  o['date-sec'] = s.dateSec;
  o['date-nsec'] = s.dateNsec;
  o['vm-clock-sec'] = s.vmClockSec;
  o.id = s.id;
  o['vm-state-size'] = s.vmStateSize;
  return o;
}

/** qemu-img 7.2's ImageInfo member order. */
export function infoJson(info: ImageInfo): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  if (info.backingFilenameFormat !== undefined) o['backing-filename-format'] = info.backingFilenameFormat;
  if (info.snapshots && info.snapshots.length > 0) o.snapshots = info.snapshots.map(snapshotJson);
  o['virtual-size'] = info.virtualSize;
  o.filename = info.filename;
  if (info.clusterSize !== undefined) o['cluster-size'] = info.clusterSize;
  o.format = info.format;
  if (info.actualSize !== undefined) o['actual-size'] = info.actualSize;
  // format drivers build this in schema order; qemu prints it in QDict order
  if (info.formatSpecific) o['format-specific'] = qdictOrder(info.formatSpecific);
  if (info.fullBackingFilename !== undefined) o['full-backing-filename'] = info.fullBackingFilename;
  if (info.encrypted) o.encrypted = true;
  if (info.backingFilename !== undefined) o['backing-filename'] = info.backingFilename;
  if (info.dirtyFlag !== undefined) o['dirty-flag'] = info.dirtyFlag;
  return o;
}

/** One map range as qemu-img's JSON line (hand-printed by qemu, not pretty). */
export function mapEntryJson(
  e: Pick<Extent, 'depth' | 'present' | 'zero' | 'data' | 'compressed'> & { offset: number | bigint; length: number | bigint; hostOffset?: number | bigint },
): string {
  let s = `{ "start": ${intString(e.offset)}, "length": ${intString(e.length)}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}, "compressed": ${e.compressed}`;
  if (e.hostOffset !== undefined) s += `, "offset": ${intString(e.hostOffset)}`;
  return s + '}';
}
