/**
 * qed against qemu-img 7.2: qemu's images read byte-identically with the same info
 * and map; qimg's images pass qemu-img check and compare; writes both ways; the
 * create option matrix; check (and -r) on damaged images; QED_F_NEED_CHECK handling.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, tempDir, ROOT } from '../helpers/qemu.js';
import { mapRanges, patch, setU64 } from '../hostile/mutate.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-qed-');
afterAll(() => tmp.cleanup());
const FIX = join(ROOT, 'fixtures/foreign/qed');
const d = tmp.path;
for (const f of ['plain.qed', 'small.qed', 'overlay.qed', 'overlay-qed.qed', 'base.raw']) copyFileSync(join(FIX, f), join(d, f));

const both = (args: string[]) => ({ q: qemuImg(args, d), m: qimg(args, { cwd: d }) });
const msg = (s: string) => s.replace(/^qemu-img: /gm, '').replace(/^qimg: /gm, '');

describe.runIf(enabled)('qed: qemu-made images', () => {
  for (const f of ['plain.qed', 'small.qed', 'overlay.qed', 'overlay-qed.qed']) {
    it(`${f}: convert, info, map as qemu-img`, () => {
      ok(qemuImg(['convert', '-O', 'raw', f, `${f}.q.raw`], d));
      ok(qimg(['convert', '-O', 'raw', f, `${f}.m.raw`], { cwd: d }));
      expect(readFileSync(join(d, `${f}.m.raw`)).equals(readFileSync(join(d, `${f}.q.raw`)))).toBe(true);
      for (const args of [['info', f], ['info', '--backing-chain', f], ['map', f]]) {
        const { q, m } = both(args);
        expect(m.stdout, args.join(' ')).toBe(q.stdout);
      }
      const q = JSON.parse(ok(qemuImg(['info', '--output=json', f], d)).stdout);
      const m = JSON.parse(ok(qimg(['info', '--output=json', f], { cwd: d })).stdout);
      delete q['actual-size'];
      delete m['actual-size'];
      expect(m).toEqual(q);
      const qm = both(['map', '--output=json', f]);
      expect(mapRanges(qm.m.stdout)).toEqual(mapRanges(qm.q.stdout));
      const c = both(['check', f]);
      expect(c.m.stdout).toBe(c.q.stdout);
      expect(c.m.status).toBe(c.q.status);
    });
  }
});

describe.runIf(enabled)('qed: create', () => {
  const cases: string[][] = [
    [],
    ['-o', 'cluster_size=4k'],
    ['-o', 'cluster_size=2048'],
    ['-o', 'cluster_size=65537'],
    ['-o', 'cluster_size=64M'],
    ['-o', 'table_size=16'],
    ['-o', 'table_size=3'],
    ['-o', 'table_size=0'],
    ['-o', 'cluster_size=4k,table_size=1'],
    ['-o', 'backing_fmt=foo'],
    ['-o', 'backing_fmt=qcow2'],
    ['-o', 'foo=1'],
    ['-b', 'base.raw', '-F', 'raw'],
  ];
  for (const [i, c] of cases.entries()) {
    it(`create ${c.join(' ') || '(defaults)'}`, () => {
      const q = qemuImg(['create', '-f', 'qed', ...c, `cq${i}.qed`, '10M'], d);
      const m = qimg(['create', '-f', 'qed', ...c, `cm${i}.qed`, '10M'], { cwd: d });
      expect(m.status).toBe(q.status);
      expect(m.stdout.replace(`cm${i}`, `cq${i}`)).toBe(q.stdout);
      expect(msg(m.stderr).replace(`cm${i}`, `cq${i}`)).toBe(msg(q.stderr));
      if (q.status === 0) {
        const head = (f: string) => readFileSync(join(d, f)).subarray(0, 4096);
        expect(head(`cm${i}.qed`).equals(head(`cq${i}.qed`))).toBe(true);
      }
    });
  }
  it('-o help as qemu-img', () => {
    expect(qimg(['create', '-f', 'qed', '-o', 'help']).stdout).toBe(qemuImg(['create', '-f', 'qed', '-o', 'help']).stdout);
  });
});

describe.runIf(enabled)('qed: writes', () => {
  it('convert to qed: check clean, identical, map as qemu-img convert', () => {
    ok(qimg(['convert', '-O', 'qed', 'plain.qed', 'conv-m.qed'], { cwd: d }));
    ok(qemuImg(['convert', '-O', 'qed', 'plain.qed', 'conv-q.qed'], d));
    expect(ok(qemuImg(['check', 'conv-m.qed'], d)).stdout).toContain('No errors were found');
    ok(qemuImg(['compare', 'plain.qed', 'conv-m.qed'], d));
    expect(qimg(['map', 'conv-m.qed'], { cwd: d }).stdout).toBe(qemuImg(['map', 'conv-q.qed'], d).stdout.replace(/conv-q/g, 'conv-m'));
    expect(readFileSync(join(d, 'conv-m.qed')).readUInt32LE(16) & 2).toBe(0);
  });
  it('qemu-io writes into a qimg image; qimg reads them', () => {
    ok(qimg(['create', '-f', 'qed', 'w.qed', '4M'], { cwd: d }));
    ok(qemuIo(['-c', 'write -P 0x5a 100k 300k', '-c', 'write -z 1M 64k', 'w.qed'], d));
    ok(qemuImg(['convert', '-O', 'raw', 'w.qed', 'w.q.raw'], d));
    ok(qimg(['convert', '-O', 'raw', 'w.qed', 'w.m.raw'], { cwd: d }));
    expect(readFileSync(join(d, 'w.m.raw')).equals(readFileSync(join(d, 'w.q.raw')))).toBe(true);
  });
  it('qimg writes into qemu images (convert -n, partial clusters over a backing file)', () => {
    ok(qemuImg(['create', '-f', 'raw', 'src.raw', '4M'], d));
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 0x61 5000 70000', '-c', 'write -P 0x62 2M 1000', 'src.raw'], d));
    ok(qemuImg(['create', '-f', 'qed', '-b', 'base.raw', '-F', 'raw', 'n.qed', '4M'], d));
    ok(qimg(['convert', '-n', '-f', 'raw', '-O', 'qed', 'src.raw', 'n.qed'], { cwd: d }));
    expect(ok(qemuImg(['check', 'n.qed'], d)).stdout).toContain('No errors');
    ok(qemuImg(['compare', '-f', 'raw', '-F', 'qed', 'src.raw', 'n.qed'], d));
  });
  it('commit into a qed base keeps the top (qemu cannot empty qed) and matches qemu-img', () => {
    for (const who of ['q', 'm']) {
      ok(qemuImg(['create', '-f', 'qed', `b${who}.qed`, '4M'], d));
      ok(qemuIo(['-c', 'write -P 0x21 0 1M', `b${who}.qed`], d));
      ok(qemuImg(['create', '-f', 'qed', '-b', `b${who}.qed`, '-F', 'qed', `t${who}.qed`], d));
      ok(qemuIo(['-c', 'write -P 0x22 64k 100k', `t${who}.qed`], d));
    }
    expect(qimg(['commit', 'tm.qed'], { cwd: d }).stdout).toBe(qemuImg(['commit', 'tq.qed'], d).stdout);
    ok(qemuImg(['compare', 'bq.qed', 'bm.qed'], d));
    ok(qemuImg(['compare', 'tq.qed', 'tm.qed'], d));
    expect(qemuImg(['check', 'bm.qed'], d).status).toBe(0);
  });
  it('rebase -u rewrites the backing name; info as qemu-img', () => {
    copyFileSync(join(d, 'overlay.qed'), join(d, 'rq.qed'));
    copyFileSync(join(d, 'overlay.qed'), join(d, 'rm.qed'));
    ok(qemuImg(['rebase', '-u', '-b', 'plain.qed', '-F', 'qed', 'rq.qed'], d));
    ok(qimg(['rebase', '-u', '-b', 'plain.qed', '-F', 'qed', 'rm.qed'], { cwd: d }));
    expect(readFileSync(join(d, 'rm.qed')).subarray(0, 4096).equals(readFileSync(join(d, 'rq.qed')).subarray(0, 4096))).toBe(true);
    ok(qimg(['rebase', '-b', '', 'rm.qed'], { cwd: d }));
    ok(qemuImg(['compare', 'rq.qed', 'rm.qed'], d));
  });
});

describe.runIf(enabled)('qed: check', () => {
  const L2 = 0x70000; // plain.qed: the L2 table after the first data clusters
  const damaged: Array<[string, (f: string) => void]> = [
    ['leaked clusters', (f) => patch(f, readFileSync(f).length, Buffer.alloc(131072))],
    ['data offset past the end', (f) => setLE(f, L2 + 16, 0x1000000000)],
    ['unaligned data offset', (f) => setLE(f, L2 + 8, 0x50001)],
    ['cluster referenced twice', (f) => setLE(f, L2 + 16 * 8, 0x50000)],
    ['L1 entry past the end', (f) => setLE(f, 65536 + 8, 0x7000000)],
  ];
  for (const [name, damage] of damaged) {
    it(`${name}: check, -r leaks, -r all as qemu-img`, () => {
      for (const mode of [[], ['-r', 'leaks'], ['-r', 'all'], ['--output=json']]) {
        const q = join(d, `chk-q.qed`);
        const m = join(d, `chk-m.qed`);
        copyFileSync(join(d, 'plain.qed'), q);
        damage(q);
        copyFileSync(q, m);
        const rq = qemuImg(['check', ...mode, 'chk-q.qed'], d);
        const rm = qimg(['check', ...mode, 'chk-m.qed'], { cwd: d });
        expect(rm.status, `${mode.join(' ')}: ${rm.stderr}`).toBe(rq.status);
        expect(rm.stdout.replace(/chk-m/g, 'chk-q')).toBe(rq.stdout);
        expect(readFileSync(m).equals(readFileSync(q)), 'repaired files equal').toBe(true);
      }
    });
  }
  it('QED_F_NEED_CHECK: read-only opens leave it, a write open repairs and clears it', () => {
    for (const who of ['q', 'm']) {
      copyFileSync(join(d, 'plain.qed'), join(d, `nc${who}.qed`));
      setLE(join(d, `nc${who}.qed`), 0x70000 + 16, 0x1000000000);
      patch(join(d, `nc${who}.qed`), 16, Buffer.from([2]));
    }
    expect(qimg(['info', '--output=json', 'ncm.qed'], { cwd: d }).stdout).toBe(qemuImg(['info', '--output=json', 'ncq.qed'], d).stdout.replace(/ncq/g, 'ncm'));
    expect(readFileSync(join(d, 'ncm.qed'))[16]).toBe(2);
    ok(qemuIo(['-c', 'write -P 1 3M 4k', 'ncq.qed'], d));
    ok(qimg(['convert', '-n', '-O', 'qed', 'ncq.qed', 'ncm.qed'], { cwd: d }));
    expect(readFileSync(join(d, 'ncm.qed'))[16]).toBe(0);
    expect(ok(qemuImg(['check', 'ncm.qed'], d)).stdout).toContain('No errors');
    ok(qemuImg(['compare', 'ncq.qed', 'ncm.qed'], d));
  });
});

function setLE(file: string, offset: number, v: number): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  patch(file, offset, b);
}
void setU64;
