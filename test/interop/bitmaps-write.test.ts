/**
 * Writing into an image with persistent bitmaps: the enabled bitmaps record the writes
 * and are stored clean on close; a writer that dies before closing leaves them flagged
 * in-use (never trusted while stale), with the image otherwise sound for qemu-img.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { join, resolve } from 'node:path';
import { openImage } from '../../src/index.js';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-bitmaps-');
afterAll(() => tmp.cleanup());

function bitmapFlags(file: string): Array<[string, string[]]> {
  const info = JSON.parse(ok(qemuImg(['info', '--output=json', file])).stdout);
  return info['format-specific'].data.bitmaps.map((b: { name: string; flags: string[] }) => [b.name, b.flags]);
}

function makeImage(name: string): string {
  const file = join(tmp.path, name);
  ok(qemuImg(['create', '-q', '-f', 'qcow2', file, '4M']));
  ok(qemuIo(['-c', 'write -P 1 0 1M', file]));
  ok(qemuImg(['bitmap', '--add', file, 'b0']));
  ok(qemuImg(['bitmap', '--add', '--disable', file, 'b1']));
  return file;
}

describe.skipIf(!enabled)('writes to images with persistent bitmaps', () => {
  it('stores the bitmaps clean on close, and qemu-img uses them afterwards', async () => {
    const file = makeImage('bm.qcow2');
    const img = await openImage(file, { writable: true });
    await img.write(65536, Buffer.alloc(4096, 9));
    await img.close();
    expect(qemuImg(['check', file]).status).toBe(0);
    expect(bitmapFlags(file)).toEqual([
      ['b0', ['auto']],
      ['b1', []],
    ]);
    // QEMU accepts them as consistent: clearing b0 and enabling b1 work
    ok(qemuImg(['bitmap', '--clear', file, 'b0']));
    ok(qemuImg(['bitmap', '--enable', file, 'b1']));
    const r = qemuIo(['-c', 'read -P 9 64k 4k', file]);
    expect(r.stdout).not.toMatch(/verification failed/);
  });

  it('leaves consistent bitmaps in-use when the writer dies before closing', () => {
    const file = makeImage('crash.qcow2');
    // the child (the built library: npm test builds first) writes and exits without closing, as a crash would
    const lib = resolve('dist/index.js');
    const script = `import { openImage } from ${JSON.stringify(lib)};
      const img = await openImage(${JSON.stringify(file)}, { writable: true });
      await img.write(0, Buffer.alloc(65536, 3));
      await img.flush();
      process.exit(0);`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(bitmapFlags(file)).toEqual([
      ['b0', ['in-use', 'auto']],
      ['b1', ['in-use']],
    ]);
    // qemu-img check finds nothing worse than leaks, and the bitmaps can be removed
    expect([0, 3]).toContain(qemuImg(['check', file]).status);
    ok(qimg(['bitmap', '--remove', file, 'b0']));
    ok(qemuImg(['bitmap', '--remove', file, 'b1']));
    expect(qemuImg(['check', '-r', 'leaks', file]).status).toBe(0);
    expect(qemuImg(['check', file]).status).toBe(0);
  });
});
