import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ImageFile } from '../../src/io/file.js';
import { CorruptImageError } from '../../src/core/errors.js';
import { readHeader } from '../../src/formats/qcow2/header.js';
import {
  bitmapInfoForQemu,
  parseBitmapDirectory,
  readBitmapDirectory,
  type BitmapEntry,
} from '../../src/formats/qcow2/bitmaps.js';

const hasQemu = spawnSync('qemu-img', ['--version']).status === 0;
const inCI = process.env.CI === 'true';
// Without qemu-img: skip locally, fail in CI.
const suite = hasQemu || inCI ? describe : describe.skip;

const EXT_BITMAPS = 0x23852875;

function qemuImg(args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  if (r.error) throw r.error;
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function mustQemuImg(args: string[]): void {
  const r = qemuImg(args);
  if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')} failed: ${r.stderr}`);
}

/** `qemu-img info` of a qcow2 image: the parsed JSON, or the error text after "Could not open '…': ". */
// eslint-disable-next-line @typescript-eslint/no-explicit-any -- qemu-img's JSON, probed field by field
function qemuInfo(path: string): { ok: true; json: any } | { ok: false; error: string } {
  const r = qemuImg(['info', '--output=json', '-f', 'qcow2', path]);
  if (r.status === 0) return { ok: true, json: JSON.parse(r.stdout) };
  const line = r.stderr.trim().split('\n')[0];
  const m = /^qemu-img: Could not open '[^']*': (.*)$/.exec(line);
  return { ok: false, error: m ? m[1] : line };
}

/** Position of the bitmaps header extension's data in an image buffer. */
function bitmapsExtAt(img: Buffer): number {
  let pos = img.readUInt32BE(100);
  for (;;) {
    const type = img.readUInt32BE(pos);
    const len = img.readUInt32BE(pos + 4);
    if (type === 0) throw new Error('no bitmaps extension');
    if (type === EXT_BITMAPS) return pos + 8;
    pos += 8 + Math.ceil(len / 8) * 8;
  }
}

interface RawEntry {
  tableOffset: number;
  tableSize?: number;
  flags?: number;
  type?: number;
  granularityBits?: number;
  name: Buffer | string;
  extra?: Buffer;
  nameSize?: number;
}

/** Encodes one directory entry (header, extra data, name, zero padding to 8). */
function dirEntry(e: RawEntry): Buffer {
  const name = typeof e.name === 'string' ? Buffer.from(e.name, 'utf8') : e.name;
  const extra = e.extra ?? Buffer.alloc(0);
  const head = Buffer.alloc(24);
  head.writeBigUInt64BE(BigInt(e.tableOffset), 0);
  head.writeUInt32BE(e.tableSize ?? 1, 8);
  head.writeUInt32BE(e.flags ?? 0, 12);
  head[16] = e.type ?? 1;
  head[17] = e.granularityBits ?? 16;
  head.writeUInt16BE(e.nameSize ?? name.length, 18);
  head.writeUInt32BE(extra.length, 20);
  const body = Buffer.concat([head, extra, name]);
  return Buffer.concat([body, Buffer.alloc((8 - (body.length % 8)) % 8)]);
}

interface Layout {
  img: Buffer;
  ext: number;
  nb: number;
  dirSize: number;
  dirOffset: number;
  /** bitmap table offsets of the existing bitmaps, in directory order */
  tables: number[];
}

function layoutOf(path: string): Layout {
  const img = readFileSync(path);
  const ext = bitmapsExtAt(img);
  const nb = img.readUInt32BE(ext);
  const dirSize = Number(img.readBigUInt64BE(ext + 8));
  const dirOffset = Number(img.readBigUInt64BE(ext + 16));
  const tables: number[] = [];
  let pos = dirOffset;
  for (let i = 0; i < nb; i++) {
    tables.push(Number(img.readBigUInt64BE(pos)));
    pos += Math.ceil((24 + img.readUInt16BE(pos + 18) + img.readUInt32BE(pos + 20)) / 8) * 8;
  }
  return { img, ext, nb, dirSize, dirOffset, tables };
}

