/**
 * QEMU-compatible image locks: qimg refuses an image qemu-io holds for writing
 * (reads and writes alike, with qemu-img's wording), -U reads anyway, and qemu-io
 * refuses an image qimg is writing.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { openImage } from '../../src/index.js';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, sha256File, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-lock-');
afterAll(() => tmp.cleanup());

/** qemu-io holding `file` open read-write until killed. */
async function holdWithQemuIo(file: string): Promise<ChildProcess> {
  const child = spawn('qemu-io', ['-c', 'sleep 60000', file], { stdio: 'ignore' });
  // Wait until its locks are visible (up to 15 s: a loaded machine starts qemu-io slowly).
  for (let i = 0; i < 300; i++) {
    if (qemuImg(['info', file]).status !== 0) return child;
    await new Promise((r) => setTimeout(r, 50));
  }
  child.kill('SIGKILL');
  throw new Error(`qemu-io did not take its locks on ${file}: ${JSON.stringify(qemuImg(['info', file]))}`);
}

describe.skipIf(!enabled)('image locking', () => {
  it('refuses images qemu-io writes, with qemu-img wording; -U reads anyway', async () => {
    const img = join(tmp.path, 'held.qcow2');
    ok(qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']));
    const before = sha256File(img);
    const holder = await holdWithQemuIo(img);
    try {
      for (const args of [['info', img], ['map', img], ['check', img], ['convert', '-O', 'raw', img, join(tmp.path, 'out.raw')]]) {
        const r = qimg(args);
        expect(r.status, args.join(' ')).toBe(1);
        expect(r.stderr).toMatch(/^qimg: .*Failed to get shared "write" lock: is another process using the image\?\n$/);
      }
      for (const args of [['resize', img, '+1M'], ['snapshot', '-c', 's', img], ['amend', '-o', 'lazy_refcounts=on', img], ['check', '-r', 'all', img]]) {
        const r = qimg(args);
        expect(r.status, args.join(' ')).toBe(1);
        expect(r.stderr).toMatch(/Failed to get (shared )?"write" lock/);
      }
      expect(qimg(['info', '-U', img]).status).toBe(0);
      expect(qimg(['convert', '-U', '-O', 'raw', img, join(tmp.path, 'u.raw')]).status).toBe(0);
      expect(qimg(['snapshot', '-U', '-c', 's', img]).status).toBe(1);
    } finally {
      holder.kill('SIGKILL');
    }
    expect(sha256File(img)).toBe(before);
  });

  it('qemu-io and qemu-img refuse an image qimg has open for writing', async () => {
    const file = join(tmp.path, 'mine.qcow2');
    ok(qemuImg(['create', '-q', '-f', 'qcow2', file, '1M']));
    const img = await openImage(file, { writable: true });
    try {
      await img.write(0, Buffer.alloc(4096, 7));
      const w = spawnSync('qemu-io', ['-c', 'write 0 4k', file], { encoding: 'utf8' });
      expect(w.status).not.toBe(0);
      expect(w.stderr + w.stdout).toMatch(/Failed to get "write" lock/);
      const r = qemuImg(['info', file]);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/Failed to get shared "write" lock/);
      expect(qemuImg(['info', '-U', file]).status).toBe(0);
    } finally {
      await img.close();
    }
    expect(qemuImg(['check', file]).status).toBe(0);
    const w = spawnSync('qemu-io', ['-c', 'read -P 7 0 4k', file], { encoding: 'utf8' });
    expect(w.status).toBe(0);
    expect(w.stdout).not.toMatch(/Pattern verification failed/);
  });

  it('creating over an image in use is refused with the image untouched (create, convert onto its own source)', async () => {
    for (const fmt of ['raw', 'qcow2', 'vmdk', 'vpc']) {
      const src = join(tmp.path, `self.${fmt}`);
      ok(qemuImg(['create', '-q', '-f', fmt, src, '1M']));
      ok(qemuIo(['-f', fmt, '-c', 'write -P 7 0 64k', src]), 'qemu-io');
      const before = sha256File(src);
      // convert onto its own source: qemu-img fails on the lock, the data survive
      const r = qimg(['convert', '-f', fmt, '-O', fmt, src, src]);
      expect(r.status, fmt).toBe(1);
      expect(r.stderr).toMatch(/Failed to get "write" lock/);
      expect(sha256File(src), fmt).toBe(before);
      // create over an image qemu-io holds (one format is enough: the lock is taken by
      // the same code for every format; holdWithQemuIo waits on qcow2 most reliably)
      if (fmt !== 'qcow2') continue;
      const holder = await holdWithQemuIo(src);
      try {
        const c = qimg(['create', '-f', fmt, src, '2M']);
        expect(c.status, fmt).toBe(1);
        expect(c.stderr).toMatch(/Failed to get "write" lock/);
      } finally {
        holder.kill('SIGKILL');
      }
      expect(sha256File(src), fmt).toBe(before);
    }
  });

  it('readers share: two read-only opens and qemu-img info at once', async () => {
    const file = join(tmp.path, 'shared.qcow2');
    ok(qemuImg(['create', '-q', '-f', 'qcow2', file, '1M']));
    const a = await openImage(file);
    const b = await openImage(file);
    try {
      expect(qemuImg(['info', file]).status).toBe(0);
      expect(qimg(['map', file]).status).toBe(0);
    } finally {
      await a.close();
      await b.close();
    }
  });
});
