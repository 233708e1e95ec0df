/**
 * The rest of qemu-img's option surface, against qemu-img as the oracle:
 * `convert --salvage` (read errors become zeros, one warning per 512-byte sector),
 * `-r RATE` on convert and commit (validated as qemu-img, and the copy really is
 * throttled: checked as a lower bound only), `convert -C` (copy offloading: refused
 * where qemu-img refuses it, output as qemu-img's), `-T`/`-t` cache names wherever
 * qemu-img 7.2 takes them, sizes of 2^53 and more (create, resize, measure, info),
 * "-1" read as an unknown option as getopt reads it, and control characters in file
 * names and image strings escaped in error lines.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { accessSync, constants, copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, retryingCalibrationSync, sha256File, tempDir, type RunResult } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-options-');
afterAll(() => tmp.cleanup());

let counter = 0;
function newDir(): string {
  const d = join(tmp.path, `d${counter++}`);
  mkdirSync(d);
  return d;
}

const q = (args: string[], cwd: string): RunResult => ok(qemuImg(args, cwd), `qemu-img ${args.join(' ')}`);
const asQimg = (s: string) => s.replace(/qemu-img/g, 'qimg');
/** qemu-img's message spread over "qemu-img: ..." lines, folded into qimg's one line. */
const folded = (s: string) => asQimg(s).replace(/\nqimg: (?!warning)/g, ' ').replace(/\n(?!$|qimg: |Try ')/g, ' ');

/** Runs the same arguments through qemu-img and qimg in `cwd`. */
function both(args: string[], cwd: string): { qr: RunResult; mr: RunResult } {
  // (qemu 7.2's LUKS PBKDF calibration fails now and then on a loaded machine)
  return { qr: retryingCalibrationSync(() => qemuImg(args, cwd)), mr: qimg(args, { cwd }) };
}

/** The same exit code and output, qemu-img's multi-line messages folded into one line. */
function expectSame(args: string[], cwd: string): RunResult {
  const { qr, mr } = both(args, cwd);
  const what = `${args.join(' ')}: qemu-img said ${qr.stderr}`;
  expect(mr.status, what).toBe(qr.status);
  expect(mr.stdout, what).toBe(asQimg(qr.stdout));
  expect(mr.stderr, what).toBe(folded(qr.stderr));
  return mr;
}

const BLOCK_STATUS_WARNING = /^qimg: warning: error while reading block status at offset (\d+): .+$/;
const READ_WARNING = /^qimg: warning: error while reading offset (\d+): .+$/;

/** qemu-img's and qimg's salvage warnings as ["bs"|"read", offset] pairs, in order. */
function warnings(stderr: string, who: 'qemu-img' | 'qimg'): Array<[string, number]> {
  const out: Array<[string, number]> = [];
  for (const line of stderr.split('\n')) {
    if (line === '' || line.startsWith('qcow2: Image is corrupt')) continue; // qemu's corruption event
    const l = who === 'qemu-img' ? asQimg(line) : line;
    let m = BLOCK_STATUS_WARNING.exec(l);
    if (m) {
      out.push(['bs', Number(m[1])]);
      continue;
    }
    m = READ_WARNING.exec(l);
    if (!m) throw new Error(`unexpected ${who} line: ${JSON.stringify(line)}`);
    out.push(['read', Number(m[1])]);
  }
  return out;
}

/** Compressible data: runs of one byte value. */
function patterned(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4096) b.fill((i / 4096) % 251, i, i + 4096);
  return b;
}

/** The big-endian u64 at `pos` of a file. */
function u64(file: string, pos: number): bigint {
  return readFileSync(file).readBigUInt64BE(pos);
}

/** Overwrites bytes of a file. */
function poke(file: string, pos: number, bytes: Buffer): void {
  const b = readFileSync(file);
  bytes.copy(b, pos);
  writeFileSync(file, b);
}

/** L1 entry 0 of a qcow2 image: where it is and the L2 table offset it holds. */
function firstL2(file: string): { l1: number; l2: number } {
  const l1 = Number(u64(file, 40));
  return { l1, l2: Number(u64(file, l1) & 0x00fffffffffffe00n) };
}

describe.skipIf(!enabled)('convert --salvage', () => {
  /** A 1 MiB qcow2 made by qemu-img convert -c whose second (compressed) cluster is garbage. */
  function damagedCompressed(dir: string): string {
    writeFileSync(join(dir, 'src.raw'), patterned(1 << 20));
    q(['convert', '-c', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'comp.qcow2'], dir);
    const file = join(dir, 'comp.qcow2');
    const { l2 } = firstL2(file);
    const entry = u64(file, l2 + 8);
    expect(entry >> 62n & 1n, 'cluster 1 is compressed').toBe(1n);
    const host = Number(entry & ((1n << 54n) - 1n)); // 64 KiB clusters: 54 offset bits
    poke(file, host, Buffer.alloc(100, 0xff));
    return 'comp.qcow2';
  }

  it('without --salvage the damaged image still fails, as in qemu-img, and leaves no output', () => {
    const dir = newDir();
    const img = damagedCompressed(dir);
    const qr = qemuImg(['convert', '-O', 'raw', img, 'q.raw'], dir);
    const mr = qimg(['convert', '-O', 'raw', img, 'm.raw'], { cwd: dir });
    expect(qr.status).toBe(1);
    expect(qr.stderr).toMatch(/error while reading at byte 65536/);
    expect(mr.status).toBe(1);
    expect(mr.stderr).toMatch(/^qimg: comp\.qcow2: error while reading at byte 65536: [^\n]+\n$/);
    expect(existsSync(join(dir, 'm.raw'))).toBe(false);
  });

  it('a garbage compressed cluster: zeros and one warning per sector, as qemu-img', () => {
    const dir = newDir();
    const img = damagedCompressed(dir);
    const qr = qemuImg(['convert', '--salvage', '-O', 'raw', img, 'q.raw'], dir);
    const mr = qimg(['convert', '--salvage', '-O', 'raw', img, 'm.raw'], { cwd: dir });
    expect(qr.status, qr.stderr).toBe(0);
    expect(mr.status, mr.stderr).toBe(0);
    expect(mr.stdout).toBe('');
    const expected = warnings(qr.stderr, 'qemu-img');
    expect(expected).toHaveLength(128); // 64 KiB = 128 sectors
    expect(warnings(mr.stderr, 'qimg')).toEqual(expected);
    expect(sha256File(join(dir, 'm.raw'))).toBe(sha256File(join(dir, 'q.raw')));
    // the damaged cluster reads as zeros, the rest as the source
    const out = readFileSync(join(dir, 'm.raw'));
    expect(out.subarray(65536, 131072).equals(Buffer.alloc(65536))).toBe(true);
    expect(out.subarray(131072).equals(patterned(1 << 20).subarray(131072))).toBe(true);
    // several sources: offsets are per source, as qemu-img's
    const q2 = qemuImg(['convert', '--salvage', '-O', 'raw', 'src.raw', img, 'q2.raw'], dir);
    const m2 = qimg(['convert', '--salvage', '-O', 'raw', 'src.raw', img, 'm2.raw'], { cwd: dir });
    expect(m2.status).toBe(0);
    expect(warnings(m2.stderr, 'qimg')).toEqual(warnings(q2.stderr, 'qemu-img'));
    expect(sha256File(join(dir, 'm2.raw'))).toBe(sha256File(join(dir, 'q2.raw')));
    // to qcow2 (and -W): the same guest data as qemu-img's salvaged image
    const q3 = qemuImg(['convert', '--salvage', '-O', 'qcow2', img, 'q3.qcow2'], dir);
    const m3 = qimg(['convert', '--salvage', '-W', '-O', 'qcow2', img, 'm3.qcow2'], { cwd: dir });
    expect(m3.status).toBe(0);
    expect(warnings(m3.stderr, 'qimg').map(([, o]) => o).sort((a, b) => a - b)).toEqual(warnings(q3.stderr, 'qemu-img').map(([, o]) => o));
    expect(q(['compare', 'q3.qcow2', 'm3.qcow2'], dir).stdout).toBe('Images are identical.\n');
    expect(qemuImg(['check', 'm3.qcow2'], dir).status).toBe(0);
  });

  it('an unaligned L2 table: block status and read warnings per sector, in qemu-img\'s order', () => {
    const dir = newDir();
    writeFileSync(join(dir, 'src.raw'), patterned(1 << 20));
    q(['convert', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'l2.qcow2'], dir);
    const file = join(dir, 'l2.qcow2');
    const { l1 } = firstL2(file);
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(u64(file, l1) + 0x200n);
    poke(file, l1, b);
    expect(qimg(['convert', '-O', 'raw', 'l2.qcow2', 'x.raw'], { cwd: dir }).status).toBe(1);
    const qr = qemuImg(['convert', '--salvage', '-O', 'raw', 'l2.qcow2', 'q.raw'], dir);
    const mr = qimg(['convert', '--salvage', '-O', 'raw', 'l2.qcow2', 'm.raw'], { cwd: dir });
    expect(qr.status).toBe(0);
    expect(mr.status, mr.stderr.slice(0, 500)).toBe(0);
    const expected = warnings(qr.stderr, 'qemu-img');
    // a first pass over the block status, then block status and read per sector
    expect(expected).toHaveLength(3 * 2048);
    expect(warnings(mr.stderr, 'qimg')).toEqual(expected);
    expect(sha256File(join(dir, 'm.raw'))).toBe(sha256File(join(dir, 'q.raw')));
  });

  it('an undamaged image converts as without --salvage, silently', () => {
    const dir = newDir();
    writeFileSync(join(dir, 'src.raw'), patterned(1 << 20));
    q(['convert', '-c', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'ok.qcow2'], dir);
    const mr = qimg(['convert', '--salvage', '-O', 'raw', 'ok.qcow2', 'm.raw'], { cwd: dir });
    expect(mr).toMatchObject({ status: 0, stdout: '', stderr: '' });
    expect(readFileSync(join(dir, 'm.raw')).equals(patterned(1 << 20))).toBe(true);
  });
});

describe.skipIf(!enabled)('-r RATE (convert, commit)', () => {
  it('rate limit values as qemu-img validates them', () => {
    const dir = newDir();
    q(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
    q(['create', '-q', '-f', 'qcow2', 'b.qcow2', '1M'], dir);
    q(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 'o.qcow2'], dir);
    for (const v of ['abc', '-1', '1e3', '1kb', '', '8E', '9223372036854775808', '16E']) expectSame(['convert', '-r', v, '-O', 'raw', 'r.raw', 'o.raw'], dir);
    for (const v of ['abc', '-1', '8E']) expectSame(['commit', '-r', v, 'o.qcow2'], dir);
    // accepted values (0 = no limit)
    for (const v of ['0', '1.5k', '9223372036854775807']) expectSame(['convert', '-r', v, '-O', 'raw', 'r.raw', 'o.raw'], dir);
    for (const v of ['0', '1M']) expectSame(['commit', '-r', v, 'o.qcow2'], dir);
    // -r is read with the options: before the cache mode, before -n checks
    expectSame(['commit', '-t', 'bogus', '-r', 'abc', 'o.qcow2'], dir);
    expectSame(['convert', '--target-is-zero', '-r', 'abc', 'r.raw', 'o.raw'], dir);
  });

  it('convert really is throttled (lower bound), and its output is unchanged', () => {
    const dir = newDir();
    const data = Buffer.alloc(4 << 20);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
    writeFileSync(join(dir, 'd.raw'), data);
    const t0 = performance.now();
    const mr = qimg(['convert', '-r', '2M', '-f', 'raw', '-O', 'qcow2', 'd.raw', 'm.qcow2'], { cwd: dir });
    const elapsed = performance.now() - t0;
    expect(mr).toMatchObject({ status: 0, stdout: '', stderr: '' });
    // 4 MiB at 2 MiB/s: the second half may not start before one second (qemu-img's
    // convert lets the first request through at once)
    expect(elapsed).toBeGreaterThanOrEqual(950);
    expect(q(['compare', '-f', 'raw', 'd.raw', 'm.qcow2'], dir).stdout).toBe('Images are identical.\n');
    // zeros cost nothing: a 1 GiB empty image at 1 byte per second
    q(['create', '-q', '-f', 'raw', 'empty.raw', '1G'], dir);
    const z = qimg(['convert', '-r', '1', '-f', 'raw', '-O', 'raw', 'empty.raw', 'z.raw'], { cwd: dir, timeout: 20_000 });
    expect(z.status, z.stderr).toBe(0);
  });

  it('commit really is throttled (lower bound), with the result of qemu-img commit', () => {
    const dirs = [newDir(), newDir()];
    for (const d of dirs) {
      q(['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'], d);
      q(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], d);
      ok(qemuIo(['-c', 'write -P 0x5c 0 1M', '-c', 'write -z 2M 1M', 'top.qcow2'], d));
    }
    const qr = qemuImg(['commit', '-r', '1M', 'top.qcow2'], dirs[0]);
    const t0 = performance.now();
    const mr = qimg(['commit', '-r', '1M', 'top.qcow2'], { cwd: dirs[1] });
    const elapsed = performance.now() - t0;
    expect(mr.status, mr.stderr).toBe(0);
    expect(mr.stdout).toBe(asQimg(qr.stdout));
    // 1 MiB of data at 1 MiB/s (the zeros are free): at least a second, as qemu's block job
    expect(elapsed).toBeGreaterThanOrEqual(950);
    expect(q(['compare', join(dirs[0], 'base.qcow2'), join(dirs[1], 'base.qcow2')], dirs[0]).stdout).toBe('Images are identical.\n');
    expect(qemuImg(['check', 'base.qcow2'], dirs[1]).status).toBe(0);
  });
});

