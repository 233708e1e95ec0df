/**
 * VMDK interop with qemu-img 7.2 (the oracle) in both directions, for every subformat:
 * qemu's images read byte-identically with the same info/map, qimg's images pass
 * qemu-img check/compare and vmdkinfo, qemu-io writes into qimg's images and qimg
 * writes into qemu's. Plus create's option matrix, snapshot chains, check, rebase.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const hasVmdkinfo = spawnSync('vmdkinfo', ['-V']).status === 0;
const tmp = tempDir('qimg-vmdk-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
const P = (n: string) => join(d, n);
const Q = (args: string[]) => qimg(args, { cwd: d });

const SUBFORMATS = ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'streamOptimized'];

const mapJson = (text: string) => (JSON.parse(text) as Array<Record<string, unknown>>).map(({ compressed: _c, ...rest }) => rest);
const noActual = (text: string) => text.replace(/"actual-size": \d+,?/, '').replace(/disk size: .*\n/, '');

function sameBytes(a: string, b: string): boolean {
  return readFileSync(P(a)).equals(readFileSync(P(b)));
}

beforeAll(() => {
  if (!enabled) return;
  ok(qemuImg(['create', '-q', '-f', 'raw', 'src.raw', '5M'], d));
  ok(qemuIo(['-f', 'raw', '-c', 'write -P 0xab 0 100k', '-c', 'write -P 0xcd 1M 64k', '-c', 'write -P 0x11 3000k 1100k', '-c', 'write -P 0xee 5056k 64k', 'src.raw'], d));
});

describe.skipIf(!enabled)('vmdk subformats both ways', () => {
  for (const sub of SUBFORMATS) {
    describe(sub, () => {
      it('qemu-img makes it, qimg reads the same bytes, info and map', () => {
        ok(qemuImg(['convert', '-O', 'vmdk', '-o', `subformat=${sub}`, 'src.raw', `q-${sub}.vmdk`], d));
        ok(Q(['convert', '-O', 'raw', `q-${sub}.vmdk`, `q-${sub}.out`]));
        expect(sameBytes(`q-${sub}.out`, 'src.raw')).toBe(true);
        const qi = ok(qemuImg(['info', '--output=json', `q-${sub}.vmdk`], d)).stdout;
        expect(noActual(ok(Q(['info', '--output=json', `q-${sub}.vmdk`])).stdout)).toBe(noActual(qi));
        expect(noActual(ok(Q(['info', `q-${sub}.vmdk`])).stdout)).toBe(noActual(ok(qemuImg(['info', `q-${sub}.vmdk`], d)).stdout));
        expect(mapJson(ok(Q(['map', '--output=json', `q-${sub}.vmdk`])).stdout)).toEqual(mapJson(ok(qemuImg(['map', '--output=json', `q-${sub}.vmdk`], d)).stdout));
        const qm = qemuImg(['map', `q-${sub}.vmdk`], d);
        const mm = Q(['map', `q-${sub}.vmdk`]);
        expect(mm.status).toBe(qm.status);
        expect(mm.stdout).toBe(qm.stdout);
        expect(Q(['check', `q-${sub}.vmdk`]).stdout).toBe('No errors were found on the image.\n');
      });

      it('qimg makes it: qemu-img check, compare and info agree; vmdkinfo parses it', () => {
        ok(Q(['convert', '-O', 'vmdk', '-o', `subformat=${sub}`, 'src.raw', `m-${sub}.vmdk`]));
        expect(ok(qemuImg(['check', `m-${sub}.vmdk`], d)).stdout).toBe('No errors were found on the image.\n');
        expect(ok(qemuImg(['compare', 'src.raw', `m-${sub}.vmdk`], d)).stdout).toBe('Images are identical.\n');
        const qi = ok(qemuImg(['info', '--output=json', `m-${sub}.vmdk`], d)).stdout;
        expect(noActual(ok(Q(['info', '--output=json', `m-${sub}.vmdk`])).stdout)).toBe(noActual(qi));
        expect(JSON.parse(qi)['format-specific'].data['create-type']).toBe(sub);
        if (hasVmdkinfo) {
          const v = spawnSync('vmdkinfo', [`m-${sub}.vmdk`], { cwd: d, encoding: 'utf8' });
          expect(v.status, v.stderr).toBe(0);
          expect(v.stdout).toContain('5.0 MiB (5242880 bytes)');
        }
      });

      it('qemu-io writes into qimg images and qimg reads them back', () => {
        ok(Q(['create', '-q', '-f', 'vmdk', '-o', `subformat=${sub}`, `w-${sub}.vmdk`, '5M']));
        ok(qemuIo(['-c', 'write -P 0x5a 0 64k', '-c', 'write -P 0x77 4M 128k', `w-${sub}.vmdk`], d));
        ok(qemuImg(['convert', '-O', 'raw', `w-${sub}.vmdk`, `w-${sub}.q`], d));
        ok(Q(['convert', '-O', 'raw', `w-${sub}.vmdk`, `w-${sub}.m`]));
        expect(sameBytes(`w-${sub}.q`, `w-${sub}.m`)).toBe(true);
        expect(readFileSync(P(`w-${sub}.m`))[4 * 1024 * 1024]).toBe(0x77);
      });

      it('qimg writes into images qemu-img made (convert -n)', () => {
        ok(qemuImg(['create', '-q', '-f', 'vmdk', '-o', `subformat=${sub}`, `n-${sub}.vmdk`, '5M'], d));
        ok(Q(['convert', '-n', '-O', 'vmdk', 'src.raw', `n-${sub}.vmdk`]));
        expect(ok(qemuImg(['compare', 'src.raw', `n-${sub}.vmdk`], d)).stdout).toBe('Images are identical.\n');
        expect(ok(qemuImg(['check', `n-${sub}.vmdk`], d)).stdout).toBe('No errors were found on the image.\n');
      });
    });
  }
});

describe.skipIf(!enabled)('vmdk writes', () => {
  it('partial-grain writes copy the rest of the grain; both grain tables are updated', () => {
    ok(Q(['convert', '-O', 'vmdk', 'src.raw', 'p.vmdk']));
    ok(qemuIo(['-c', 'write -P 0x42 1000k 3k', '-c', 'write -P 0x43 2M 512', 'p.vmdk'], d));
    ok(qemuImg(['convert', '-O', 'raw', 'p.vmdk', 'p.q'], d));
    ok(Q(['convert', '-O', 'raw', 'p.vmdk', 'p.m']));
    expect(sameBytes('p.q', 'p.m')).toBe(true);
    // the redundant directory's tables say the same as the primary ones
    const f = readFileSync(P('p.vmdk'));
    const rgd = Number(f.readBigUInt64LE(48)) * 512;
    const gd = Number(f.readBigUInt64LE(56)) * 512;
    const gt = f.readUInt32LE(gd) * 512;
    const rgt = f.readUInt32LE(rgd) * 512;
    expect(f.subarray(gt, gt + 2048).equals(f.subarray(rgt, rgt + 2048))).toBe(true);
  });

  it('zeroed_grain: zero writes become GTE 1 (present zeros in qemu-img map)', () => {
    ok(Q(['create', '-q', '-f', 'vmdk', '-o', 'zeroed_grain=on', 'z.vmdk', '2M']));
    ok(qemuIo(['-c', 'write -P 1 0 2M', 'z.vmdk'], d));
    ok(qemuImg(['create', '-q', '-f', 'raw', 'z.raw', '2M'], d));
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 2 0 64k', 'z.raw'], d));
    ok(Q(['convert', '-n', '-O', 'vmdk', 'z.raw', 'z.vmdk']));
    expect(ok(qemuImg(['compare', 'z.raw', 'z.vmdk'], d)).stdout).toBe('Images are identical.\n');
    const map = mapJson(ok(qemuImg(['map', '--output=json', 'z.vmdk'], d)).stdout);
    expect(map[1]).toMatchObject({ start: 65536, length: 2031616, present: true, zero: true, data: false });
    expect(mapJson(ok(Q(['map', '--output=json', 'z.vmdk'])).stdout)).toEqual(map);
  });

  it('convert -c -O vmdk: accepted as by qemu (sparse stays uncompressed, stream compresses)', () => {
    ok(Q(['convert', '-c', '-O', 'vmdk', 'src.raw', 'c.vmdk']));
    ok(qemuImg(['convert', '-c', '-O', 'vmdk', 'src.raw', 'cq.vmdk'], d));
    expect(ok(qemuImg(['compare', 'src.raw', 'c.vmdk'], d)).stdout).toBe('Images are identical.\n');
    expect(mapJson(ok(Q(['map', '--output=json', 'c.vmdk'])).stdout).map((e) => e.data)).toEqual(mapJson(ok(qemuImg(['map', '--output=json', 'cq.vmdk'], d)).stdout).map((e) => e.data));
    ok(Q(['convert', '-c', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'src.raw', 'cs.vmdk']));
    expect(ok(qemuImg(['compare', 'src.raw', 'cs.vmdk'], d)).stdout).toBe('Images are identical.\n');
    expect(statSync(P('cs.vmdk')).size).toBeLessThan(256 * 1024);
  });

  it('writing an allocated grain of a stream is refused as by qemu', () => {
    ok(Q(['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'src.raw', 's1.vmdk']));
    const r = Q(['convert', '-n', '-O', 'vmdk', 'src.raw', 's1.vmdk']);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('Could not write to allocated cluster for streamOptimized');
    expect(qemuIo(['-c', 'write 0 64k', 's1.vmdk'], d).stderr + qemuIo(['-c', 'write 0 64k', 's1.vmdk'], d).stdout).toMatch(/write failed/);
  });
});

describe.skipIf(!enabled)('vmdk create options vs qemu-img', () => {
  const cases: string[][] = [
    [],
    ['-o', 'adapter_type=lsilogic,hwversion=7,toolsversion=123'],
    ['-o', 'adapter_type=buslogic,compat6=on'],
    ['-o', 'adapter_type=legacyESX,zeroed_grain=on'],
    ['-o', 'subformat=monolithicFlat,adapter_type=lsilogic'],
    ['-o', 'subformat=twoGbMaxExtentFlat'],
    ['-o', 'subformat=twoGbMaxExtentSparse,zeroed_grain=yes'],
    ['-o', 'subformat=streamOptimized'],
    ['-o', 'compat6=on,hwversion=7'],
    ['-o', 'subformat=foo'],
    ['-o', 'adapter_type=SCSI'],
    ['-o', 'subformat=monolithicFlat,zeroed_grain=on'],
    ['-o', 'backing_fmt=raw,backing_file=src.raw'],
    ['-o', 'zeroed_grain=maybe'],
    ['-o', 'bogus=1'],
  ];
  for (const c of cases) {
    it(`create ${c.join(' ') || '(defaults)'}`, () => {
      for (const f of ['cq.vmdk', 'cm.vmdk']) rmSync(P(f), { force: true });
      const q = qemuImg(['create', '-f', 'vmdk', ...c, 'cq.vmdk', '3M'], d);
      const m = Q(['create', '-f', 'vmdk', ...c, 'cm.vmdk', '3M']);
      expect(m.status).toBe(q.status);
      expect(m.stdout).toBe(q.stdout.replace(/cq\.vmdk/g, 'cm.vmdk'));
      expect(m.stderr).toBe(q.stderr.replace(/qemu-img/g, 'qimg').replace(/cq\.vmdk/g, 'cm.vmdk'));
      if (q.status !== 0) {
        expect(existsSync(P('cm.vmdk'))).toBe(false);
        return;
      }
      // the descriptor qemu writes, but for the random CID
      const desc = (f: string) => {
        const b = readFileSync(P(f));
        const text = (b.readUInt32BE(0) === 0x4b444d56 ? b.subarray(512, 512 * 21) : b).toString('latin1');
        return text.replace(/\0+$/, '').replace(/CID=[0-9a-f]+/, 'CID=x').replace(/cq/g, 'cm').split('\n').filter((l) => !l.startsWith('#'));
      };
      expect(desc('cm.vmdk')).toEqual(desc('cq.vmdk'));
      expect(noActual(ok(qemuImg(['info', 'cm.vmdk'], d)).stdout).replace(/cid: \d+/, '')).toBe(noActual(ok(qemuImg(['info', 'cq.vmdk'], d)).stdout).replace(/cid: \d+/, '').replace(/cq/g, 'cm'));
    });
  }

  it('-o help lists qemu-img options', () => {
    const q = qemuImg(['create', '-f', 'vmdk', '-o', 'help'], d);
    expect(Q(['create', '-f', 'vmdk', '-o', 'help']).stdout).toBe(q.stdout);
  });
});

describe.skipIf(!enabled)('vmdk snapshot chains', () => {
  it('a qimg delta on a qemu base reads through the parent; info --backing-chain as qemu', () => {
    ok(qemuImg(['convert', '-O', 'vmdk', 'src.raw', 'base.vmdk'], d));
    const q = qemuImg(['create', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', 'topq.vmdk'], d);
    const m = Q(['create', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', 'top.vmdk']);
    expect(m.stdout).toBe(q.stdout.replace('topq', 'top'));
    ok(qemuIo(['-c', 'write -P 0x99 64k 64k', 'top.vmdk'], d));
    ok(qemuImg(['convert', '-O', 'raw', 'top.vmdk', 'top.q'], d));
    ok(Q(['convert', '-O', 'raw', 'top.vmdk', 'top.m']));
    expect(sameBytes('top.q', 'top.m')).toBe(true);
    const norm = (s: string) => s.replace(/"actual-size": \d+,?/g, '');
    expect(norm(ok(Q(['info', '--backing-chain', '--output=json', 'top.vmdk'])).stdout)).toBe(norm(ok(qemuImg(['info', '--backing-chain', '--output=json', 'top.vmdk'], d)).stdout));
    expect(ok(Q(['map', 'top.vmdk'])).stdout).toBe(ok(qemuImg(['map', 'top.vmdk'], d)).stdout);
    // qimg writes into the delta; qemu reads the same
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 0x44 200k 300k', 'top.m'], d));
    ok(Q(['convert', '-n', '-O', 'vmdk', 'top.m', 'top.vmdk']));
    expect(ok(qemuImg(['compare', 'top.m', 'top.vmdk'], d)).stdout).toBe('Images are identical.\n');
  });

  it('a parent whose CID changed makes reads fail in both', () => {
    ok(qemuImg(['convert', '-O', 'vmdk', 'src.raw', 'b2.vmdk'], d));
    ok(Q(['create', '-q', '-f', 'vmdk', '-b', 'b2.vmdk', '-F', 'vmdk', 't2.vmdk']));
    ok(Q(['convert', '-n', '-O', 'vmdk', 'src.raw', 'b2.vmdk'])); // a write gives the parent a new CID
    expect(qemuImg(['convert', '-O', 'raw', 't2.vmdk', 't2.q'], d).status).toBe(1);
    const r = Q(['convert', '-O', 'raw', 't2.vmdk', 't2.m']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^qimg: [^\n]*parent CID mismatch[^\n]*\n$/);
  });

  it('backing_fmt other than vmdk, a non-vmdk parent and flat deltas are refused', () => {
    for (const args of [['-b', 'src.raw', '-F', 'raw'], ['-b', 'base.vmdk', '-F', 'raw'], ['-b', 'base.vmdk', '-F', 'vmdk', '-o', 'subformat=monolithicFlat']]) {
      const q = qemuImg(['create', '-f', 'vmdk', ...args, 'bq.vmdk'], d);
      const m = Q(['create', '-f', 'vmdk', ...args, 'bq.vmdk']);
      expect(m.status).toBe(q.status);
      expect(m.stderr).toBe(q.stderr.replace(/qemu-img/g, 'qimg'));
    }
  });

  it('rebase is not supported (no bdrv_change_backing_file), commit into a vmdk base works', () => {
    const q = qemuImg(['rebase', '-u', '-b', 'base.vmdk', '-F', 'vmdk', 'top.vmdk'], d);
    const m = Q(['rebase', '-u', '-b', 'base.vmdk', '-F', 'vmdk', 'top.vmdk']);
    expect(m.status).toBe(q.status);
    expect(m.stderr).toBe(q.stderr.replace(/qemu-img/g, 'qimg'));
    ok(qemuImg(['convert', '-O', 'vmdk', 'src.raw', 'cb.vmdk'], d));
    ok(Q(['create', '-q', '-f', 'vmdk', '-b', 'cb.vmdk', '-F', 'vmdk', 'ct.vmdk']));
    ok(qemuIo(['-c', 'write -P 0x31 128k 64k', 'ct.vmdk'], d));
    ok(qemuImg(['convert', '-O', 'raw', 'ct.vmdk', 'ct.raw'], d));
    expect(ok(Q(['commit', 'ct.vmdk'])).stdout).toBe('Image committed.\n');
    expect(ok(qemuImg(['compare', 'ct.raw', 'cb.vmdk'], d)).stdout).toBe('Images are identical.\n');
  });
});

describe.skipIf(!enabled)('vmdk check', () => {
  it('a grain beyond the end of the file: same message and exit code as qemu-img', () => {
    ok(qemuImg(['convert', '-O', 'vmdk', 'src.raw', 'bad.vmdk'], d));
    const f = readFileSync(P('bad.vmdk'));
    const gd = Number(f.readBigUInt64LE(56)) * 512;
    const gt = f.readUInt32LE(gd) * 512;
    f.writeUInt32LE(100000, gt + 5 * 4);
    writeFileSync(P('bad.vmdk'), f);
    for (const extra of [[], ['--output=json'], ['-r', 'all']]) {
      const q = qemuImg(['check', ...extra, 'bad.vmdk'], d);
      const m = Q(['check', ...extra, 'bad.vmdk']);
      expect(m.status).toBe(q.status);
      expect(m.stdout).toBe(q.stdout);
      expect(m.stderr).toBe(q.stderr.replace(/qemu-img/g, 'qimg'));
    }
  });
});

describe.skipIf(!enabled)('vmdk fixtures (fixtures/foreign/vmdk) read as qemu-img reads them', () => {
  const dir = join(__dirname, '..', '..', 'fixtures', 'foreign', 'vmdk');
  const manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as Array<{ name: string; file: string }>;
  for (const f of manifest) {
    it(f.name, () => {
      ok(qemuImg(['convert', '-U', '-O', 'raw', f.file, P(`fx-${f.name}.q`)], dir));
      ok(qimg(['convert', '-U', '-O', 'raw', f.file, P(`fx-${f.name}.m`)], { cwd: dir }));
      expect(sameBytes(`fx-${f.name}.q`, `fx-${f.name}.m`)).toBe(true);
      const norm = (s: string) => s.replace(/"actual-size": \d+,?/g, '');
      expect(norm(ok(qimg(['info', '-U', '--backing-chain', '--output=json', f.file], { cwd: dir })).stdout)).toBe(norm(ok(qemuImg(['info', '-U', '--backing-chain', '--output=json', f.file], dir)).stdout));
      expect(mapJson(ok(qimg(['map', '-U', '--output=json', f.file], { cwd: dir })).stdout)).toEqual(mapJson(ok(qemuImg(['map', '-U', '--output=json', f.file], dir)).stdout));
    });
  }
});
