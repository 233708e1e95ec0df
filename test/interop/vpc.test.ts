/**
 * VHD (qemu's vpc driver) against qemu-img/qemu-io 7.2 in both directions: create
 * (every option, the CHS sizing, the refusals), reads of qemu's images (info, map,
 * convert, probed and with -f vpc), qemu's reads of qimg's images, writes each way,
 * vhdiinfo as a second opinion, and differencing disks (which qemu 7.2 reads as
 * standalone disks; qimg reads them through their parent).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, readFileSync, statSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, sha256File, tempDir, type RunResult } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const hasVhdi = spawnSync('vhdiinfo', ['-V']).status === 0;
if (!hasVhdi && process.env.CI === 'true') throw new Error('vhdiinfo (libvhdi-utils) is required under CI=true');
const tmp = tempDir('qimg-vpc-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
const P = (name: string) => join(d, name);

/** map --output=json without the "compressed" key qemu 7.2 does not print. */
const mapJson = (text: string) => (JSON.parse(text) as Array<Record<string, unknown>>).map(({ compressed: _c, ...rest }) => rest);
const strip = (r: RunResult) => r.stderr.replace(/^qemu-img: /gm, '').replace(/^qimg: /gm, '');

/** Footer fields that differ between any two creations: timestamp, checksum, unique id. */
function maskFooter(buf: Buffer, at: number): Buffer {
  const b = Buffer.from(buf);
  b.fill(0, at + 24, at + 28);
  b.fill(0, at + 64, at + 84);
  return b;
}

/** A pattern file: bytes that differ per sector, with zero gaps. */
function patternRaw(name: string, size: number, ranges: Array<[number, number, number]>): string {
  const b = Buffer.alloc(size);
  for (const [off, len, seed] of ranges) for (let i = 0; i < len; i++) b[off + i] = (seed + i * 7 + Math.floor(i / 512)) & 0xff;
  writeFileSync(P(name), b);
  return P(name);
}

// ------------------------------------------------------------------ differencing disks by hand

/** UTF-16 of `s` (LE or BE). */
function utf16(s: string, be: boolean): Buffer {
  const b = Buffer.from(s, 'utf16le');
  if (be) b.swap16();
  return b;
}

function checksum(buf: Buffer, at: number, len: number, field: number): void {
  buf.writeUInt32BE(0, at + field);
  let sum = 0;
  for (let i = at; i < at + len; i++) sum += buf[i];
  buf.writeUInt32BE(~sum >>> 0, at + field);
}

/**
 * Turns a qemu-made dynamic VHD into a differencing disk of `parent`: disk type 4,
 * the parent's unique id, name and locators (data appended before the final footer).
 */
function makeDifferencing(child: string, parentUuid: Buffer, name: string, locators: Array<{ code: string; data: Buffer }>): void {
  const old = readFileSync(child);
  const body = old.subarray(0, old.length - 512);
  const parts: Buffer[] = [Buffer.from(body)];
  let at = body.length;
  const locs: Array<{ code: string; offset: number; length: number }> = [];
  for (const l of locators) {
    const space = Math.ceil(l.data.length / 512) * 512;
    const pad = Buffer.alloc(space);
    l.data.copy(pad);
    parts.push(pad);
    locs.push({ code: l.code, offset: at, length: l.data.length });
    at += space;
  }
  const image = Buffer.concat([...parts, Buffer.alloc(512)]);
  const footer = Buffer.from(old.subarray(0, 512));
  footer.writeUInt32BE(4, 60);
  checksum(footer, 0, 512, 64);
  footer.copy(image, 0);
  footer.copy(image, image.length - 512);
  const h = 512;
  parentUuid.copy(image, h + 40);
  image.fill(0, h + 64, h + 576);
  utf16(name, true).copy(image, h + 64);
  locs.forEach((l, i) => {
    const e = h + 576 + 24 * i;
    image.write(l.code, e, 'latin1');
    image.writeUInt32BE(Math.ceil(l.length / 512) * 512, e + 4);
    image.writeUInt32BE(l.length, e + 8);
    image.writeBigUInt64BE(BigInt(l.offset), e + 16);
  });
  checksum(image, h, 1024, 36);
  writeFileSync(child, image);
}

const uuidOf = (file: string) => Buffer.from(readFileSync(file).subarray(68, 84));

