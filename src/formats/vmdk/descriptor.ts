/**
 * The text descriptor of a VMDK (embedded after a sparse header, or a file of its own):
 * probing, the values qemu reads from it (createType, CID, parentCID,
 * parentFileNameHint, extent lines) with qemu's leniency and messages, and the text
 * qemu writes when it creates an image.
 */
import { CorruptImageError } from '../../core/errors.js';
import { VMDK3_MAGIC, VMDK4_MAGIC } from './constants.js';

/** Probe score: 100 for a sparse magic or a text descriptor whose first non-comment line is version=1..3. */
export function probeVmdk(head: Buffer): number {
  if (head.length < 4) return 0;
  const magic = head.readUInt32BE(0);
  if (magic === VMDK3_MAGIC || magic === VMDK4_MAGIC) return 100;
  const end = head.length;
  let p = 0;
  while (p < end) {
    const c = head[p];
    if (c === 0x23 /* # */) {
      while (p < end && head[p] !== 0x0a) p++;
      p++;
      continue;
    }
    if (c === 0x20) {
      // blank lines (spaces only) may precede the version line
      while (p < end && head[p] === 0x20) p++;
      if (p < end && head[p] === 0x0d) p++;
      if (p === end || head[p] !== 0x0a) return 0;
      p++;
      continue;
    }
    const rest = head.subarray(p, Math.min(end, p + 11)).toString('latin1');
    if (/^version=[123](\n|\r\n)/.test(rest)) return 100;
    return 0;
  }
  return 0;
}

/** The descriptor as C code sees it: the bytes up to the first NUL. */
export function descriptorText(buf: Buffer): string {
  const nul = buf.indexOf(0);
  return buf.subarray(0, nul < 0 ? buf.length : nul).toString('latin1');
}

/** `name="value"` as qemu finds it: first occurrence of the name, two characters skipped, up to the next quote. */
export function descriptorValue(desc: string, name: string): string | undefined {
  const at = desc.indexOf(name);
  if (at < 0) return undefined;
  const start = at + name.length + 2;
  if (start >= desc.length) return undefined;
  const end = desc.indexOf('"', start);
  if (end < 0) return undefined;
  return desc.slice(start, end);
}

const isSpace = (c: string | undefined) => c === ' ' || c === '\t' || c === '\n' || c === '\v' || c === '\f' || c === '\r';

/** sscanf("%x") at `pos`: leading blanks, an optional 0x, hex digits; null when none. */
function scanHex32(s: string, pos: number): number | null {
  let i = pos;
  while (isSpace(s[i])) i++;
  let neg = false;
  if (s[i] === '+' || s[i] === '-') neg = s[i++] === '-';
  if (s[i] === '0' && (s[i + 1] === 'x' || s[i + 1] === 'X') && /[0-9a-fA-F]/.test(s[i + 2] ?? '')) i += 2;
  const m = /^[0-9a-fA-F]+/.exec(s.slice(i, i + 64));
  if (!m) return null;
  let v = BigInt('0x' + m[0]);
  if (v > 0xffffffffffffffffn) v = 0xffffffffffffffffn;
  if (neg) v = (1n << 64n) - v;
  return Number(v & 0xffffffffn);
}

/**
 * CID (or parentCID) as qemu reads it: the first occurrence of the word anywhere,
 * then "=" skipped, then a hex number. Undefined when absent or malformed.
 */
export function readCid(desc: string, parent: boolean): number | undefined {
  const word = parent ? 'parentCID' : 'CID';
  const at = desc.indexOf(word);
  if (at < 0) return undefined;
  return scanHex32(desc, at + word.length + 1) ?? undefined;
}

/** Longest backing file name qemu keeps (sizeof(bs->backing_file) - 1). */
const MAX_HINT = 1023;

/** parentFileNameHint="..." (undefined: none); null when present but unusable (qemu: EINVAL). */
export function parentHint(desc: string): string | undefined | null {
  const word = 'parentFileNameHint';
  const at = desc.indexOf(word);
  if (at < 0) return undefined;
  const start = at + word.length + 2;
  const end = desc.indexOf('"', start);
  if (start > desc.length || end < 0 || end - start > MAX_HINT) return null;
  return desc.slice(start, end);
}

/**
 * Rewrites the CID as qemu does on the first write after open: everything from just
 * after "CID=" up to "parentCID" becomes the new hex value and a newline.
 */
export function replaceCid(desc: string, cid: number): string | null {
  const parentAt = desc.indexOf('parentCID');
  if (parentAt < 0) return null;
  const tail = desc.slice(parentAt);
  const at = desc.indexOf('CID');
  if (at < 0) return desc;
  const head = desc.slice(0, at + 4);
  return `${head}${(cid >>> 0).toString(16)}\n${tail}`;
}

export interface ExtentLine {
  access: string;
  sectors: number;
  type: string;
  fname: string;
  /** FLAT extents: start of the data in the file, in sectors */
  flatOffset: number;
}

