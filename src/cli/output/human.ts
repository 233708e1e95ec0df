/**
 * qemu-img's human-readable texts: the `info` dump, the snapshot table, map rows; and
 * where a view is qimg's own (an OVA's disks), its table on a terminal.
 */
import type { ImageInfo, SnapshotInfo } from '../../core/block-image.js';
import { sizeToStr } from '../../core/size.js';
import { intString } from '../../core/units.js';
import { qdictOrder } from './json.js';
import { ovaDisksTable } from './tables.js';

const pad = (n: number) => ' '.repeat(n);
const hex = (n: number | bigint) => (n === 0 || n === 0n ? '0' : `0x${n.toString(16)}`);

export interface HumanView {
  /** draw qimg-only parts as tables (stdout is a terminal); qemu-img's lines stay as they are */
  tables?: boolean;
}

export function infoHuman(info: ImageInfo, view: HumanView = {}): string {
  const lines: string[] = [];
  lines.push(`image: ${info.filename}`);
  lines.push(`file format: ${info.format}`);
  lines.push(`virtual size: ${sizeToStr(info.virtualSize)} (${intString(info.virtualSize)} bytes)`);
  lines.push(info.actualSize !== undefined ? `disk size: ${sizeToStr(info.actualSize)}` : 'disk size: unavailable');
  if (info.encrypted) lines.push('encrypted: yes');
  if (info.clusterSize !== undefined) lines.push(`cluster_size: ${info.clusterSize}`);
  if (info.dirtyFlag) lines.push('cleanly shut down: no');
  if (info.backingFilename !== undefined) {
    let l = `backing file: ${info.backingFilename}`;
    if (info.fullBackingFilename === undefined) l += ' (cannot determine actual path)';
    else if (info.fullBackingFilename !== info.backingFilename) l += ` (actual path: ${info.fullBackingFilename})`;
    lines.push(l);
  }
  if (info.backingFilenameFormat !== undefined) lines.push(`backing file format: ${info.backingFilenameFormat}`);
  let out = lines.join('\n') + '\n';
  if (info.snapshots && info.snapshots.length > 0) {
    out += 'Snapshot list:\n' + snapshotTable(info.snapshots);
  }
  if (info.formatSpecific) {
    // qemu dumps the QDict, so members come in QDict (hash) order as in JSON
    const data = qdictOrder(info.formatSpecific.data);
    out += 'Format specific information:\n';
    if (view.tables && info.formatSpecific.type === 'ova' && Array.isArray(data.disks)) {
      // qemu-img has no OVA: its disk list is qimg's own, a table on a terminal
      const { disks, ...rest } = data;
      out += dumpValue(rest, 1) + `${pad(4)}disks:\n` + ovaDisksTable(disks as Array<Record<string, unknown>>, 4);
    } else {
      out += dumpValue(data, 1);
    }
  }
  return out;
}

/** qemu's nested dump of format-specific data: "key: value", lists as "[i]:". */
function dumpValue(value: unknown, indent: number): string {
  if (Array.isArray(value)) {
    return value
      .map((v, i) => {
        const composite = typeof v === 'object' && v !== null;
        return `${pad(indent * 4)}[${i}]:${composite ? '\n' : ' '}${dumpValue(v, indent + 1)}`;
      })
      .join('');
  }
  if (typeof value === 'object' && value !== null) {
    return Object.entries(value)
      .map(([k, v]) => {
        const composite = typeof v === 'object' && v !== null;
        return `${pad(indent * 4)}${k.replace(/-/g, ' ')}:${composite ? '\n' : ' '}${dumpValue(v, indent + 1)}`;
      })
      .join('');
  }
  return `${String(value)}\n`;
}

function two(n: number): string {
  return String(n).padStart(2, '0');
}

/** The snapshot table of qemu-img 7.2 (`snapshot -l` and `info`). */
export function snapshotTable(snaps: SnapshotInfo[]): string {
  let out = `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}\n`;
  for (const s of snaps) {
    const d = new Date(s.dateSec * 1000);
    const date = `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
    const secs = s.vmClockSec;
    const clock = `${two(Math.floor(secs / 3600))}:${two(Math.floor(secs / 60) % 60)}:${two(secs % 60)}.${String(Math.floor(s.vmClockNsec / 1e6) % 1000).padStart(3, '0')}`;
    const icount = s.icount !== undefined ? String(s.icount) : '';
    // qemu's printf pads by bytes, not characters (names with UTF-8 get less padding)
    const padBytes = (t: string, n: number) => t + ' '.repeat(Math.max(0, n - Buffer.byteLength(t)));
    out += `${padBytes(s.id, 9)} ${padBytes(s.name, 16)} ${sizeToStr(s.vmStateSize).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}\n`;
  }
  return out;
}

export const MAP_HUMAN_HEADER = `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`;

export function mapHumanRow(start: number | bigint, length: number | bigint, mapped: number | bigint, file: string): string {
  return `${hex(start).padEnd(16)}${hex(length).padEnd(16)}${hex(mapped).padEnd(16)}${file}\n`;
}