/** Writes a copy of `base` whose bitmap directory (same place) is `dir`, with the extension's nb/size overridable. */
function withDirectory(base: Layout, out: string, dir: Buffer, opts: { nb?: number; size?: number; offset?: number } = {}): string {
  // qemu-img leaves the file ending right after the directory: grow it to hold a longer one.
  const img = Buffer.concat([base.img, Buffer.alloc(Math.max(0, base.dirOffset + dir.length - base.img.length))]);
  dir.copy(img, base.dirOffset);
  img.writeUInt32BE(opts.nb ?? Math.max(1, countEntries(dir)), base.ext);
  img.writeBigUInt64BE(BigInt(opts.size ?? dir.length), base.ext + 8);
  img.writeBigUInt64BE(BigInt(opts.offset ?? base.dirOffset), base.ext + 16);
  writeFileSync(out, img);
  return out;
}

function countEntries(dir: Buffer): number {
  let n = 0;
  for (let pos = 0; pos + 24 <= dir.length; n++) {
    pos += Math.ceil((24 + dir.readUInt16BE(pos + 18) + dir.readUInt32BE(pos + 20)) / 8) * 8;
  }
  return n;
}

async function parse(path: string): Promise<BitmapEntry[]> {
  const file = await ImageFile.open(path);
  try {
    const h = await readHeader(file);
    if (!h.bitmaps) throw new Error('image has no bitmaps extension');
    return await readBitmapDirectory(file, h.bitmaps, 2 ** h.clusterBits, h.size);
  } finally {
    await file.close();
  }
}

async function parseError(path: string): Promise<CorruptImageError> {
  try {
    await parse(path);
  } catch (err) {
    expect(err).toBeInstanceOf(CorruptImageError);
    return err as CorruptImageError;
  }
  throw new Error(`expected ${path} to be refused`);
}

/** qimg and qemu-img agree on the bitmaps list (deep equality including key order). */
async function expectSameBitmaps(path: string): Promise<void> {
  const q = qemuInfo(path);
  if (!q.ok) throw new Error(`qemu-img info refused ${path}: ${q.error}`);
  const ours = bitmapInfoForQemu(await parse(path));
  expect(JSON.stringify(ours)).toBe(JSON.stringify(q.json['format-specific'].data.bitmaps));
}

/** Both refuse the image; our one-line message carries qemu's text. */
async function expectBothRefuse(path: string): Promise<string> {
  const q = qemuInfo(path);
  expect(q.ok, `qemu-img info should refuse ${path}`).toBe(false);
  const err = await parseError(path);
  expect(err.message.startsWith('Bitmap directory is corrupted: ')).toBe(true);
  expect(err.message).not.toContain('\n');
  if (!q.ok) expect(err.message).toContain(q.error);
  return err.message;
}

