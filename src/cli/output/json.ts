/**
 * JSON shaped as qemu-img prints it: qemu pretty-prints with 4-space indents and its
 * own member order (QDict hash order), which scripts that diff output rely on.
 */
import type { Extent, ImageInfo, SnapshotInfo } from '../../core/block-image.js';

/** qemu's pretty JSON: like JSON.stringify(v, null, 4), but empty containers span two lines. */
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
    return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${prettyJson(v, indent + 1)}`).join(',\n')}\n${pad}}`;
  }
  return JSON.stringify(value);
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
  if (info.formatSpecific) o['format-specific'] = info.formatSpecific;
  if (info.fullBackingFilename !== undefined) o['full-backing-filename'] = info.fullBackingFilename;
  if (info.encrypted) o.encrypted = true;
  if (info.backingFilename !== undefined) o['backing-filename'] = info.backingFilename;
  if (info.dirtyFlag !== undefined) o['dirty-flag'] = info.dirtyFlag;
  return o;
}

/** One map range as qemu-img's JSON line (hand-printed by qemu, not pretty). */
export function mapEntryJson(e: Extent): string {
  let s = `{ "start": ${e.offset}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}, "compressed": ${e.compressed}`;
  if (e.hostOffset !== undefined) s += `, "offset": ${e.hostOffset}`;
  return s + '}';
}
