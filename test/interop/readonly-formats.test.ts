/**
 * dmg, bochs and cloop (read-only) against qemu-img 7.2 on images built from their
 * layouts (fixtures/gen-readonly-images.py): info, map and convert -O raw agree;
 * check answers 63; create/convert/measure refuse as qemu-img does.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, qemuAvailable, qemuImg, qimg, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-ro-');
afterAll(() => tmp.cleanup());
const FOREIGN = join(ROOT, 'fixtures', 'foreign');
/** qemu's module-loader noise on hosts without qemu-block-extra */
const noise = (s: string) => s.split('\n').filter((l) => !l.startsWith('qemu: module ')).join('\n');
const strip = (s: string) => s.replace(/\s*"actual-size": \d+,?/, '').replace(/disk size: .*\n/, '');

interface Entry {
  name: string;
  file: string;
  format: string;
}

const fixtures: Array<Entry & { dir: string }> = [];
for (const fmt of ['dmg', 'bochs', 'cloop']) {
  const m = join(FOREIGN, fmt, 'manifest.json');
  if (existsSync(m)) for (const e of JSON.parse(readFileSync(m, 'utf8')) as Entry[]) fixtures.push({ ...e, dir: join(FOREIGN, fmt) });
}

describe.skipIf(!enabled)('read-only formats vs qemu-img', () => {
  for (const f of fixtures) {
    it(`${f.format}/${f.file}: probe, info, map, convert, check`, () => {
      const q = (args: string[]) => qemuImg(args, f.dir);
      const m = (args: string[]) => qimg(args, { cwd: f.dir });
      for (const out of ['json', 'human']) {
        const a = q(['info', `--output=${out}`, f.file]);
        const b = m(['info', `--output=${out}`, f.file]);
        expect(b.status).toBe(a.status);
        expect(strip(b.stdout)).toBe(strip(a.stdout));
      }
      expect(JSON.parse(m(['info', '--output=json', f.file]).stdout).format).toBe(f.format);
      const qm = q(['map', '--output=json', f.file]);
      const mm = m(['map', '--output=json', f.file]);
      expect(mm.stdout.replace(/, "compressed": false/g, '')).toBe(qm.stdout);
      const hm = m(['map', f.file]);
      const hq = q(['map', f.file]);
      expect(hm.status).toBe(hq.status);
      expect(hm.stdout).toBe(hq.stdout);
      const qo = join(tmp.path, `${f.name}.q.raw`);
      const mo = join(tmp.path, `${f.name}.m.raw`);
      const qc = q(['convert', '-O', 'raw', f.file, qo]);
      const mc = m(['convert', '-O', 'raw', f.file, mo]);
      expect(mc.status, mc.stderr).toBe(qc.status);
      if (qc.status === 0) expect(readFileSync(mo).equals(readFileSync(qo))).toBe(true);
      else {
        expect(noise(qc.stderr)).toMatch(/Input\/output error/);
        expect(mc.stderr).toMatch(/^(qimg: warning: .*\n)?qimg: error while reading at byte \d+: Input\/output error\n$/);
        expect(existsSync(mo)).toBe(false);
      }
      const ck = m(['check', f.file]);
      expect(ck.status).toBe(63);
      expect(ck.stderr).toContain('This image format does not support checks');
      expect(q(['check', f.file]).status).toBe(63);
    });
  }

  it('dmg probes by name only (".dmg" scores 2, above raw)', () => {
    const dir = join(FOREIGN, 'dmg');
    const a = qimg(['info', '--output=json', 'mixed.dmg'], { cwd: dir });
    expect(JSON.parse(a.stdout).format).toBe('dmg');
  });

  for (const fmt of ['dmg', 'bochs', 'cloop']) {
    it(`${fmt}: create, convert -O and measure -O refuse as qemu-img`, () => {
      const cases: string[][] = [
        ['create', '-f', fmt, `x.${fmt}`, '1M'],
        ['create', '-f', fmt, '-o', 'help'],
        ['create', '-f', fmt, `x.${fmt}`],
        ['convert', '-O', fmt, join(FOREIGN, 'cloop', 'small-512.cloop'), `y.${fmt}`],
        ['measure', '-O', fmt, '--size', '1M'],
      ];
      for (const args of cases) {
        const a = qemuImg(args, tmp.path);
        const b = qimg(args, { cwd: tmp.path });
        expect(b.status, args.join(' ')).toBe(a.status);
        expect(b.stderr, args.join(' ')).toBe(noise(a.stderr).replace(/qemu-img: /g, 'qimg: '));
        expect(existsSync(join(tmp.path, `x.${fmt}`))).toBe(false);
      }
    });
  }

  it('read-write opens are refused (convert -n into a dmg)', () => {
    const r = qimg(['convert', '-n', '-O', 'dmg', join(FOREIGN, 'cloop', 'small-512.cloop'), join(FOREIGN, 'dmg', 'mixed.dmg')]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/Image is read-only\n$/);
  });
});