suite('qcow2 bitmap directory', () => {
  let dir = '';
  let base: Layout;
  let big: Layout;
  let n = 0;
  const tmp = (): string => join(dir, `t${n++}.qcow2`);

  beforeAll(() => {
    if (!hasQemu) throw new Error('qemu-img is required for these tests (CI=true)');
    dir = mkdtempSync(join(tmpdir(), 'qimg-bitmaps-'));
    const b = join(dir, 'b.qcow2');
    mustQemuImg(['create', '-q', '-f', 'qcow2', b, '1M']);
    mustQemuImg(['bitmap', '--add', b, 'b0']);
    mustQemuImg(['bitmap', '--add', '--disable', '-g', '128k', b, 'b1']);
    base = layoutOf(b);
    const g = join(dir, 'big.qcow2');
    mustQemuImg(['create', '-q', '-f', 'qcow2', g, '1G']);
    mustQemuImg(['bitmap', '--add', g, 'b0']);
    big = layoutOf(g);
  });

  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('lists the bitmaps of a qemu-made image exactly like qemu-img info', async () => {
    const path = join(dir, 'b.qcow2');
    await expectSameBitmaps(path);
    const entries = await parse(path);
    expect(entries.map((e) => [e.name, e.granularityBits, e.granularity, e.auto, e.inUse, e.type, e.extraData.length])).toEqual([
      ['b0', 16, 65536, true, false, 1, 0],
      ['b1', 17, 131072, false, false, 1, 0],
    ]);
    expect(entries[0].tableOffset % 65536).toBe(0);
    expect(entries[0].tableSize).toBeGreaterThan(0);
  });

  it('prints qemu key order and flag order (flags, name, granularity; in-use before auto)', () => {
    const info = bitmapInfoForQemu([
      { name: 'x', nameBytes: Buffer.from('x'), granularityBits: 9, granularity: 512, flags: 3, inUse: true, auto: true, type: 1, tableOffset: 65536, tableSize: 1, extraData: Buffer.alloc(0) },
    ]);
    expect(JSON.stringify(info)).toBe('[{"flags":["in-use","auto"],"name":"x","granularity":512}]');
  });

  it('matches qemu-img info for in-use bitmaps and unusual but valid entries', async () => {
    const [t0, t1] = base.tables;
    const variants: Buffer[][] = [
      [dirEntry({ tableOffset: t0, flags: 3, name: 'b0' }), dirEntry({ tableOffset: t1, flags: 1, granularityBits: 17, name: 'b1' })],
      [dirEntry({ tableOffset: t0, flags: 2, granularityBits: 31, name: 'max-granularity' }), dirEntry({ tableOffset: t1, granularityBits: 9, name: 'min' })],
      [dirEntry({ tableOffset: t0, flags: 2, name: 'x'.repeat(1023) }), dirEntry({ tableOffset: t1, name: 'é"\\\t✓' })],
      [dirEntry({ tableOffset: t0, flags: 2, name: Buffer.from('a\0b') }), dirEntry({ tableOffset: t1, name: 'b1' })],
    ];
    for (const v of variants) await expectSameBitmaps(withDirectory(base, tmp(), Buffer.concat(v)));
    // A directory that contains only the first of two entries, announced as one bitmap.
    const one = dirEntry({ tableOffset: t0, flags: 2, name: 'only' });
    await expectSameBitmaps(withDirectory(base, tmp(), one, { nb: 1 }));
  });

  it('refuses what qemu refuses: granularity, flags, type, table offset/size, names, extra data', async () => {
    const [t0, t1] = base.tables;
    const b1 = dirEntry({ tableOffset: t1, granularityBits: 17, name: 'b1' });
    const bad: Array<[string, RawEntry, string]> = [
      ['granularity 8', { tableOffset: t0, flags: 2, granularityBits: 8, name: 'b0' }, 'granularity bits 8'],
      ['granularity 32', { tableOffset: t0, flags: 2, granularityBits: 32, name: 'b0' }, 'granularity bits 32'],
      ['reserved flag bit 3', { tableOffset: t0, flags: 8 | 2, name: 'b0' }, 'unsupported flags 0x8'],
      ['extra_data_compatible flag', { tableOffset: t0, flags: 4 | 2, name: 'b0' }, 'unsupported flags 0x4'],
      ['type 2', { tableOffset: t0, flags: 2, type: 2, name: 'b0' }, 'type 2'],
      ['unaligned table', { tableOffset: t0 + 512, flags: 2, name: 'b0' }, 'not cluster aligned'],
      ['zero table offset', { tableOffset: 0, flags: 2, name: 'b0' }, 'offset is zero'],
      ['zero table size', { tableOffset: t0, tableSize: 0, flags: 2, name: 'b0' }, 'size is zero'],
      ['table too big', { tableOffset: t0, tableSize: 8193, flags: 3, name: 'b0' }, 'exceeds'],
      ['name too long', { tableOffset: t0, flags: 2, name: 'x'.repeat(1024) }, 'name size 1024'],
      ['extra data', { tableOffset: t0, flags: 2, name: 'b0', extra: Buffer.from('12345678') }, 'extra data'],
      ['extra data + compatible flag', { tableOffset: t0, flags: 6, name: 'b0', extra: Buffer.from('1234') }, 'extra data'],
    ];
    for (const [what, entry, detail] of bad) {
      const path = withDirectory(base, tmp(), Buffer.concat([dirEntry(entry), b1]));
      const msg = await expectBothRefuse(path);
      expect(msg, what).toContain(detail);
    }
  });

  it('refuses a duplicate name like qemu', async () => {
    const [t0, t1] = base.tables;
    const d = Buffer.concat([dirEntry({ tableOffset: t0, flags: 2, name: 'b0' }), dirEntry({ tableOffset: t1, name: 'b0' })]);
    expect(await expectBothRefuse(withDirectory(base, tmp(), d))).toContain('Bitmap already exists: b0');
  });

  it('refuses an entry count that differs from the header extension', async () => {
    const d = Buffer.concat(base.tables.map((t, i) => dirEntry({ tableOffset: t, name: `b${i}` })));
    expect(await expectBothRefuse(withDirectory(base, tmp(), d, { nb: 1 }))).toContain('More bitmaps found');
    expect(await expectBothRefuse(withDirectory(base, tmp(), d, { nb: 3 }))).toContain('Less bitmaps found');
  });

  it('refuses entries that do not exactly fill the directory', async () => {
    const d = Buffer.concat(base.tables.map((t, i) => dirEntry({ tableOffset: t, name: `b${i}` })));
    for (const size of [d.length + 8, d.length - 8, d.length - 4, 20]) {
      const path = withDirectory(base, tmp(), Buffer.concat([d, Buffer.alloc(8)]), { nb: 2, size });
      expect(await expectBothRefuse(path)).toContain('Broken bitmap directory');
    }
    // name_size pointing past the end of the directory
    const long = dirEntry({ tableOffset: base.tables[0], name: 'b0', nameSize: 200 });
    expect(await expectBothRefuse(withDirectory(base, tmp(), long, { nb: 1, size: 32 }))).toContain('Broken bitmap directory');
  });

  it("checks that a consistent bitmap's table covers the whole disk (given the virtual size)", async () => {
    const t = big.tables[0];
    // 1 table entry x 64 KiB x 8 bits x 512 B = 256 MiB < 1 GiB: refused unless in use.
    expect(await expectBothRefuse(withDirectory(big, tmp(), dirEntry({ tableOffset: t, flags: 2, granularityBits: 9, name: 'b0' })))).toContain(
      'covers',
    );
    await expectSameBitmaps(withDirectory(big, tmp(), dirEntry({ tableOffset: t, flags: 3, granularityBits: 9, name: 'b0' })));
    await expectSameBitmaps(withDirectory(big, tmp(), dirEntry({ tableOffset: t, flags: 2, granularityBits: 12, name: 'b0' })));
  });

  it('refuses name_size 0 (the spec forbids it; qemu 7.2 lets it through)', async () => {
    const [t0, t1] = base.tables;
    const path = withDirectory(base, tmp(), Buffer.concat([dirEntry({ tableOffset: t0, flags: 2, name: '' }), dirEntry({ tableOffset: t1, name: 'b1' })]));
    expect(qemuInfo(path).ok).toBe(true);
    const err = await parseError(path);
    expect(err.message).toBe("Bitmap directory is corrupted: Bitmap '' doesn't satisfy the constraints (name size is zero)");
  });

  it('refuses a directory that lies outside the file', async () => {
    const d = Buffer.concat(base.tables.map((t, i) => dirEntry({ tableOffset: t, name: `b${i}` })));
    const path = withDirectory(base, tmp(), d, { nb: 2, offset: 1000 * 65536 });
    expect(qemuInfo(path).ok).toBe(false);
    const err = await parseError(path);
    expect(err.message).toMatch(/^Bitmap directory is corrupted: directory \(offset 65536000, size 64\) lies beyond the end of the file/);
  });

  it('keeps messages on one line and reports errors with the file name', async () => {
    const [t0, t1] = base.tables;
    const path = withDirectory(
      base,
      tmp(),
      Buffer.concat([dirEntry({ tableOffset: t0, flags: 2, granularityBits: 8, name: 'evil\nname' }), dirEntry({ tableOffset: t1, name: 'b1' })]),
    );
    const err = await parseError(path);
    expect(err.file).toBe(path);
    expect(err.message).toBe("Bitmap directory is corrupted: Bitmap 'evil\\x0aname' doesn't satisfy the constraints (granularity bits 8 not in 9..31)");
  });

  it('parseBitmapDirectory works on a buffer without a file', () => {
    const d = Buffer.concat([dirEntry({ tableOffset: 65536, flags: 2, name: 'a' }), dirEntry({ tableOffset: 131072, flags: 1, granularityBits: 20, name: 'b' })]);
    const entries = parseBitmapDirectory(d, 2, 65536);
    expect(bitmapInfoForQemu(entries)).toEqual([
      { flags: ['auto'], name: 'a', granularity: 65536 },
      { flags: ['in-use'], name: 'b', granularity: 1048576 },
    ]);
    expect(() => parseBitmapDirectory(d, 3, 65536)).toThrow(CorruptImageError);
    expect(() => parseBitmapDirectory(d, 2, 65536 * 4)).toThrow(/not cluster aligned/);
    const huge = Buffer.from(d);
    huge.writeBigUInt64BE(1n << 60n, 0);
    expect(() => parseBitmapDirectory(huge, 2, 65536)).toThrow(/2\^53 or more/);
  });
});
