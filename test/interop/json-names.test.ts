/**
 * `json:{...}` image names on the command line, as qemu-img takes them: nested objects
 * or dotted keys, -f overriding the name's driver, an encrypted qcow2 with its key
 * secret, an NBD export by its server address; the same outputs and refusals as
 * qemu-img. (Names read from images never are: see the untrusted and header tests.)
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { sameAsQemuImg } from '../helpers/same-as-qemu.js';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, retryingCalibrationSync, tempDir } from '../helpers/qemu.js';
import { qemuNbdForked, stopAll, stopPid } from '../helpers/nbd-serve.js';

const enabled = qemuAvailable();
let tmp: { path: string; cleanup: () => void };
const p = (name: string) => join(tmp.path, name);

const same = sameAsQemuImg;

describe.skipIf(!enabled)('json: image names', () => {
  beforeAll(() => {
    tmp = tempDir('qimg-json-names-');
    ok(qemuImg(['create', '-q', '-f', 'qcow2', p('a.qcow2'), '4M']));
    ok(qemuIo(['-c', 'write -P 0x4a 0 1M', '-c', 'write -z 2M 64k', p('a.qcow2')]));
    ok(retryingCalibrationSync(() => qemuImg(['create', '-q', '--object', 'secret,id=k,data=pw', '-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10', p('e.qcow2'), '1M'])));
    ok(qemuIo(['--object', 'secret,id=k,data=pw', '--image-opts', '-c', 'write -P 0x45 0 64k', `driver=qcow2,file.filename=${p('e.qcow2')},encrypt.key-secret=k`]));
  });
  afterAll(async () => {
    await stopAll();
    tmp.cleanup();
  });

  it('info, map, check, measure and compare read the image a json: name gives, as qemu-img does', () => {
    const nested = `json:{"driver": "qcow2", "file": {"driver": "file", "filename": "${p('a.qcow2')}"}}`;
    const dotted = `json:{"file.driver": "file", "file.filename": "${p('a.qcow2')}"}`;
    for (const name of [nested, dotted]) {
      same(['info', name]);
      same(['info', '--output=json', name]);
      same(['map', '--output=json', name]);
      same(['check', name]);
      same(['measure', '-O', 'qcow2', name]);
      same(['compare', name, p('a.qcow2')]);
    }
    // -f wins over the name's driver
    expect(same(['info', '-f', 'raw', nested]).stdout).toContain('file format: raw');
    // options beyond driver and file: the name shown is qemu's json:{...}
    const secret = ['--object', 'secret,id=k,data=pw'];
    const enc = `json:{"driver": "qcow2", "encrypt.key-secret": "k", "file": {"driver": "file", "filename": "${p('e.qcow2')}"}}`;
    same(['info', ...secret, enc]);
    same(['compare', ...secret, enc, enc]);
    ok(qimg(['convert', ...secret, '-O', 'raw', enc, p('e.raw')]));
    ok(qemuIo(['-f', 'raw', '-c', 'read -P 0x45 0 64k', '-c', 'read -P 0 64k 960k', p('e.raw')]));
  });

  it('writes through a json: name (resize, amend) and refuses what qemu-img refuses', () => {
    ok(qemuImg(['create', '-q', '-f', 'qcow2', p('w.qcow2'), '1M']));
    const name = `json:{"driver": "qcow2", "file": {"driver": "file", "filename": "${p('w.qcow2')}"}}`;
    expect(ok(qimg(['resize', name, '2M'])).stdout).toBe('Image resized.\n');
    ok(qimg(['amend', '-o', 'lazy_refcounts=on', name]));
    ok(qemuImg(['check', p('w.qcow2')]));
    const info = JSON.parse(ok(qemuImg(['info', '--output=json', p('w.qcow2')])).stdout);
    expect(info['virtual-size']).toBe(2 * 1024 * 1024);
    expect(info['format-specific'].data['lazy-refcounts']).toBe(true);

    for (const bad of ['json:{"file": "x"', 'json:[1]', 'json:"a"', `json:{"driver": "qcow2", "file": {"driver": "file", "filename": "${p('missing.qcow2')}"}}`]) {
      const q = qemuImg(['info', bad]);
      const r = qimg(['info', bad]);
      expect(r.status, bad).toBe(1);
      expect(q.status, bad).toBe(1);
      expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
      expect(r.stderr).toMatch(new RegExp(`^qimg: Could not open '${bad.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}': `));
    }
    expect(qimg(['info', 'json:[1]']).stderr).toContain('Invalid JSON object given');
    expect(qimg(['info', 'json:{"file": "x"']).stderr).toContain('Could not parse the JSON options');
  });

  it('an NBD export named by its server address', async () => {
    const s = qemuNbdForked(['-t', '-r', '-f', 'qcow2', '-x', 'e', '-k', p('j.sock'), p('a.qcow2')], p('j.pid'));
    try {
      const name = `json:{"driver": "raw", "file": {"driver": "nbd", "export": "e", "server": {"type": "unix", "path": "${p('j.sock')}"}}}`;
      same(['info', name]);
      same(['map', '--output=json', name]);
      same(['compare', '-F', 'qcow2', name, p('a.qcow2')]);
    } finally {
      await stopPid(s.pid);
    }
  });
});
