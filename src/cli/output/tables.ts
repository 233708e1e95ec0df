/**
 * Tables for qimg-only human views, drawn with cli-table3 on a terminal. Nothing here
 * replaces a qemu-img text: a view gets a table only where qemu-img has no such
 * output (an OVA's disks), and only when stdout is a terminal; piped, the same view
 * keeps its line-per-value form, which scripts can read.
 */
import { createRequire } from 'node:module';
import { isatty } from 'node:tty';
import type CliTable3 from 'cli-table3';
import { sizeToStr } from '../../core/size.js';
import { heading } from './style.js';

/** cli-table3 is loaded only when a table is drawn (keeps start-up light). */
function loadTable(): typeof CliTable3 {
  return createRequire(import.meta.url)('cli-table3') as typeof CliTable3;
}

/** Whether human views draw their qimg-only tables (stdout is a terminal). */
export function tablesOn(): boolean {
  return isatty(1);
}

/**
 * A table; `indent` spaces before each line. cli-table3 colours nothing: header cells
 * go through style.ts (bold where stdout is coloured).
 */
export function drawTable(head: string[], rows: string[][], align: Array<'left' | 'right'>, indent = 0): string {
  const Table = loadTable();
  const t = new Table({ head: head.map(heading), colAligns: align, style: { head: [], border: [], compact: true } });
  t.push(...rows);
  const pad = ' '.repeat(indent);
  return t
    .toString()
    .split('\n')
    .map((l) => pad + l)
    .join('\n') + '\n';
}

/** One disk as the OVA driver describes it in `info` (format-specific `disks`). */
interface OvaDiskInfo {
  'disk-id'?: unknown;
  file?: unknown;
  format?: unknown;
  subformat?: unknown;
  'virtual-size'?: unknown;
  'file-size'?: unknown;
  compression?: unknown;
  selected?: unknown;
}

const size = (v: unknown) => (typeof v === 'number' ? sizeToStr(v) : '');
const text = (v: unknown) => (v === undefined || v === null ? '' : String(v));

/**
 * An OVA's disks: the one commands open marked `*`, its file in the archive, virtual
 * size and stored size; format and compression columns only when the OVF names them.
 */
export function ovaDisksTable(disks: OvaDiskInfo[], indent: number): string {
  const columns: Array<{ head: string; align: 'left' | 'right'; optional?: boolean; cell: (d: OvaDiskInfo) => string }> = [
    { head: '', align: 'left', cell: (d) => (d.selected === true ? '*' : '') },
    { head: 'disk id', align: 'left', cell: (d) => text(d['disk-id']) },
    { head: 'file', align: 'left', cell: (d) => text(d.file) },
    {
      head: 'format',
      align: 'left',
      optional: true,
      cell: (d) => (d.subformat !== undefined ? `${text(d.format)} (${text(d.subformat)})` : text(d.format)),
    },
    { head: 'virtual size', align: 'right', cell: (d) => size(d['virtual-size']) },
    { head: 'file size', align: 'right', cell: (d) => size(d['file-size']) },
    { head: 'compression', align: 'left', optional: true, cell: (d) => text(d.compression) },
  ];
  const shown = columns.filter((c) => !c.optional || disks.some((d) => c.cell(d) !== ''));
  return drawTable(
    shown.map((c) => c.head),
    disks.map((d) => shown.map((c) => c.cell(d))),
    shown.map((c) => c.align),
    indent,
  );
}
