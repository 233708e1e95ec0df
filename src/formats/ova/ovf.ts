/**
 * The parts of an OVF descriptor (DMTF DSP0243) that say which disks an appliance has:
 * References/File (member name, size, compression, chunking) and DiskSection/Disk
 * (id, file reference, capacity with its allocation units, format URL). A small
 * attribute scanner rather than a full XML parser: the descriptor is untrusted and
 * only these two empty-or-simple elements matter.
 */
import { CorruptImageError } from '../../core/errors.js';

export interface OvfFile {
  id: string;
  href: string;
  size?: number;
  compression?: string;
  chunkSize?: number;
}

export interface OvfDisk {
  diskId: string;
  fileRef?: string;
  /** capacity in bytes */
  capacity?: number;
  populatedSize?: number;
  /** the format URL, e.g. ...vmdk.html#streamOptimized */
  format?: string;
}

export interface OvfDescriptor {
  files: OvfFile[];
  disks: OvfDisk[];
}

/** Disks listed at most (a hostile descriptor could list millions). */
const MAX_ENTRIES = 1024;

const ENTITIES: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" };

function decodeEntities(text: string): string {
  return text.replace(/&(#x[0-9a-fA-F]{1,6}|#[0-9]{1,7}|[a-z]{2,4});/g, (whole, ent: string) => {
    if (ent[0] === '#') {
      const code = ent[1] === 'x' ? parseInt(ent.slice(2), 16) : parseInt(ent.slice(1), 10);
      return code <= 0x10ffff ? String.fromCodePoint(code) : whole;
    }
    return ENTITIES[ent] ?? whole;
  });
}

/** Attributes of one start tag, keyed by local name (the `ovf:` prefix dropped). */
function attributes(tag: string): Map<string, string> {
  const out = new Map<string, string>();
  const re = /([A-Za-z_][\w.-]*:)?([A-Za-z_][\w.-]*)\s*=\s*("([^"]*)"|'([^']*)')/g;
  for (let m = re.exec(tag); m; m = re.exec(tag)) out.set(m[2], decodeEntities(m[4] ?? m[5] ?? ''));
  return out;
}

/** Start tags of elements with this local name (any namespace prefix). */
function elements(xml: string, local: string): Map<string, string>[] {
  const re = new RegExp(`<(?:[A-Za-z_][\\w.-]*:)?${local}(?=[\\s/>])([^>]*)>`, 'g');
  const out: Map<string, string>[] = [];
  for (let m = re.exec(xml); m; m = re.exec(xml)) {
    out.push(attributes(m[1]));
    if (out.length > MAX_ENTRIES) break;
  }
  return out;
}

function nonNegative(text: string | undefined, what: string, file: string): number | undefined {
  if (text === undefined || text.trim() === '') return undefined;
  if (!/^\s*\d+\s*$/.test(text)) throw new CorruptImageError(file, `invalid ${what} '${text}' in the OVF descriptor`);
  const n = Number(text);
  if (!Number.isSafeInteger(n)) throw new CorruptImageError(file, `${what} too large in the OVF descriptor`);
  return n;
}

/**
 * ovf:capacityAllocationUnits as DSP0004 programmatic units restricted to bytes:
 * "byte", "byte * 2^30", "byte * 1024", "byte * 10^3" ...
 */
export function allocationUnits(units: string | undefined, file: string): number {
  if (units === undefined || units.trim() === '') return 1;
  const m = /^\s*byte\s*(?:\*\s*(\d+)\s*(?:\^\s*(\d+))?)?\s*$/i.exec(units);
  if (!m) throw new CorruptImageError(file, `unsupported capacity allocation units '${units}' in the OVF descriptor`);
  const base = m[1] === undefined ? 1 : Number(m[1]);
  const exp = m[2] === undefined ? 1 : Number(m[2]);
  const factor = base ** exp;
  if (!Number.isSafeInteger(factor) || factor < 1) throw new CorruptImageError(file, `capacity allocation units '${units}' out of range`);
  return factor;
}

export function parseOvf(text: string, file: string): OvfDescriptor {
  if (!/<(?:[A-Za-z_][\w.-]*:)?Envelope[\s>]/.test(text)) throw new CorruptImageError(file, 'the OVF descriptor has no Envelope element');
  const files: OvfFile[] = elements(text, 'File').map((a) => ({
    id: a.get('id') ?? '',
    href: a.get('href') ?? '',
    size: nonNegative(a.get('size'), 'file size', file),
    compression: a.get('compression') || undefined,
    chunkSize: nonNegative(a.get('chunkSize'), 'chunk size', file),
  }));
  const disks: OvfDisk[] = elements(text, 'Disk').map((a) => {
    const raw = nonNegative(a.get('capacity'), 'disk capacity', file);
    const unit = allocationUnits(a.get('capacityAllocationUnits'), file);
    const capacity = raw === undefined ? undefined : raw * unit;
    if (capacity !== undefined && !Number.isSafeInteger(capacity)) throw new CorruptImageError(file, 'disk capacity too large in the OVF descriptor');
    return {
      diskId: a.get('diskId') ?? '',
      fileRef: a.get('fileRef') || undefined,
      capacity,
      populatedSize: nonNegative(a.get('populatedSize'), 'populated size', file),
      format: a.get('format') || undefined,
    };
  });
  if (files.length > MAX_ENTRIES || disks.length > MAX_ENTRIES) throw new CorruptImageError(file, 'too many entries in the OVF descriptor');
  return { files, disks };
}
