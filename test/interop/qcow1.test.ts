/**
 * qcow (v1) against qemu-img 7.2: qemu's images (plain, over a backing file,
 * compressed) read byte-identically with the same info and map; qimg's images
 * (plain, convert -c) compare identical in qemu-img; writes both ways; create
 * options and refusals (encryption) as qemu-img; commit empties as qemu's.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, tempDir, ROOT } from '../helpers/qemu.js';
import { mapRanges } from '../hostile/mutate.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-qcow1-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
for (const f of ['plain.qcow', 'overlay.qcow', 'compressed.qcow', 'base.raw']) copyFileSync(join(ROOT, 'fixtures/foreign/qcow1', f), join(d, f));
const msg = (s: string) => s.replace(/^qemu-img: /gm, '').replace(/^qimg: /gm, '');

describe.runIf(enabled)('qcow: qemu-made images', () => {
  for (const f of ['plain.qcow', 'overlay.qcow', 'compressed.qcow']) {
    it(`${f}: convert, info, map as qemu-img`, () => {
      ok(qemuImg(['convert', '-O', 'raw', f, `${f}.q.raw`], d));
      ok(qimg(['convert', '-O', 'raw', f, `${f}.m.raw`], { cwd: d }));
      expect(readFileSync(join(d, `${f}.m.raw`)).equals(readFileSync(join(d, `${f}.q.raw`)))).toBe(true);
      for (const args of [['info', f], ['info', '--backing-chain', f], ['map', f]]) {
        expect(qimg(args, { cwd: d }).stdout, args.join(' ')).toBe(qemuImg(args, d).stdout);
      }
      const q = JSON.parse(ok(qemuImg(['info', '--output=json', f], d)).stdout);
      const m = JSON.parse(ok(qimg(['info', '--output=json', f], { cwd: d })).stdout);
      delete q['actual-size'];
      delete m['actual-size'];
      expect(m).toEqual(q);
      const qm = qemuImg(['map', '--output=json', f], d);
      const mm = qimg(['map', '--output=json', f], { cwd: d });
      expect(mm.status).toBe(qm.status);
      if (qm.status === 0) expect(mapRanges(mm.stdout)).toEqual(mapRanges(qm.stdout));
      const c = qimg(['check', f], { cwd: d });
      expect(c.status).toBe(63);
    });
  }
});

describe.runIf(enabled)('qcow: create', () => {
  const cases: string[][] = [
    [],
    ['-o', 'encryption=off'],
    ['-o', 'encryption=on'],
    ['-o', 'encrypt.format=aes'],
    ['-o', 'encrypt.format=luks'],
    ['-o', 'encrypt.format=foo'],
    ['-o', 'encrypt.format=aes,encrypt.key-secret=s0'],
    ['-o', 'encryption=on,encrypt.format=luks'],
    ['-o', 'encryption=bla'],
    ['-o', 'backing_fmt=foo'],
    ['-o', 'backing_fmt=raw'],
    ['-b', 'base.raw', '-F', 'raw'],
  ];
  for (const [i, c] of cases.entries()) {
    it(`create ${c.join(' ') || '(defaults)'}`, () => {
      const q = qemuImg(['create', '-f', 'qcow', ...c, `cq${i}.qcow`, '10M'], d);
      const m = qimg(['create', '-f', 'qcow', ...c, `cm${i}.qcow`, '10M'], { cwd: d });
      expect(m.status).toBe(q.status);
      expect(m.stdout.replace(`cm${i}`, `cq${i}`)).toBe(q.stdout);
      expect(msg(m.stderr).replace(`cm${i}`, `cq${i}`)).toBe(msg(q.stderr));
      if (q.status === 0) expect(readFileSync(join(d, `cm${i}.qcow`)).equals(readFileSync(join(d, `cq${i}.qcow`)))).toBe(true);
    });
  }
  it('size 0 is refused as qemu-img refuses it; -o help as qemu-img', () => {
    const q = qemuImg(['create', '-f', 'qcow', 'z.qcow', '0'], d);
    const m = qimg(['create', '-f', 'qcow', 'z2.qcow', '0'], { cwd: d });
    expect(m.status).toBe(q.status);
    expect(msg(m.stderr).replace('z2', 'z')).toBe(msg(q.stderr));
    expect(qimg(['create', '-f', 'qcow', '-o', 'help']).stdout).toBe(qemuImg(['create', '-f', 'qcow', '-o', 'help']).stdout);
  });
});

describe.runIf(enabled)('qcow: writes', () => {
  it('convert and convert -c to qcow: identical in qemu-img; map as qemu-img convert', () => {
    ok(qimg(['convert', '-O', 'qcow', 'plain.qcow', 'p-m.qcow'], { cwd: d }));
    ok(qemuImg(['convert', '-O', 'qcow', 'plain.qcow', 'p-q.qcow'], d));
    ok(qemuImg(['compare', 'plain.qcow', 'p-m.qcow'], d));
    expect(qimg(['map', 'p-m.qcow'], { cwd: d }).stdout).toBe(qemuImg(['map', 'p-q.qcow'], d).stdout.replace(/p-q/g, 'p-m'));
    ok(qimg(['convert', '-c', '-O', 'qcow', 'plain.qcow', 'c-m.qcow'], { cwd: d }));
    ok(qemuImg(['compare', 'plain.qcow', 'c-m.qcow'], d));
    expect(qemuImg(['map', 'c-m.qcow'], d).stderr).toContain('compressed clusters');
  });
  it('qemu-io writes into a qimg image (over compressed clusters too); qimg reads them', () => {
    ok(qimg(['convert', '-c', '-O', 'qcow', 'compressed.qcow', 'w.qcow'], { cwd: d }));
    ok(qemuIo(['-c', 'write -P 0x5a 1000 5000', '-c', 'write -P 0x5b 600k 8k', 'w.qcow'], d));
    ok(qemuImg(['convert', '-O', 'raw', 'w.qcow', 'w.q.raw'], d));
    ok(qimg(['convert', '-O', 'raw', 'w.qcow', 'w.m.raw'], { cwd: d }));
    expect(readFileSync(join(d, 'w.m.raw')).equals(readFileSync(join(d, 'w.q.raw')))).toBe(true);
  });
  it('qimg writes into qemu images (convert -n over a compressed image and an overlay)', () => {
    ok(qemuImg(['create', '-f', 'raw', 'src.raw', '1M'], d));
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 0x61 5000 70000', '-c', 'write -P 0x62 600k 1000', 'src.raw'], d));
    copyFileSync(join(d, 'compressed.qcow'), join(d, 'n.qcow'));
    ok(qimg(['convert', '-n', '-f', 'raw', '-O', 'qcow', 'src.raw', 'n.qcow'], { cwd: d }));
    ok(qemuImg(['compare', '-f', 'raw', '-F', 'qcow', 'src.raw', 'n.qcow'], d));
    ok(qemuImg(['create', '-f', 'qcow', '-b', 'base.raw', '-F', 'raw', 'o.qcow', '1M'], d));
    ok(qimg(['convert', '-n', '-f', 'raw', '-O', 'qcow', 'src.raw', 'o.qcow'], { cwd: d }));
    ok(qemuImg(['compare', '-f', 'raw', '-F', 'qcow', 'src.raw', 'o.qcow'], d));
  });
  it('commit empties the image as qemu-img; rebase fails as qemu-img', () => {
    for (const who of ['q', 'm']) {
      ok(qemuImg(['create', '-f', 'qcow', `b${who}.qcow`, '1M'], d));
      ok(qemuIo(['-c', 'write -P 0x21 0 512k', `b${who}.qcow`], d));
      ok(qemuImg(['create', '-f', 'qcow', '-b', `b${who}.qcow`, '-F', 'qcow', `t${who}.qcow`], d));
      ok(qemuIo(['-c', 'write -P 0x22 64k 100k', `t${who}.qcow`], d));
    }
    expect(qimg(['commit', 'tm.qcow'], { cwd: d }).stdout).toBe(qemuImg(['commit', 'tq.qcow'], d).stdout);
    ok(qemuImg(['compare', 'bq.qcow', 'bm.qcow'], d));
    expect(statSync(join(d, 'tm.qcow')).size).toBe(statSync(join(d, 'tq.qcow')).size);
    ok(qemuImg(['compare', 'tq.qcow', 'tm.qcow'], d));
    const q = qemuImg(['rebase', '-u', '-b', 'base.raw', '-F', 'raw', 'tq.qcow'], d);
    const m = qimg(['rebase', '-u', '-b', 'base.raw', '-F', 'raw', 'tm.qcow'], { cwd: d });
    expect(m.status).toBe(q.status);
    expect(msg(m.stderr).replace('tm.qcow: ', '')).toBe(msg(q.stderr));
  });
});
