/**
 * `qimg compare` against `qemu-img compare` as the oracle: for every case both run on
 * the same pair of images and stdout and the exit code must be the same (stderr too,
 * where qimg words the error like qemu-img). Images are made here with qemu-img and
 * qemu-io, plus a few fixtures.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyFileSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { IMAGES_DIR, fixturePath, loadManifest } from '../helpers/fixtures.js';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-compare-');
afterAll(() => tmp.cleanup());
const dir = tmp.path;
const fixtures = loadManifest();
const fx = (name: string) => join(IMAGES_DIR, fixturePath(fixtures.find((f) => f.name === name)!));

const q = (args: string[]) => ok(qemuImg(args, dir), `qemu-img ${args.join(' ')}`);
const io = (file: string, ...cmds: string[]) => ok(qemuIo(['-f', file.endsWith('.raw') ? 'raw' : 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file], dir));

/** A qcow2 whose L2 entry for 512k has an unaligned host offset: block status fails there. */
function corrupt(file: string): void {
  q(['create', '-q', '-f', 'qcow2', file, '1M']);
  io(file, 'write -P 1 0 64k', 'write -P 2 512k 64k');
  const buf = readFileSync(join(dir, file));
  const l2 = Number(buf.readBigUInt64BE(Number(buf.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
  buf.writeBigUInt64BE(buf.readBigUInt64BE(l2 + 64) + 512n, l2 + 64);
  writeFileSync(join(dir, file), buf);
}

/** A compressed qcow2 whose compressed data is garbage: reads fail, block status works. */
function badCompressed(file: string): void {
  writeFileSync(join(dir, 'text.raw'), Buffer.from('hello world '.repeat(6000)));
  q(['convert', '-c', '-O', 'qcow2', 'text.raw', file]);
  const buf = readFileSync(join(dir, file));
  const l2 = Number(buf.readBigUInt64BE(Number(buf.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
  const host = Number(buf.readBigUInt64BE(l2) & ((1n << 54n) - 1n));
  buf.fill(0xff, host, host + 64);
  writeFileSync(join(dir, file), buf);
}

beforeAll(() => {
  if (!enabled) return;
  // a: 1 MiB, data at 64k..128k; a.raw its raw twin
  q(['create', '-q', '-f', 'qcow2', 'a.qcow2', '1M']);
  io('a.qcow2', 'write -P 1 64k 64k');
  q(['convert', '-O', 'raw', 'a.qcow2', 'a.raw']);
  q(['convert', '-O', 'qcow2', 'a.qcow2', 'a-copy.qcow2']);
  q(['convert', '-O', 'qcow2', '-o', 'cluster_size=512', 'a.qcow2', 'a512.qcow2']);
  // one byte different inside the data (offset reported at 512-byte granularity)
  copyFileSync(join(dir, 'a.qcow2'), join(dir, 'b.qcow2'));
  io('b.qcow2', 'write -P 2 100000 10');
  // data where a is unallocated, and in the very last byte
  copyFileSync(join(dir, 'a.qcow2'), join(dir, 'd.qcow2'));
  io('d.qcow2', 'write -P 3 700001 5000');
  copyFileSync(join(dir, 'a.qcow2'), join(dir, 'last.qcow2'));
  io('last.qcow2', 'write -P 4 1048575 1');
  // zero cluster (-z) at 0 and written zeros at 512k: equal to a unless strict
  q(['create', '-q', '-f', 'qcow2', 'z.qcow2', '1M']);
  io('z.qcow2', 'write -P 1 64k 64k', 'write -z 0 64k', 'write -P 0 512k 64k');
  // larger images: a zero tail, a data tail
  q(['create', '-q', '-f', 'qcow2', 'big.qcow2', '2M']);
  io('big.qcow2', 'write -P 1 64k 64k', 'write -z 1M 64k', 'write -P 0 1536k 4k');
  copyFileSync(join(dir, 'big.qcow2'), join(dir, 'bigdata.qcow2'));
  io('bigdata.qcow2', 'write -P 9 1500000 1');
  copyFileSync(join(dir, 'a.raw'), join(dir, 'a2.raw'));
  truncateSync(join(dir, 'a2.raw'), 2 * 1048576);
  copyFileSync(join(dir, 'a2.raw'), join(dir, 'a3.raw'));
  io('a3.raw', 'write -P 120 1500000 1');
  // a smaller image whose content is a's prefix
  q(['create', '-q', '-f', 'qcow2', 'small.qcow2', '512k']);
  io('small.qcow2', 'write -P 1 64k 64k');
  // empty images with different cluster sizes (qemu's qcow2 block status stops at each L2 table)
  q(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', 'e512.qcow2', '1M']);
  q(['create', '-q', '-f', 'qcow2', 'e64k.qcow2', '1M']);
  corrupt('bad.qcow2');
  badCompressed('badc.qcow2');
  q(['convert', '-c', '-O', 'qcow2', 'a.qcow2', 'ac.qcow2']);
});

interface Case {
  name: string;
  args: string[];
  /**
   * qimg's stderr equals qemu-img's ('exact') or its last line ('last'; qemu's driver
   * adds a corruption event line first), or each matches its own pattern where qimg
   * words the reason differently
   */
  stderr?: 'exact' | 'last' | { mine: RegExp; twin: RegExp };
  code: number;
}

const CASES: Case[] = [
  // identical
  { name: 'identical: the same image', args: ['a.qcow2', 'a.qcow2'], code: 0 },
  { name: 'identical: qcow2 vs its raw conversion', args: ['a.qcow2', 'a.raw'], code: 0 },
  { name: 'identical: raw vs qcow2', args: ['a.raw', 'a.qcow2'], code: 0 },
  { name: 'identical: compressed vs plain', args: ['ac.qcow2', 'a.qcow2'], code: 0 },
  { name: 'identical -s: a qcow2 copy', args: ['-s', 'a.qcow2', 'a-copy.qcow2'], code: 0 },
  // content mismatch at 512-byte granularity
  { name: 'mismatch inside data (100000 -> 99840)', args: ['a.qcow2', 'b.qcow2'], code: 1 },
  { name: 'mismatch: data where the other is unallocated', args: ['a.qcow2', 'd.qcow2'], code: 1 },
  { name: 'mismatch: reversed', args: ['d.qcow2', 'a.qcow2'], code: 1 },
  { name: 'mismatch: the last byte', args: ['a.raw', 'last.qcow2'], code: 1 },
  { name: 'mismatch: different v2/v3 fixtures', args: [fx('compat-v2'), fx('compat-v3')], code: 1 },
  // unallocated vs zero
  { name: 'unallocated vs zero clusters and written zeros: equal', args: ['a.qcow2', 'z.qcow2'], code: 0 },
  { name: '-s unallocated vs zero: block status mismatch', args: ['-s', 'a.qcow2', 'z.qcow2'], code: 1 },
  { name: '-s zero vs unallocated', args: ['-s', 'z.qcow2', 'a.qcow2'], code: 1 },
  { name: '-s qcow2 vs raw', args: ['-s', 'a.qcow2', 'a.raw'], code: 1 },
  // -s compares qemu's raw status flags, BDRV_BLOCK_EOF included
  { name: 'empty images, different cluster sizes: equal', args: ['e512.qcow2', 'e64k.qcow2'], code: 0 },
  { name: '-s empty images, different cluster sizes: EOF flag differs at 0', args: ['-s', 'e512.qcow2', 'e64k.qcow2'], code: 1 },
  { name: '-s a qcow2 vs a 512 B cluster conversion', args: ['-s', 'a.qcow2', 'a512.qcow2'], code: 1 },
  // size mismatch
  { name: 'size mismatch, zero tail (qcow2)', args: ['a.qcow2', 'big.qcow2'], code: 0 },
  { name: 'size mismatch, zero tail (raw, reversed)', args: ['a2.raw', 'a.qcow2'], code: 0 },
  { name: 'size mismatch, data tail', args: ['a.qcow2', 'bigdata.qcow2'], code: 1 },
  { name: 'size mismatch, data tail (raw)', args: ['a3.raw', 'a.qcow2'], code: 1 },
  { name: 'size mismatch, smaller first', args: ['small.qcow2', 'a.qcow2'], code: 0 },
  { name: '-s size mismatch', args: ['-s', 'a.qcow2', 'big.qcow2'], code: 1 },
  { name: '-s size mismatch (raw)', args: ['-s', 'a2.raw', 'a.raw'], code: 1 },
  // formats
  { name: '-f qcow2 -F raw', args: ['-f', 'qcow2', '-F', 'raw', 'a.qcow2', 'a.raw'], code: 0 },
  { name: '-f raw on a qcow2: different content', args: ['-f', 'raw', 'a.qcow2', 'a.raw'], code: 1 },
  { name: '-f raw -F raw on two raw files', args: ['-f', 'raw', '-F', 'raw', 'a2.raw', 'a3.raw'], code: 1 },
  // fixtures against their own raw conversion are made in a test below
  // errors
  {
    name: 'open error: -F qcow2 on a raw file',
    args: ['-F', 'qcow2', 'a.qcow2', 'a.raw'],
    code: 2,
    stderr: { mine: /^qimg: a\.raw: Image is not in qcow2 format\n$/, twin: /^qemu-img: Could not open 'a\.raw': Image is not in qcow2 format\n$/ },
  },
  { name: 'open error: missing second image', args: ['a.qcow2', 'nope.qcow2'], code: 2, stderr: 'exact' },
  { name: 'open error: missing first image', args: ['nope.qcow2', 'a.qcow2'], code: 2, stderr: 'exact' },
  {
    name: 'open error: missing backing file',
    args: [fx('missing-backing'), 'a.qcow2'],
    code: 2,
    stderr: { mine: /^qimg: \S+: Could not open backing file: Could not open '\S+nonexistent\.qcow2': No such file or directory\n$/, twin: /Could not open backing file: Could not open '\S+nonexistent\.qcow2': No such file or directory\n$/ },
  },
  { name: 'block status error -> 3', args: ['bad.qcow2', 'bad.qcow2'], code: 3, stderr: 'last' },
  {
    name: 'read error -> 4',
    args: ['badc.qcow2', 'badc.qcow2'],
    code: 4,
    stderr: { mine: /^qimg: Error while reading offset 0 of badc\.qcow2: [^\n]+\n$/, twin: /^qemu-img: Error while reading offset 0 of badc\.qcow2: Input\/output error\n$/ },
  },
  {
    name: 'read error -> 4 (second image)',
    args: ['text.raw', 'badc.qcow2'],
    code: 4,
    stderr: { mine: /^qimg: Error while reading offset 0 of badc\.qcow2: [^\n]+\n$/, twin: /^qemu-img: Error while reading offset 0 of badc\.qcow2: Input\/output error\n$/ },
  },
  // -q
  { name: '-q identical', args: ['-q', 'a.qcow2', 'a.raw'], code: 0 },
  { name: '-q mismatch', args: ['-q', 'a.qcow2', 'b.qcow2'], code: 1 },
  { name: '-q size mismatch', args: ['-q', 'a.qcow2', 'big.qcow2'], code: 0 },
  { name: '-q -s', args: ['-q', '-s', 'a.qcow2', 'z.qcow2'], code: 1 },
  { name: '-q open error', args: ['-q', 'a.qcow2', 'nope.qcow2'], code: 2, stderr: 'exact' },
  // -p (qemu-img's exact bytes where its updates fall on the same offsets)
  { name: '-p identical', args: ['-p', 'a.qcow2', 'a.raw'], code: 0 },
  { name: '-p mismatch', args: ['-p', 'a.qcow2', 'b.qcow2'], code: 1 },
  { name: '-p -s size mismatch', args: ['-p', '-s', 'a.qcow2', 'big.qcow2'], code: 1 },
  { name: '-p -q', args: ['-p', '-q', 'a.qcow2', 'b.qcow2'], code: 1 },
];

/** qemu-img doubles "Could not open 'X': " for a missing file; qimg prints it once. */
const normErr = (s: string) => s.replace(/^qemu-img: /gm, 'qimg: ').replace(/(Could not open '[^']*': )\1/g, '$1');

describe.skipIf(!enabled)('compare vs qemu-img compare', () => {
  for (const c of CASES) {
    it(c.name, () => {
      const t = qemuImg(['compare', ...c.args], dir);
      const m = qimg(['compare', ...c.args], { cwd: dir });
      expect(t.status, `qemu-img: ${t.stdout}${t.stderr}`).toBe(c.code);
      expect(m.stdout).toBe(t.stdout);
      expect(m.status, m.stderr).toBe(c.code);
      const want = normErr(t.stderr);
      if (!c.stderr) expect(m.stderr).toBe('');
      else if (c.stderr === 'exact') expect(m.stderr).toBe(want);
      else if (c.stderr === 'last') expect(m.stderr).toBe(want.trimEnd().split('\n').pop() + '\n');
      else {
        expect(m.stderr).toMatch(c.stderr.mine);
        expect(t.stderr).toMatch(c.stderr.twin);
      }
    });
  }

  it('the reported offsets are 512-byte aligned', () => {
    for (const [x, y, off] of [
      ['a.qcow2', 'b.qcow2', 99840],
      ['a.qcow2', 'd.qcow2', 699904],
      ['a.raw', 'last.qcow2', 1048064],
      ['a.qcow2', 'bigdata.qcow2', 1499648],
    ] as const) {
      const m = qimg(['compare', x, y], { cwd: dir });
      expect(m.stdout).toContain(`Content mismatch at offset ${off}!\n`);
    }
  });

  it('fixtures against their raw conversion (and -s against a qcow2 conversion made by qemu-img)', () => {
    for (const name of ['chain-top', 'compressed-zstd', 'extl2-64k', 'snapshots', 'odd-size', 'raw-odd-size', 'cluster-512']) {
      const f = fixturePath(fixtures.find((x) => x.name === name)!);
      const raw = join(dir, `${name}.raw`);
      ok(qemuImg(['convert', '-O', 'raw', f, raw], IMAGES_DIR));
      for (const args of [
        [f, raw],
        ['-s', f, raw],
      ]) {
        const t = qemuImg(['compare', ...args], IMAGES_DIR);
        const m = qimg(['compare', ...args], { cwd: IMAGES_DIR });
        expect(m.stdout, `${name} ${args.join(' ')}`).toBe(t.stdout);
        expect(m.status).toBe(t.status);
      }
    }
  });

  it('-p on larger images: qemu-img\'s progress format, then the result, then a newline', () => {
    for (const args of [
      [fx('chain-top'), fx('chain-top')],
      [fx('cluster-2m'), fx('cluster-2m')],
      [fx('compat-v2'), fx('compat-v3')],
      [fx('empty'), fx('empty')],
    ]) {
      const t = qemuImg(['compare', '-p', ...args], IMAGES_DIR);
      const m = qimg(['compare', '-p', ...args], { cwd: IMAGES_DIR });
      expect(m.status).toBe(t.status);
      const shape = (s: string) => {
        const lines = s.split('\r');
        const last = lines.pop()!;
        for (const l of lines) expect(l).toMatch(/^ {4}\(\d{1,3}\.\d\d\/100%\)$/);
        return { first: lines[0], last };
      };
      // the first update, and the text after the last one (result + final newline), are the same
      expect(shape(m.stdout)).toEqual(shape(t.stdout));
    }
  });
});
