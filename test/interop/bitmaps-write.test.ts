/**
 * Writing into an image with persistent bitmaps: qimg cannot track the writes, so the
 * bitmaps are marked in-use; the image stays clean for qemu-img check and qemu-img can
 * remove the bitmaps afterwards.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { openImage } from '../../src/index.js';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-bitmaps-');
afterAll(() => tmp.cleanup());

describe.skipIf(!enabled)('writes to images with persistent bitmaps', () => {
  it('marks bitmaps in-use, keeps check clean, and qemu-img can remove them', async () => {
    const file = join(tmp.path, 'bm.qcow2');
    ok(qemuImg(['create', '-q', '-f', 'qcow2', file, '4M']));
    ok(qemuIo(['-c', 'write -P 1 0 1M', file]));
    ok(qemuImg(['bitmap', '--add', file, 'b0']));
    ok(qemuImg(['bitmap', '--add', '--disable', file, 'b1']));
    const img = await openImage(file, { writable: true });
    await img.write(65536, Buffer.alloc(4096, 9));
    await img.close();
    expect(qemuImg(['check', file]).status).toBe(0);
    expect(qimg(['check', file]).status).toBe(0);
    const info = JSON.parse(ok(qemuImg(['info', '--output=json', file])).stdout);
    const flags = info['format-specific'].data.bitmaps.map((b: { flags: string[] }) => b.flags);
    expect(flags).toEqual([['in-use', 'auto'], ['in-use']]);
    ok(qemuImg(['bitmap', '--remove', file, 'b0']));
    ok(qemuImg(['bitmap', '--remove', file, 'b1']));
    expect(qemuImg(['check', file]).status).toBe(0);
    const r = qemuIo(['-c', 'read -P 9 64k 4k', file]);
    expect(r.stdout).not.toMatch(/verification failed/);
  });
});