/** One extent line scanned like qemu's sscanf("%10s %ld %10s \"%511[^\n\r\"]\" %ld"). */
function scanExtentLine(s: string, from: number): { matches: number; access: string; sectors: bigint; type: string; fname: string; flatOffset: bigint } {
  const r = { matches: 0, access: '', sectors: 0n, type: '', fname: '', flatOffset: -1n };
  let i = from;
  const skip = () => {
    while (isSpace(s[i])) i++;
  };
  const word = (max: number): string | null => {
    skip();
    const start = i;
    while (i < s.length && i - start < max && !isSpace(s[i])) i++;
    return i > start ? s.slice(start, i) : null;
  };
  const long = (): bigint | null => {
    skip();
    const m = /^[+-]?[0-9]+/.exec(s.slice(i, i + 40));
    if (!m) return null;
    // longer digit strings saturate like strtol
    const digits = /^[+-]?[0-9]+/.exec(s.slice(i))![0];
    i += digits.length;
    let v = BigInt(digits);
    const max = (1n << 63n) - 1n;
    if (v > max) v = max;
    if (v < -max - 1n) v = -max - 1n;
    return v;
  };
  const access = word(10);
  if (access === null) return r;
  r.access = access;
  r.matches = 1;
  const sectors = long();
  if (sectors === null) return r;
  r.sectors = sectors;
  r.matches = 2;
  const type = word(10);
  if (type === null) return r;
  r.type = type;
  r.matches = 3;
  skip();
  if (s[i] !== '"') return r;
  i++;
  const start = i;
  while (i < s.length && i - start < 511 && s[i] !== '\n' && s[i] !== '\r' && s[i] !== '"') i++;
  if (i === start) return r;
  r.fname = s.slice(start, i);
  r.matches = 4;
  if (s[i] !== '"') return r;
  i++;
  const off = long();
  if (off === null) return r;
  r.flatOffset = off;
  r.matches = 5;
  return r;
}

const KNOWN_TYPES = new Set(['FLAT', 'SPARSE', 'VMFS', 'VMFSSPARSE', 'SESPARSE']);

/**
 * The extent lines qemu uses: lines that do not scan, or whose access is not RW, or
 * whose type is unknown or size not positive, are skipped; a FLAT line without an
 * offset (or a VMFS line with one, or any other type with one) is an error.
 */
export function parseExtentLines(desc: string, file: string): ExtentLine[] {
  const out: ExtentLine[] = [];
  for (let p = 0; p < desc.length; ) {
    const nl = desc.indexOf('\n', p);
    const next = nl < 0 ? desc.length : nl + 1;
    const r = scanExtentLine(desc, p);
    const invalid = () => new CorruptImageError(file, `Invalid extent line: ${desc.slice(p, nl < 0 ? desc.length : nl)}`);
    if (r.matches >= 4 && r.access === 'RW') {
      let flatOffset = r.flatOffset;
      if (r.type === 'FLAT') {
        if (r.matches !== 5 || flatOffset < 0n) throw invalid();
      } else if (r.type === 'VMFS') {
        if (r.matches !== 4) throw invalid();
        flatOffset = 0n;
      } else if (r.matches !== 4) {
        throw invalid();
      }
      if (r.sectors > 0n && KNOWN_TYPES.has(r.type)) {
        if (r.sectors > BigInt(Number.MAX_SAFE_INTEGER) / 512n || flatOffset > BigInt(Number.MAX_SAFE_INTEGER) / 512n) {
          throw new CorruptImageError(file, `Extent too large: ${desc.slice(p, nl < 0 ? desc.length : nl)}`);
        }
        out.push({ access: r.access, sectors: Number(r.sectors), type: r.type, fname: r.fname, flatOffset: Number(flatOffset) });
      }
    }
    p = next;
  }
  return out;
}

/** createType values qemu opens from a descriptor file. */
export const DESCRIPTOR_CREATE_TYPES = ['monolithicFlat', 'vmfs', 'vmfsSparse', 'seSparse', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat'];

export interface DescriptorSpec {
  cid: number;
  parentCid: number;
  createType: string;
  parentFileNameHint?: string;
  /** extent lines, each ending in a newline */
  extentLines: string[];
  hwVersion: string;
  cylinders: number;
  heads: number;
  adapterType: string;
  toolsVersion: string;
}

/** The descriptor text qemu-img writes for a new image. */
export function buildDescriptor(d: DescriptorSpec): string {
  const hex = (n: number) => (n >>> 0).toString(16);
  return (
    '# Disk DescriptorFile\n' +
    'version=1\n' +
    `CID=${hex(d.cid)}\n` +
    `parentCID=${hex(d.parentCid)}\n` +
    `createType="${d.createType}"\n` +
    (d.parentFileNameHint !== undefined ? `parentFileNameHint="${d.parentFileNameHint}"` : '') +
    '\n' +
    '# Extent description\n' +
    d.extentLines.join('') +
    '\n' +
    '# The Disk Data Base\n' +
    '#DDB\n' +
    '\n' +
    `ddb.virtualHWVersion = "${d.hwVersion}"\n` +
    `ddb.geometry.cylinders = "${d.cylinders}"\n` +
    `ddb.geometry.heads = "${d.heads}"\n` +
    'ddb.geometry.sectors = "63"\n' +
    `ddb.adapterType = "${d.adapterType}"\n` +
    `ddb.toolsVersion = "${d.toolsVersion}"\n`
  );
}