beforeAll(() => {
  if (!enabled) return;
  ok(qemuImg(['create', '-q', '-f', 'vpc', 'q.vhd', '12M'], d));
  ok(qemuIo(['-c', 'write -P 0xab 0 1M', '-c', 'write -P 0xcd 4M 64k', '-c', 'write -P 0xef 10M 3k', 'q.vhd'], d));
  ok(qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', 'qf.vhd', '5M'], d));
  ok(qemuIo(['-f', 'vpc', '-c', 'write -P 0x5a 1M 100k', 'qf.vhd'], d));
});

describe.runIf(enabled)('vpc create, as qemu-img create', () => {
  const cases: Array<{ name: string; opts: string[]; size: string }> = [
    { name: 'dynamic 100M', opts: [], size: '100M' },
    { name: 'dynamic odd size', opts: [], size: '1500000' },
    { name: 'dynamic 0', opts: [], size: '0' },
    { name: 'dynamic beyond CHS', opts: [], size: '200G' },
    { name: 'dynamic force_size', opts: ['-o', 'force_size=on'], size: '1500000' },
    { name: 'dynamic 2040G force_size', opts: ['-o', 'force_size=on,subformat=dynamic'], size: '2040G' },
    { name: 'fixed 5M', opts: ['-o', 'subformat=fixed'], size: '5M' },
    { name: 'fixed Azure', opts: ['-o', 'subformat=fixed,force_size=on'], size: '10M' },
    { name: 'fixed flag option', opts: ['-o', 'subformat=fixed', '-o', 'noforce_size'], size: '1500000' },
    { name: 'too large', opts: [], size: '2041G' },
    { name: 'too large force_size', opts: ['-o', 'force_size=on'], size: '2041G' },
    { name: 'bad subformat', opts: ['-o', 'subformat=bogus'], size: '1M' },
    { name: 'bad bool', opts: ['-o', 'force_size=maybe'], size: '1M' },
    { name: 'unknown option', opts: ['-o', 'cluster_size=64k'], size: '1M' },
  ];
  it.each(cases)('$name', ({ name, opts, size }) => {
    const tag = name.replace(/\W+/g, '-');
    const a = `c-${tag}-qemu.vhd`;
    const b = `c-${tag}-qimg.vhd`;
    const q = qemuImg(['create', '-f', 'vpc', ...opts, a, size], d);
    const r = qimg(['create', '-f', 'vpc', ...opts, b, size], { cwd: d });
    expect(r.status, r.stderr).toBe(q.status);
    expect(r.stdout).toBe(q.stdout.replace(a, b));
    expect(strip(r)).toBe(strip(q).replace(a, b));
    // qemu-img leaves the empty file its protocol layer made; qimg removes what it created
    if (q.status !== 0) {
      expect(existsSync(P(b))).toBe(false);
      return;
    }
    const sa = statSync(P(a)).size;
    expect(statSync(P(b)).size).toBe(sa);
    // the metadata must match qemu's byte for byte (apart from time, id and checksum)
    const fixed = opts.join(',').includes('fixed');
    const read = (f: string) => (fixed ? readFileSync(P(f)).subarray(sa - 512) : readFileSync(P(f)));
    const masked = (f: string) => (fixed ? maskFooter(read(f), 0) : maskFooter(maskFooter(read(f), 0), sa - 512));
    expect(masked(b).equals(masked(a)), 'metadata differs from qemu-img\'s').toBe(true);
    const info = (f: string) => JSON.parse(ok(qemuImg(['info', '-f', 'vpc', '--output=json', f], d)).stdout);
    const ia = info(a);
    const ib = info(b);
    expect({ ...ib, filename: a, 'actual-size': 0 }).toEqual({ ...ia, 'actual-size': 0 });
  });

  it('-o help lists qemu-img\'s options', () => {
    expect(ok(qimg(['create', '-f', 'vpc', '-o', 'help'])).stdout).toBe(ok(qemuImg(['create', '-f', 'vpc', '-o', 'help'])).stdout);
  });

  it('check: no check for vpc (exit 63)', () => {
    const q = qemuImg(['check', 'q.vhd'], d);
    const r = qimg(['check', 'q.vhd'], { cwd: d });
    expect(q.status).toBe(63);
    expect(r.status).toBe(63);
    expect(q.stderr).toBe('qemu-img: This image format does not support checks\n');
    // qimg names the file in this message for every format (test/interop/check.test.ts)
    expect(r.stderr).toBe('qimg: q.vhd: This image format does not support checks\n');
  });
});

describe.runIf(enabled)('vpc: qemu writes, qimg reads', () => {
  it('dynamic: convert (probed and -f vpc), info and map as qemu-img', () => {
    ok(qemuImg(['convert', '-O', 'raw', 'q.vhd', 'q-qemu.raw'], d));
    ok(qimg(['convert', '-O', 'raw', 'q.vhd', 'q-qimg.raw'], { cwd: d }));
    ok(qimg(['convert', '-f', 'vpc', '-O', 'raw', 'q.vhd', 'q-qimg2.raw'], { cwd: d }));
    expect(sha256File(P('q-qimg.raw'))).toBe(sha256File(P('q-qemu.raw')));
    expect(sha256File(P('q-qimg2.raw'))).toBe(sha256File(P('q-qemu.raw')));
    for (const out of [['--output=json'], []]) {
      expect(ok(qimg(['info', ...out, 'q.vhd'], { cwd: d })).stdout).toBe(ok(qemuImg(['info', ...out, 'q.vhd'], d)).stdout);
    }
    expect(mapJson(ok(qimg(['map', '--output=json', 'q.vhd'], { cwd: d })).stdout)).toEqual(mapJson(ok(qemuImg(['map', '--output=json', 'q.vhd'], d)).stdout));
    expect(ok(qimg(['map', 'q.vhd'], { cwd: d })).stdout).toBe(ok(qemuImg(['map', 'q.vhd'], d)).stdout);
  });

  it('fixed: probed as raw, read as VHD with -f vpc', () => {
    for (const f of [[], ['-f', 'vpc']]) {
      for (const out of [['--output=json'], []]) {
        expect(ok(qimg(['info', ...f, ...out, 'qf.vhd'], { cwd: d })).stdout).toBe(ok(qemuImg(['info', ...f, ...out, 'qf.vhd'], d)).stdout);
      }
      expect(mapJson(ok(qimg(['map', ...f, '--output=json', 'qf.vhd'], { cwd: d })).stdout)).toEqual(mapJson(ok(qemuImg(['map', ...f, '--output=json', 'qf.vhd'], d)).stdout));
    }
    ok(qemuImg(['convert', '-f', 'vpc', '-O', 'raw', 'qf.vhd', 'qf-qemu.raw'], d));
    ok(qimg(['convert', '-f', 'vpc', '-O', 'raw', 'qf.vhd', 'qf-qimg.raw'], { cwd: d }));
    expect(sha256File(P('qf-qimg.raw'))).toBe(sha256File(P('qf-qemu.raw')));
  });
});

describe.runIf(enabled)('vpc: qimg writes, qemu reads', () => {
  const size = 8390656; // an 8M disk's CHS size
  beforeAll(() => {
    patternRaw('src.raw', size, [[0, 1 << 20, 1], [3 << 20, 4096, 2], [(5 << 20) + 512, 3 * 512, 3], [size - 1024, 1024, 4]]);
  });

  it.each([['dynamic'], ['fixed']])('convert -O vpc (%s): compare, info and vhdiinfo agree', (sub) => {
    const out = `w-${sub}.vhd`;
    ok(qimg(['convert', '-O', 'vpc', '-o', `subformat=${sub}`, 'src.raw', out], { cwd: d }));
    const qref = `w-${sub}-qemu.vhd`;
    ok(qemuImg(['convert', '-O', 'vpc', '-o', `subformat=${sub}`, 'src.raw', qref], d));
    expect(ok(qemuImg(['compare', '-f', 'raw', '-F', 'vpc', 'src.raw', out], d)).stdout).toContain('Images are identical.');
    const info = (f: string) => JSON.parse(ok(qemuImg(['info', '-f', 'vpc', '--output=json', f], d)).stdout);
    expect({ ...info(out), filename: '', 'actual-size': 0 }).toEqual({ ...info(qref), filename: '', 'actual-size': 0 });
    // the same blocks allocated as qemu-img's own conversion
    expect(statSync(P(out)).size).toBe(statSync(P(qref)).size);
    if (hasVhdi) {
      const v = spawnSync('vhdiinfo', [P(out)], { encoding: 'utf8' });
      expect(v.status, v.stderr).toBe(0);
      expect(v.stdout).toContain(sub === 'fixed' ? 'Disk type\t\t: Fixed' : 'Disk type\t\t: Dynamic');
      expect(v.stdout).toContain(`Media size\t\t: 8.0 MiB (${size} bytes)`);
    }
  });

  it('qemu-io writes into a qimg-made image, qimg reads them back', () => {
    ok(qimg(['create', '-q', '-f', 'vpc', 'mix.vhd', '8M'], { cwd: d }));
    ok(qemuIo(['-c', 'write -P 0x31 1M 600k', '-c', 'write -P 0x32 7M 512', 'mix.vhd'], d));
    ok(qimg(['convert', '-O', 'raw', 'mix.vhd', 'mix-qimg.raw'], { cwd: d }));
    ok(qemuImg(['convert', '-O', 'raw', 'mix.vhd', 'mix-qemu.raw'], d));
    expect(sha256File(P('mix-qimg.raw'))).toBe(sha256File(P('mix-qemu.raw')));
  });

  it('qimg writes into qemu-made images (convert -n), qemu reads them back', () => {
    ok(qemuImg(['create', '-q', '-f', 'vpc', 'into.vhd', '8M'], d));
    ok(qemuIo(['-c', 'write -P 0x77 2M 1M', '-c', 'write -P 0x78 6M 4k', 'into.vhd'], d));
    ok(qimg(['convert', '-n', '-O', 'vpc', 'src.raw', 'into.vhd'], { cwd: d }));
    expect(ok(qemuImg(['compare', '-f', 'raw', '-F', 'vpc', 'src.raw', 'into.vhd'], d)).stdout).toContain('Images are identical.');
    // and qemu can go on writing into it
    ok(qemuIo(['-c', 'write -P 0x79 4M 64k', 'into.vhd'], d));
    ok(qimg(['convert', '-O', 'raw', 'into.vhd', 'into-qimg.raw'], { cwd: d }));
    ok(qemuImg(['convert', '-O', 'raw', 'into.vhd', 'into-qemu.raw'], d));
    expect(sha256File(P('into-qimg.raw'))).toBe(sha256File(P('into-qemu.raw')));
    if (hasVhdi) expect(spawnSync('vhdiinfo', [P('into.vhd')]).status).toBe(0);

    ok(qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', 'intof.vhd', '8M'], d));
    ok(qimg(['convert', '-n', '-O', 'vpc', 'src.raw', 'intof.vhd'], { cwd: d }));
    expect(ok(qemuImg(['compare', '-f', 'raw', '-F', 'vpc', 'src.raw', 'intof.vhd'], d)).stdout).toContain('Images are identical.');
  });
});

describe.runIf(enabled)('vpc differencing disks', () => {
  const size = 8390656;
  beforeAll(() => {
    mkdirSync(P('diff'));
    ok(qemuImg(['create', '-q', '-f', 'vpc', 'diff/parent.vhd', '8M'], d));
    ok(qemuIo(['-c', `write -P 0x11 0 ${size}`, 'diff/parent.vhd'], d));
    ok(qemuImg(['create', '-q', '-f', 'vpc', 'diff/child.vhd', '8M'], d));
    ok(qemuIo(['-c', 'write -P 0x22 2M 64k', 'diff/child.vhd'], d));
    // keep only the written 64 KiB of block 1 in its bitmap: the rest is the parent's
    const c = readFileSync(P('diff/child.vhd'));
    const bat1 = c.readUInt32BE(1536 + 4) * 512;
    c.fill(0, bat1, bat1 + 512);
    c.fill(0xff, bat1, bat1 + 16);
    writeFileSync(P('diff/child.vhd'), c);
    copyFileSync(P('diff/child.vhd'), P('diff/mac.vhd'));
    copyFileSync(P('diff/child.vhd'), P('diff/wrong.vhd'));
    makeDifferencing(P('diff/child.vhd'), uuidOf(P('diff/parent.vhd')), 'C:\\vms\\parent.vhd', [
      { code: 'W2ku', data: utf16('C:\\vms\\parent.vhd', false) },
      { code: 'W2ru', data: utf16('.\\parent.vhd', false) },
    ]);
    makeDifferencing(P('diff/mac.vhd'), uuidOf(P('diff/parent.vhd')), 'parent.vhd', [
      { code: 'MacX', data: Buffer.from(`file://${encodeURI(P('diff/parent.vhd'))}`) },
    ]);
    makeDifferencing(P('diff/wrong.vhd'), uuidOf(P('q.vhd')), 'parent.vhd', [{ code: 'W2ru', data: utf16('.\\parent.vhd', false) }]);
  });

  const expected = () => {
    const b = Buffer.alloc(size, 0x11);
    b.fill(0x22, 2 << 20, (2 << 20) + 65536);
    return b;
  };

  it('reads through the parent (W2ru relative to the child; MacX URL as fallback)', () => {
    for (const name of ['child.vhd', 'mac.vhd']) {
      ok(qimg(['convert', '-O', 'raw', `diff/${name}`, `diff/${name}.raw`], { cwd: d }));
      expect(readFileSync(P(`diff/${name}.raw`)).equals(expected()), name).toBe(true);
    }
    const info = JSON.parse(ok(qimg(['info', '--output=json', 'diff/child.vhd'], { cwd: d })).stdout);
    expect(info['backing-filename']).toBe('parent.vhd');
    expect(info['full-backing-filename']).toBe('diff/parent.vhd');
    expect(info['backing-filename-format']).toBe('vpc');
    const map = mapJson(ok(qimg(['map', '--output=json', 'diff/child.vhd'], { cwd: d })).stdout);
    expect(map.find((e) => e.start === 2 << 20)).toMatchObject({ length: 65536, depth: 0, data: true });
    expect(map.find((e) => e.start === (2 << 20) + 65536)).toMatchObject({ depth: 1, data: true });
    // qemu 7.2 reads the same file as a standalone dynamic disk (no backing file)
    expect(JSON.parse(ok(qemuImg(['info', '--output=json', 'diff/child.vhd'], d)).stdout)['backing-filename']).toBeUndefined();
  });

  it('refuses a parent whose unique id does not match', () => {
    const r = qimg(['convert', '-O', 'raw', 'diff/wrong.vhd', 'diff/wrong.raw'], { cwd: d });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^qimg: diff\/wrong\.vhd: parent disk 'parent\.vhd' has unique id [0-9a-f-]{36}, but this differencing disk was made from [0-9a-f-]{36}\n$/);
    expect(existsSync(P('diff/wrong.raw'))).toBe(false);
  });

  it('writes into a differencing disk leave the parent alone', () => {
    copyFileSync(P('diff/child.vhd'), P('diff/child-w.vhd'));
    const parentSha = sha256File(P('diff/parent.vhd'));
    ok(qimg(['convert', '-n', '-O', 'vpc', 'src-diff.raw', 'diff/child-w.vhd'], { cwd: d }));
    ok(qimg(['convert', '-O', 'raw', 'diff/child-w.vhd', 'diff/child-w.raw'], { cwd: d }));
    expect(sha256File(P('diff/child-w.raw'))).toBe(sha256File(P('src-diff.raw')));
    expect(sha256File(P('diff/parent.vhd'))).toBe(parentSha);
  });

  it('the Windows-made differencing disk: info names the parent, reads fail naming it', () => {
    const rw = join(d, 'rw');
    mkdirSync(rw);
    const xz = '/work/shared/realworld/fat-differential.vhd.xz';
    if (!existsSync(xz)) return;
    copyFileSync(xz, join(rw, 'fat.vhd.xz'));
    expect(spawnSync('xz', ['-dk', 'fat.vhd.xz'], { cwd: rw }).status).toBe(0);
    const info = ok(qimg(['info', 'fat.vhd'], { cwd: rw })).stdout;
    expect(info).toContain('virtual size: 4 MiB (4194304 bytes)');
    expect(info).toContain('backing file: fat-parent.vhd');
    const q = ok(qemuImg(['info', 'fat.vhd'], rw)).stdout;
    expect(info.split('\n').filter((l) => !l.startsWith('backing file')).join('\n')).toBe(q);
    const r = qimg(['convert', '-O', 'raw', 'fat.vhd', 'fat.raw'], { cwd: rw });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^qimg: fat\.vhd: .*'fat-parent\.vhd': No such file or directory.*C:\\Projects\\dfvfs\\test_data\\fat-parent\.vhd.*\n$/);
    expect(existsSync(join(rw, 'fat.raw'))).toBe(false);
  });
});

// source for the differencing write test (made at load time, as it needs no tool)
if (enabled) patternRaw('src-diff.raw', 8390656, [[0, 4096, 9], [(2 << 20) + 4096, 8192, 8], [6 << 20, 1 << 20, 7]]);
