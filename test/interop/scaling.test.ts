/**
 * Images at the edges of scale, against qemu-img 7.2: a 2^48-byte qcow2 whose L1 table
 * (4 MiB) qimg reads a page at a time, a chain as deep as qimg opens (256 layers), and
 * the chain-wide cache budget holding while every table of a chain is walked.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync, openSync, closeSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, tempDir } from '../helpers/qemu.js';
import { mapRanges } from '../hostile/mutate.js';
import { openImage } from '../../src/core/open.js';
import { CacheBudget } from '../../src/core/cache-budget.js';
import { extentAt } from '../../src/core/block-status.js';
import { registerFormats } from '../../src/formats/index.js';

registerFormats();

const enabled = qemuAvailable();
const tmp = tempDir('qimg-scale-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
const KiB = 1024;
const MiB = 1024 * KiB;
const TiB = 2 ** 40;
const both = (args: string[]) => ({ q: qemuImg(args, d), m: qimg(args, { cwd: d }) });

describe.runIf(enabled)('a 2^48-byte qcow2 (paged L1 table)', () => {
  const huge = 'huge.qcow2';
  // Writes in the first and last L1 pages (8192 entries, 4 TiB each), on both sides of
  // a page boundary and at the very end.
  const writes = [
    [0, 64 * KiB, 0x11],
    [4 * TiB - 64 * KiB, 128 * KiB, 0x22],
    [100 * TiB + 5 * MiB, 1 * MiB, 0x33],
    [2 ** 48 - 64 * KiB, 64 * KiB, 0x44],
  ] as const;

  it('map, info and convert as qemu-img', () => {
    ok(qemuImg(['create', '-q', '-f', 'qcow2', huge, String(2 ** 48)], d));
    ok(qemuIo(['-f', 'qcow2', huge, ...writes.flatMap(([o, l, p]) => ['-c', `write -P ${p} ${o} ${l}`])], d));
    for (const args of [['map', '--output=json', huge], ['map', huge], ['info', huge]]) {
      const { q, m } = both(args);
      if (args[1] === '--output=json') expect(mapRanges(m.stdout)).toEqual(mapRanges(q.stdout));
      else expect(m.stdout, args.join(' ')).toBe(q.stdout);
    }
    ok(qimg(['convert', '-O', 'qcow2', huge, 'huge-out.qcow2'], { cwd: d }));
    ok(qemuImg(['check', 'huge-out.qcow2'], d));
    ok(qemuImg(['compare', huge, 'huge-out.qcow2'], d));
    for (const [o, l, p] of writes) ok(qemuIo(['-f', 'qcow2', '-c', `read -P ${p} ${o} ${l}`, 'huge-out.qcow2'], d));
    ok(qimg(['compare', huge, 'huge-out.qcow2'], { cwd: d }));
  });

  it('a damaged entry in a later L1 page fails with the same message as qemu-img', () => {
    copyFileSync(join(d, huge), join(d, 'bad.qcow2'));
    const info = JSON.parse(ok(qemuImg(['info', '--output=json', 'bad.qcow2'], d)).stdout);
    expect(info['virtual-size']).toBe(2 ** 48);
    // L1 at the offset the header names; entry 8192 * 25 (100 TiB) made unaligned.
    const h = Buffer.alloc(48);
    const fd = openSync(join(d, 'bad.qcow2'), 'r+');
    try {
      readFully(fd, h, 0);
      const l1Offset = Number(h.readBigUInt64BE(40));
      const entry = Buffer.alloc(8);
      const index = (100 * TiB) / (512 * MiB);
      readFully(fd, entry, l1Offset + index * 8);
      entry.writeUInt32BE(entry.readUInt32BE(4) + 512, 4);
      writeSync(fd, entry, 0, 8, l1Offset + index * 8);
    } finally {
      closeSync(fd);
    }
    const { q, m } = both(['map', '--output=json', 'bad.qcow2']);
    expect(q.status).not.toBe(0);
    expect(m.status).toBe(1);
    // qemu-img prints the corruption event (then a generic I/O error); qimg its reason.
    expect(m.stderr).toBe('qimg: bad.qcow2: Image is corrupt: L2 table offset 0x490200 unaligned (L1 index: 0x32000)\n');
    expect(q.stderr).toContain('qcow2: Image is corrupt: L2 table offset 0x490200 unaligned (L1 index: 0x32000)');
  });
});

function readFully(fd: number, buf: Buffer, pos: number): void {
  expect(readSync(fd, buf, 0, buf.length, pos)).toBe(buf.length);
}

describe.runIf(enabled)('a 256-layer chain of 1 TiB images', () => {
  const DEPTH = 256;
  const layer = (i: number) => `deep-${i}.qcow2`;
  // Every 32nd layer holds data; the rest are empty overlays.
  const writesOf = (i: number) => (i % 32 === 1 ? [[(i * 3 + 1) * 16 * MiB, 256 * KiB, (i % 250) + 1]] : []);

  it('builds, maps and converts as qemu-img', () => {
    for (let i = 1; i <= DEPTH; i++) {
      const args = ['create', '-q', '-f', 'qcow2', layer(i), String(TiB)];
      if (i > 1) args.push('-u', '-b', layer(i - 1), '-F', 'qcow2'); // -u: not O(depth²) opens
      ok(qemuImg(args, d));
      const w = writesOf(i);
      if (w.length) ok(qemuIo(['-f', 'qcow2', layer(i), ...w.flatMap(([o, l, p]) => ['-c', `write -P ${p} ${o} ${l}`])], d));
    }
    const top = layer(DEPTH);
    const { q, m } = both(['map', '--output=json', top]);
    expect(mapRanges(m.stdout)).toEqual(mapRanges(q.stdout));
    ok(qimg(['convert', '-O', 'qcow2', top, 'deep-flat.qcow2'], { cwd: d }));
    ok(qemuImg(['compare', top, 'deep-flat.qcow2'], d));
    // One deeper is refused, with the image named.
    ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', top, '-F', 'qcow2', 'deep-257.qcow2', String(TiB)], d));
    const r = qimg(['convert', '-O', 'raw', 'deep-257.qcow2', 'never.raw'], { cwd: d });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/deeper than 256/);
  }, 120_000);

  it('walking the whole chain stays within a small cache budget and reads the same data', async () => {
    const budget = new CacheBudget(256 * KiB); // four 64 KiB tables for all 256 layers
    const img = await openImage(join(d, layer(DEPTH)), { cacheBudget: budget });
    try {
      let peak = 0;
      const found: number[] = [];
      for (let pos = 0; pos < img.virtualSize; ) {
        const e = await extentAt(img, pos, img.virtualSize - pos);
        if (e.kind === 'data') {
          const buf = Buffer.alloc(Math.min(e.length, MiB));
          await img.read(e.offset, buf);
          found.push(e.offset, e.length, buf[0]);
        }
        peak = Math.max(peak, budget.usedBytes);
        pos = e.offset + e.length;
      }
      const want = Array.from({ length: DEPTH }, (_, i) => writesOf(DEPTH - i))
        .flat()
        .sort((a, b) => a[0] - b[0])
        .flatMap(([o, l, p]) => [o, l, p]);
      expect(found).toEqual(want);
      expect(peak).toBeLessThanOrEqual(budget.limit);
    } finally {
      await img.close();
    }
  });
});
