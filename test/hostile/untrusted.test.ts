/**
 * The untrusted-image policy: with --untrusted (or QIMG_UNTRUSTED=1) an image may
 * not make qimg open backing or data files outside its own directory.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { mkdirSync } from 'node:fs';
import { ok, qemuAvailable, qemuImg, qimg, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-untrusted-');
afterAll(() => tmp.cleanup());

describe.skipIf(!enabled)('--untrusted', () => {
  const dir = join(tmp.path, 'upload');
  mkdirSync(join(dir, 'sub'), { recursive: true });
  ok(qemuImg(['create', '-q', '-f', 'qcow2', join(tmp.path, 'outside.qcow2'), '1M']));
  ok(qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '1M']));
  ok(qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/passwd', '-F', 'raw', join(dir, 'abs.qcow2'), '1M']));
  ok(qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', '../outside.qcow2', '-F', 'qcow2', join(dir, 'up.qcow2'), '1M']));
  ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'fine.qcow2')]));
  ok(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'data_file=/etc/passwd', join(dir, 'df.qcow2'), '1M']));

  for (const name of ['abs.qcow2', 'up.qcow2', 'df.qcow2']) {
    it(`${name}: map and convert refuse the outside reference`, () => {
      for (const args of [['--untrusted', 'map', join(dir, name)], ['--untrusted', 'convert', '-O', 'raw', join(dir, name), join(tmp.path, 'o.raw')]]) {
        const r = qimg(args);
        expect(r.status).toBe(1);
        expect(r.stderr).toMatch(/^qimg: .*lies outside the image's directory \(refused for untrusted images\)\n$/);
        expect(r.stdout).toBe('');
      }
      const env = { ...process.env, QIMG_UNTRUSTED: '1' };
      expect(qimg(['map', join(dir, name)], { env }).status).toBe(1);
    });
  }

  it('info --backing-chain refuses too; plain info still shows the name', () => {
    expect(qimg(['--untrusted', 'info', '--backing-chain', join(dir, 'abs.qcow2')]).status).toBe(1);
    const r = qimg(['--untrusted', 'info', join(dir, 'abs.qcow2')]);
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('backing file: /etc/passwd');
  });

  it('references inside the directory still work', () => {
    expect(qimg(['--untrusted', 'map', join(dir, 'fine.qcow2')]).status).toBe(0);
    expect(qimg(['--untrusted', 'info', '--backing-chain', join(dir, 'fine.qcow2')]).status).toBe(0);
  });

  it('without the policy the same images open (trusted use)', () => {
    expect(qimg(['map', join(dir, 'up.qcow2')]).status).toBe(0);
  });
});