describe.skipIf(!enabled)('convert -C (copy offloading)', () => {
  it('refused where qemu-img refuses it, with its messages and in its order', () => {
    const dir = newDir();
    q(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
    const cases = [
      ['-C', '-c', '-O', 'qcow2'],
      ['-c', '-C', '-O', 'qcow2'],
      ['-C', '-S', '0'],
      ['-C', '-S', '4k'],
      ['-S', '64k', '-C'],
      ['-C', '--salvage'],
      ['-C', '--salvage', '-c'],
      ['-C', '--salvage', '-S', '0'],
      ['-C', '-S', '1000'],
      ['-C', '--salvage', '--target-is-zero'],
      ['-C', '-c', '--target-image-opts'],
    ];
    for (const c of cases) expectSame(['convert', ...c, 'r.raw', 'out.img'], dir);
    expectSame(['convert', '-C', '-c', 'r.raw'], dir);
    expect(existsSync(join(dir, 'out.img'))).toBe(false);
  });

  it('raw to raw: the same bytes and the same allocation as qemu-img -C (no zero detection in data)', () => {
    const dir = newDir();
    const data = Buffer.alloc(8 << 20);
    data.fill(0x3c, 0, 1 << 20);
    data.fill(0x7e, 3 << 20, 4 << 20); // 2 MiB of written zeros between
    writeFileSync(join(dir, 'src.raw'), data.subarray(0, 4 << 20));
    truncateSync(join(dir, 'src.raw'), 8 << 20); // a hole after the data
    q(['convert', '-C', '-f', 'raw', '-O', 'raw', 'src.raw', 'q.raw'], dir);
    const mr = qimg(['convert', '-C', '-f', 'raw', '-O', 'raw', 'src.raw', 'm.raw'], { cwd: dir });
    expect(mr).toMatchObject({ status: 0, stdout: '', stderr: '' });
    expect(sha256File(join(dir, 'm.raw'))).toBe(sha256File(join(dir, 'src.raw')));
    const map = (f: string) => JSON.parse(q(['map', '--output=json', '-f', 'raw', f], dir).stdout);
    expect(map('m.raw')).toEqual(map('q.raw'));
    // several sources, -n into an existing target, -W, -m 1
    q(['create', '-q', '-f', 'raw', 'n.raw', '16M'], dir);
    const n = qimg(['convert', '-C', '-n', '-W', '-m', '1', '-f', 'raw', '-O', 'raw', 'src.raw', 'src.raw', 'n.raw'], { cwd: dir });
    expect(n).toMatchObject({ status: 0, stderr: '' });
    const twice = readFileSync(join(dir, 'n.raw'));
    expect(twice.subarray(0, 8 << 20).equals(readFileSync(join(dir, 'src.raw')))).toBe(true);
    expect(twice.subarray(8 << 20).equals(readFileSync(join(dir, 'src.raw')))).toBe(true);
  });

  it('other formats: read and write, the same result as qemu-img -C', () => {
    const dir = newDir();
    q(['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'], dir);
    ok(qemuIo(['-c', 'write -P 0x11 0 1M', '-c', 'write -z 1M 1M', 'base.qcow2'], dir));
    for (const [fmt, src, extra] of [
      ['raw', 'base.qcow2', []],
      ['qcow2', 'base.qcow2', []],
      ['qcow2', 'base.qcow2', ['-B', 'base.qcow2', '-F', 'qcow2']],
    ] as Array<[string, string, string[]]>) {
      const { qr, mr } = both(['convert', '-C', ...extra, '-O', fmt, src, `out-${counter++}.${fmt}`], dir);
      expect(qr.status, qr.stderr).toBe(0);
      expect(mr).toMatchObject({ status: 0, stdout: '', stderr: '' });
    }
    q(['convert', '-C', '-O', 'qcow2', 'base.qcow2', 'q.qcow2'], dir);
    expect(qimg(['convert', '-C', '-O', 'qcow2', 'base.qcow2', 'm.qcow2'], { cwd: dir }).status).toBe(0);
    expect(q(['compare', 'q.qcow2', 'm.qcow2'], dir).stdout).toBe('Images are identical.\n');
    expect(qemuImg(['check', 'm.qcow2'], dir).status).toBe(0);
    const map = (f: string) =>
      (JSON.parse(q(['map', '--output=json', f], dir).stdout) as Array<Record<string, unknown>>).map(({ offset: _o, ...rest }) => rest);
    expect(map('m.qcow2')).toEqual(map('q.qcow2'));
  });
});

describe.skipIf(!enabled)('cache modes: -T (source) and -t where qemu-img 7.2 takes them', () => {
  it('bad names refused with qemu-img\'s message and exit code, in its order', () => {
    const dir = newDir();
    q(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
    q(['create', '-q', '-f', 'qcow2', 'b.qcow2', '1M'], dir);
    q(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 'o.qcow2'], dir);
    const cases: string[][] = [
      ['convert', '-T', 'bogus', 'r.raw', 'out.raw'],
      ['convert', '-T', '', 'r.raw', 'out.raw'],
      ['convert', '-T', 'None', 'r.raw', 'out.raw'],
      ['convert', '-T', 'bogus', 'missing.raw', 'out.raw'],
      ['convert', '-T', 'bogus', '-t', 'bogus2', 'r.raw', 'out.raw'],
      ['convert', '-T', 'bogus', '-O', 'foo', 'r.raw', 'out.raw'],
      ['convert', '-T', 'bogus', '-O', 'qcow2', '-o', 'bogus=1', 'r.raw', 'out.raw'],
      ['convert', '-T', 'bogus', 'r.raw'],
      ['convert', '-T', 'bogus', '--target-is-zero', 'r.raw', 'out.raw'],
      ['convert', '-t', 'bogus', 'r.raw', 'out.raw'],
      ['convert', '-t', 'bogus', '-O', 'foo', 'r.raw', 'out.raw'],
      ['compare', '-T', 'bogus', 'r.raw', 'r.raw'],
      ['compare', '-T', 'bogus', 'missing', 'r.raw'],
      ['check', '-T', 'bogus', 'o.qcow2'],
      ['check', '-T', 'bogus', 'missing'],
      ['rebase', '-T', 'bogus', '-u', '-b', 'b.qcow2', '-F', 'qcow2', 'o.qcow2'],
      ['rebase', '-t', 'bogus', '-u', '-b', 'b.qcow2', '-F', 'qcow2', 'o.qcow2'],
      ['rebase', '-T', 'bogus', '-t', 'bogus2', '-u', '-b', 'b.qcow2', '-F', 'qcow2', 'missing'],
      ['commit', '-t', 'bogus', 'o.qcow2'],
      ['commit', '-t', 'bogus', 'missing'],
      ['amend', '-t', 'bogus', '-o', 'lazy_refcounts=on', 'o.qcow2'],
      ['amend', '-t', 'bogus', '-o', 'lazy_refcounts=on', 'missing'],
    ];
    const before = sha256File(join(dir, 'o.qcow2'));
    for (const c of cases) expectSame(c, dir);
    expect(sha256File(join(dir, 'o.qcow2'))).toBe(before);
    // (qemu-img creates the output before it reads -t; qimg refuses first)
    expect(qimg(['convert', '-t', 'bogus', 'r.raw', 'mine.raw'], { cwd: dir }).status).toBe(1);
    expect(existsSync(join(dir, 'mine.raw'))).toBe(false);
  });

  it('every qemu cache mode is accepted', () => {
    const dir = newDir();
    q(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
    q(['create', '-q', '-f', 'qcow2', 'b.qcow2', '1M'], dir);
    q(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 'o.qcow2'], dir);
    const modes = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'];
    for (const mode of modes) expectSame(['convert', '-T', mode, '-t', mode, '-O', 'raw', 'r.raw', `out-${mode}.raw`], dir);
    // each of the other commands with a different mode
    const pick = (i: number) => modes[i % modes.length];
    expectSame(['compare', '-T', pick(0), 'r.raw', 'out-none.raw'], dir);
    expectSame(['check', '-T', pick(1), 'o.qcow2'], dir);
    expectSame(['rebase', '-T', pick(2), '-t', pick(3), '-u', '-b', 'b.qcow2', '-F', 'qcow2', 'o.qcow2'], dir);
    expectSame(['commit', '-t', pick(4), 'o.qcow2'], dir);
    expectSame(['amend', '-t', pick(0), '-o', 'lazy_refcounts=off', 'o.qcow2'], dir);
  });
});

describe.skipIf(!enabled)('sizes of 2^53 and more', () => {
  /** create in `dir` with both tools; the same messages, and the same info when it worked. */
  function createBoth(dir: string, args: string[]): void {
    const qName = `q${counter}.img`;
    const mName = `m${counter++}.img`;
    const qr = retryingCalibrationSync(() => qemuImg(['create', ...args.map((a) => (a === 'FILE' ? qName : a))], dir));
    const mr = qimg(['create', ...args.map((a) => (a === 'FILE' ? mName : a))], { cwd: dir, timeout: 30_000 });
    const what = `create ${args.join(' ')}: qemu-img said ${qr.stderr}`;
    expect(mr.status, what).toBe(qr.status);
    expect(mr.stdout, what).toBe(asQimg(qr.stdout).replace(qName, mName));
    expect(mr.stderr, what).toBe(folded(qr.stderr).replace(qName, mName));
    if (qr.status === 0 && qemuImg(['info', qName], dir).status !== 0) {
      // made, but past what qemu opens again (2^63 - 512 on tmpfs): refused alike
      const qi = qemuImg(['info', qName], dir);
      expect(qemuImg(['info', mName], dir).stderr.replace(mName, qName), what).toBe(qi.stderr);
      expect(qimg(['info', mName], { cwd: dir }).stderr.replace(mName, qName), what).toBe(asQimg(qi.stderr));
    } else if (qr.status === 0) {
      const info = (f: string) => JSON.parse(q(['info', '--output=json', f], dir).stdout) as Record<string, unknown>;
      const qi = info(qName);
      const mi = info(mName);
      expect(mi['virtual-size'], what).toBe(qi['virtual-size']);
      expect(mi['cluster-size'], what).toBe(qi['cluster-size']);
      // qimg reads back what it wrote, digits exact (JSON and human)
      const mine = qimg(['info', '--output=json', mName], { cwd: dir });
      const rawQ = q(['info', '--output=json', qName], dir).stdout;
      const exact = /"virtual-size": (\d+)/.exec(rawQ)![1];
      expect(mine.stdout).toContain(`"virtual-size": ${exact},`);
      expect(qimg(['info', mName], { cwd: dir }).stdout).toContain(`(${exact} bytes)`);
      const chk = qemuImg(['check', mName], dir);
      if (!args.includes('raw')) expect(chk.status, chk.stdout + chk.stderr).toBe(0);
    } else {
      // nothing left behind by qimg (qemu-img may leave an empty file)
      expect(existsSync(join(dir, mName)), what).toBe(false);
    }
    rmSync(join(dir, qName), { force: true });
    rmSync(join(dir, mName), { force: true });
  }

  it('create -f qcow2: up to qcow2\'s limit, with qemu-img\'s messages past it', () => {
    const dir = newDir();
    for (const a of [
      ['2P'],
      ['2251799813685249'],
      ['8191P'],
      ['9223372036854775807'],
      ['-o', 'cluster_size=2M', '2E'],
      ['-o', 'cluster_size=2M', '2305843009213693953'],
      ['-o', 'cluster_size=2M', '9223372036854775296'],
      ['-o', 'cluster_size=2M', '9223372036854775807'],
      ['-o', 'cluster_size=1M', '9007199254740993'],
      ['-o', 'cluster_size=2M,extended_l2=on', '1E'],
    ]) {
      createBoth(dir, ['-f', 'qcow2', 'FILE', ...a]);
    }
  });

  it('create -f raw and the formats with their own limits', () => {
    const dir = newDir();
    for (const s of ['9007199254740993', '1E', '9223372036854775296', '9223372036854775807']) {
      createBoth(dir, ['-f', 'raw', 'FILE', s]);
    }
    // (2^63 - 512 is not a double: the exact value must still reach the messages)
    for (const f of ['vdi', 'vpc', 'vhdx', 'qed', 'parallels']) createBoth(dir, ['-f', f, 'FILE', '9223372036854775296']);
    createBoth(dir, ['-f', 'vdi', 'FILE', '9007199254740993']);
    createBoth(dir, ['-f', 'luks', '--object', 'secret,id=s0,data=x', '-o', 'key-secret=s0,iter-time=10', 'FILE', '9223372036854775807']);
    // an existing file stays as it was when the size is refused
    writeFileSync(join(dir, 'keep.img'), 'keep me\n');
    const r = qimg(['create', '-q', '-f', 'raw', 'keep.img', '9007199254740993'], { cwd: dir });
    if (r.status !== 0) expect(readFileSync(join(dir, 'keep.img'), 'utf8')).toBe('keep me\n');
  });

  // tmpfs takes files of up to 2^63 - 1 bytes: raw images past 2^53 are really made there
  const shm = (() => {
    try {
      accessSync('/dev/shm', constants.W_OK);
      return statSync('/dev/shm').isDirectory();
    } catch {
      return false;
    }
  })();
  it.runIf(shm)('create -f raw on tmpfs, past 2^53: the same images as qemu-img, read back exactly', () => {
    const dir = join('/dev/shm', `qimg-options-${process.pid}`);
    mkdirSync(dir, { recursive: true });
    try {
      for (const s of ['9007199254740993', '1E', '7E', '9223372035781033984', '9223372036854775296', '9223372036854775807']) {
        createBoth(dir, ['-f', 'raw', 'FILE', s]);
      }
      // a file past qemu's block layer limit is refused on open, as qemu-img does
      q(['create', '-q', '-f', 'raw', 'huge.raw', '9223372035781034496'], dir);
      expectSame(['info', 'huge.raw'], dir);
      // resize past 2^53
      q(['create', '-q', '-f', 'raw', 'r1.raw', '1M'], dir);
      q(['create', '-q', '-f', 'raw', 'r2.raw', '1M'], dir);
      q(['resize', '-f', 'raw', 'r1.raw', '1E'], dir);
      expect(qimg(['resize', '-f', 'raw', 'r2.raw', '1E'], { cwd: dir }).stdout).toBe('Image resized.\n');
      expect(statSync(join(dir, 'r2.raw')).size).toBe(statSync(join(dir, 'r1.raw')).size);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('resize: qemu-img\'s arithmetic and messages at the limits', () => {
    const dir = newDir();
    const cases: Array<[string, string]> = [
      ['65536', '8E'],
      ['65536', '16E'],
      ['65536', '9223372036854775807'],
      ['65536', '2P'],
      ['65536', '2251799813685249'],
      ['65536', '+2P'],
      ['65536', '+8E'],
      ['65536', '-8E'],
      ['65536', 'abc'],
      ['2097152', '2E'],
      ['2097152', '9007199254740993'],
      ['2097152', '9007199254741504'],
      ['2097152', '+1E'],
      ['1048576', '9223372035781034496'],
    ];
    for (const cs of ['65536', '1048576', '2097152']) q(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, `fresh-${cs}.qcow2`, '1M'], dir);
    for (const [cs, size] of cases) {
      copyFileSync(join(dir, `fresh-${cs}.qcow2`), join(dir, 'a.qcow2'));
      copyFileSync(join(dir, `fresh-${cs}.qcow2`), join(dir, 'b.qcow2'));
      const qr = qemuImg(['resize', '-f', 'qcow2', 'a.qcow2', '--', size], dir);
      const mr = qimg(['resize', '-f', 'qcow2', 'b.qcow2', '--', size], { cwd: dir });
      const what = `resize ${cs} ${size}: ${qr.stderr}`;
      expect(mr.status, what).toBe(qr.status);
      expect(mr.stdout, what).toBe(qr.stdout);
      // messages about the image name it (qimg's convention); the argument's do not
      expect(mr.stderr.replace('qimg: b.qcow2: ', 'qimg: '), what).toBe(folded(qr.stderr));
      if (qr.status !== 0) {
        expect(sha256File(join(dir, 'b.qcow2')), what).toBe(sha256File(join(dir, `fresh-${cs}.qcow2`)));
        continue;
      }
      const vs = (f: string) => /"virtual-size": (\d+)/.exec(q(['info', '--output=json', f], dir).stdout)![1];
      expect(vs('b.qcow2'), what).toBe(vs('a.qcow2'));
      expect(qemuImg(['check', 'b.qcow2'], dir).status, what).toBe(0);
    }
    for (const size of ['16T', '8P', '9007199254740993', '4E', '9223372036854775807']) {
      q(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
      const qr = qemuImg(['resize', '-f', 'raw', 'r.raw', size], dir);
      const mr = qimg(['resize', '-f', 'raw', 'r.raw', size], { cwd: dir });
      expect(mr.status, size).toBe(qr.status);
      expect(mr.stderr.replace('qimg: r.raw: ', 'qimg: '), size).toBe(folded(qr.stderr));
      rmSync(join(dir, 'r.raw'));
    }
  });

  it('measure: exact sizes, and qemu-img 7.2\'s signed JSON / unsigned text past 2^63', () => {
    const dir = newDir();
    const luks = ['-O', 'luks', '--object', 'secret,id=s0,data=x', '-o', 'key-secret=s0,iter-time=10'];
    for (const a of [
      ['-O', 'raw', '--size', '9007199254740993'],
      ['-O', 'raw', '--size', '9223372036854775296'],
      ['-O', 'raw', '--size', '9223372036854775807'],
      ['-O', 'raw', '--size', '8E'],
      ['-O', 'qcow2', '--size', '2P'],
      ['-O', 'qcow2', '--size', '2251799813685249'],
      ['-O', 'qcow2', '-o', 'cluster_size=2M', '--size', '2E'],
      ['-O', 'qcow2', '-o', 'cluster_size=2M', '--size', '2305843009213693953'],
      ['-O', 'qcow2', '-o', 'cluster_size=1M', '--size', '9007199254740993'],
      ['-O', 'qcow2', '-o', 'cluster_size=2M,preallocation=full', '--size', '1E'],
      ['-O', 'qcow2', '-o', 'cluster_size=2M,refcount_bits=1,extended_l2=on', '--size', '2E'],
      ['-O', 'qcow2', '-o', 'cluster_size=2M,extended_l2=on', '--size', '1E'],
    ]) {
      expectSame(['measure', ...a], dir);
    }
    for (const size of ['9007199254740993', '9223372036854775296', '9223372036854775807']) expectSame(['measure', '--output=json', '-O', 'raw', '--size', size], dir);
    expectSame(['measure', '--output=json', '-O', 'qcow2', '-o', 'cluster_size=2M,preallocation=full', '--size', '1E'], dir);
    // luks: the size as given plus the header, past 2^63 (qemu-img takes seconds here: one case)
    expectSame(['measure', '--output=json', ...luks, '--size', '9223372036854775807'], dir);
    // a source image past 2^53
    q(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', 'big.qcow2', '9007199254806528'], dir);
    ok(qemuIo(['-c', 'write -P 9 9007199250546688 2M', 'big.qcow2'], dir));
    expectSame(['measure', '--output=json', '-O', 'raw', 'big.qcow2'], dir);
    expectSame(['info', 'big.qcow2'], dir);
    // map's --start-offset and --max-length take such sizes too (odd ones included)
    for (const a of [['--start-offset', '9007199254740993'], ['--start-offset', '9007199250546689', '--max-length', '1000001'], ['--start-offset', '9223372036854775807']]) {
      for (const output of ['json', 'human']) {
        const qr = q(['map', `--output=${output}`, ...a, 'big.qcow2'], dir);
        const mr = qimg(['map', `--output=${output}`, ...a, 'big.qcow2'], { cwd: dir });
        // (qimg's JSON has the "compressed" member of qemu-img 8.2 and later)
        expect(mr.stdout.replace(/, "compressed": false/g, ''), a.join(' ')).toBe(qr.stdout);
      }
    }
  });
});

describe.skipIf(!enabled)('a negative number where an argument goes is an unknown option, as getopt reads it', () => {
  it('create, convert, info and resize as qemu-img', () => {
    const dir = newDir();
    q(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
    const cases: string[][] = [
      ['create', '-f', 'qcow2', 'x.qcow2', '-1'],
      ['create', 'x.raw', '-1'],
      ['create', 'x.raw', '-1k'],
      ['create', '-q', '-1k', 'x.raw'],
      ['create', 'x.raw', '-q', '-1k'],
      ['create', '-1k', 'x.raw'],
      ['create', '-f', 'raw', '-1.5', 'x.raw'],
      ['create', '-q1', 'x.raw'],
      ['create', 'x.raw', '1M', '-1'],
      ['create', '-f', '-1', 'x.raw'],
      ['info', '-1e3', 'r.raw'],
      ['convert', 'r.raw', '-1.5', 'out.raw'],
      ['convert', '-1', 'r.raw', 'out.raw'],
      ['resize'],
      ['resize', 'r.raw'],
      ['resize', '--shrink', 'r.raw'],
      ['resize', '-f', 'raw', 'r.raw', '--shrink'],
      ['resize', '-f', 'raw', 'r.raw', '-1', '-q'],
      ['resize', '-f', 'raw', 'r.raw', 'x', '-1'],
      ['resize', '-f', 'raw', 'r.raw', 'abc'],
      ['resize', '-f', 'raw', 'r.raw', '16E'],
    ];
    for (const c of cases) expectSame(c, dir);
    // a negative size of resize is a size, whatever it looks like
    for (const size of ['-1', '-1k', '-0x10k']) {
      const { qr, mr } = both(['resize', '-f', 'raw', 'r.raw', size], dir);
      expect(qr.status).toBe(1);
      expect(mr.status).toBe(1);
      expect(mr.stderr.replace('qimg: r.raw: ', 'qimg: ')).toBe(asQimg(qr.stderr));
    }
    expect(existsSync(join(dir, 'x.raw'))).toBe(false);
    expect(existsSync(join(dir, 'x.qcow2'))).toBe(false);
    expect(statSync(join(dir, 'r.raw')).size).toBe(1 << 20);
  });
});

describe.skipIf(!enabled)('control characters never reach the terminal raw in error lines', () => {
  const NAME = 'bad\r\x1b[31mname\x07';
  /** stderr: one line per message, no control character but the newlines */
  function expectEscaped(r: RunResult, lines = 1): void {
    expect(r.status).not.toBe(0);
    // eslint-disable-next-line no-control-regex
    expect(r.stderr).not.toMatch(/[\x00-\x09\x0b-\x1f\x7f]/);
    expect(r.stderr.split('\n')).toHaveLength(lines + 1);
  }

  it('a file name with \\r and an escape sequence', () => {
    const dir = newDir();
    const info = qimg(['info', NAME], { cwd: dir });
    expectEscaped(info);
    expect(info.stderr).toBe("qimg: Could not open 'bad\\r\\x1b[31mname\\x07': No such file or directory\n");
    const conv = qimg(['convert', '-O', 'raw', NAME, 'out.raw'], { cwd: dir });
    expectEscaped(conv);
    expect(conv.stderr).toContain('bad\\r\\x1b[31mname\\x07');
    // the output name in a message about it
    q(['create', '-q', '-f', 'raw', 'r.raw', '1M'], dir);
    const create = qimg(['create', '-f', 'qcow2', `${NAME}.qcow2`, '1kb'], { cwd: dir });
    expectEscaped(create);
    expect(create.stderr).toMatch(/^qimg: bad\\r\\x1b\[31mname\\x07\.qcow2: Invalid image size specified/);
    // unknown options and option values
    expectEscaped(qimg(['info', '--bo\x1b[2Jgus', 'r.raw'], { cwd: dir }), 2);
    expectEscaped(qimg(['convert', '-O', 'qcow2', '-o', 'bo\rgus=1', 'r.raw', 'o.qcow2'], { cwd: dir }));
    expectEscaped(qimg(['convert', '-T', 'no\x1bne', 'r.raw', 'o.raw'], { cwd: dir }));
    // warnings too
    const w = qimg(['info', '--image-opts', `driver=raw,file.filename=${NAME},x\x1b`], { cwd: dir });
    expectEscaped(w, 3);
    expect(w.stderr).toMatch(/^qimg: warning: short-form boolean option 'x\\x1b' deprecated\n/);
  });

  it('a backing file name with control characters, read from the image', () => {
    const dir = newDir();
    q(['create', '-q', '-f', 'qcow2', '-u', '-b', `${NAME}.qcow2`, '-F', 'qcow2', 'ov.qcow2', '1M'], dir);
    for (const args of [['info', '--backing-chain', 'ov.qcow2'], ['convert', '-O', 'raw', 'ov.qcow2', 'out.raw'], ['compare', 'ov.qcow2', 'ov.qcow2']]) {
      const r = qimg(args, { cwd: dir });
      expectEscaped(r);
      expect(r.stderr).toContain("'bad\\r\\x1b[31mname\\x07.qcow2'");
    }
    // stdout keeps qemu-img's bytes (machine output)
    const info = qimg(['info', '--output=json', 'ov.qcow2'], { cwd: dir });
    expect(info.status).toBe(0);
    expect(JSON.parse(info.stdout)['backing-filename']).toBe(`${NAME}.qcow2`);
  });
});
