/**
 * The read path against qemu-img as the oracle, for every fixture: info (JSON and
 * human, single and --backing-chain), map (JSON and human) and convert -O raw.
 */
import { describe, expect, it, afterAll } from 'vitest';
import { join } from 'node:path';
import { IMAGES_DIR, fixturePath, loadManifest } from '../helpers/fixtures.js';
import { qemuAvailable, qemuImg, qimg, sha256File, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const fixtures = loadManifest();
const tmp = tempDir('qimg-read-');
afterAll(() => tmp.cleanup());

/** qemu 8.2+ prints "compressed"; 7.2 does not: compare without it. */
function parseMap(text: string): Array<Record<string, unknown>> {
  return (JSON.parse(text) as Array<Record<string, unknown>>).map(({ compressed: _c, ...rest }) => rest);
}

describe.skipIf(!enabled)('read path vs qemu-img on every fixture', () => {
  for (const f of fixtures) {
    describe(f.name, () => {
      const file = fixturePath(f);
      const run = (args: string[]) => qimg(args, { cwd: IMAGES_DIR });

      it('info --output=json is identical', () => {
        const q = qemuImg(['info', '--output=json', file], IMAGES_DIR);
        const m = run(['info', '--output=json', file]);
        expect(m.stderr).toBe('');
        expect(m.status).toBe(q.status);
        expect(m.stdout).toBe(q.stdout);
      });

      it('info (human) is identical', () => {
        const q = qemuImg(['info', file], IMAGES_DIR);
        const m = run(['info', file]);
        expect(m.status).toBe(q.status);
        expect(m.stdout).toBe(q.stdout);
      });

      it('info --backing-chain agrees', () => {
        const q = qemuImg(['info', '--backing-chain', '--output=json', file], IMAGES_DIR);
        const m = run(['info', '--backing-chain', '--output=json', file]);
        expect(m.status).toBe(q.status === 0 ? 0 : 1);
        if (q.status === 0) expect(m.stdout).toBe(q.stdout);
        else expect(m.stderr).toMatch(/^qimg: .+\n$/);
      });

      if (!f.readable) {
        it('data reads fail with one clear line', () => {
          const m = run(['map', '--output=json', file]);
          expect(m.status).toBe(1);
          expect(m.stderr).toMatch(/^qimg: [^\n]+\n$/);
          expect(m.stdout).toBe('');
        });
        return;
      }

      it('map --output=json gives the same ranges', () => {
        const q = qemuImg(['map', '--output=json', file], IMAGES_DIR);
        const m = run(['map', '--output=json', file]);
        expect(q.status).toBe(0);
        expect(m.stderr).toBe('');
        expect(m.status).toBe(0);
        expect(parseMap(m.stdout)).toEqual(parseMap(q.stdout));
      });

      it('map (human) is identical', () => {
        const q = qemuImg(['map', file], IMAGES_DIR);
        const m = run(['map', file]);
        expect(m.status).toBe(q.status);
        expect(m.stdout).toBe(q.stdout);
      });

      it('convert -O raw is byte-identical', () => {
        const qOut = join(tmp.path, `${f.name}.qemu.raw`);
        const mOut = join(tmp.path, `${f.name}.qimg.raw`);
        expect(qemuImg(['convert', '-O', 'raw', file, qOut], IMAGES_DIR).status).toBe(0);
        const m = run(['convert', '-O', 'raw', file, mOut]);
        expect(m.stderr).toBe('');
        expect(m.status).toBe(0);
        expect(sha256File(mOut)).toBe(sha256File(qOut));
      });
    });
  }
});
