/**
 * Hostile backing chains: loops (qemu-img hangs on map/convert there), chains deeper
 * than MAX_CHAIN_DEPTH, missing backing files, and backing or data-file names that
 * look like qemu's protocol syntax: json: names qimg takes as plain file names; nbd://
 * names are NBD exports (as in qemu), refused for untrusted images. See mutate.ts for what every run must hold.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdirSync, mkdtempSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { MAX_CHAIN_DEPTH } from '../../src/core/open.js';
import { ok, qemuAvailable, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { H, checkImage, fingerprint, patch, runQimg, setU32, expectCleanFailure, expectSuccess } from './mutate.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-hostile-chain-');
afterAll(() => tmp.cleanup());

const caseDir = () => mkdtempSync(join(tmp.path, 'case-'));
const img = (dir: string, ...args: string[]) => ok(qemuImg(args, dir));

const LOOP = 'creates an infinite loop';
const DEEP = `Backing chain is deeper than ${MAX_CHAIN_DEPTH} images`;
const JSON_NAME = 'json:{"file.filename":"/etc/passwd"}';


describe.skipIf(!enabled)('backing loops', () => {
  it('an image that is its own backing file', async () => {
    const dir = caseDir();
    img(dir, 'create', '-q', '-f', 'qcow2', 'loop.qcow2', '1M');
    img(dir, 'rebase', '-u', '-b', 'loop.qcow2', '-F', 'qcow2', 'loop.qcow2');
    await checkImage(
      dir,
      'loop.qcow2',
      {
        expect: { info: 'ok', chain: LOOP, map: LOOP, convert: LOOP },
        noQemu: ['map', 'convert'], // qemu-img 7.2 hangs, growing without bound
        then: (cmd, r) => {
          if (cmd === 'info') expect(r.stdout).toContain('backing file: loop.qcow2\n');
        },
      },
      true,
    );
  });

  it('a loop of two images (a -> b -> a)', async () => {
    const dir = caseDir();
    img(dir, 'create', '-q', '-f', 'qcow2', 'a.qcow2', '1M');
    img(dir, 'create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', 'b.qcow2');
    img(dir, 'rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', 'a.qcow2');
    await checkImage(dir, 'b.qcow2', { expect: { info: 'ok', chain: LOOP, map: LOOP, convert: LOOP }, noQemu: ['map', 'convert'] }, true);
  });

  it('a loop through a symbolic link', async () => {
    const dir = caseDir();
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', 'link.qcow2', '-F', 'qcow2', 'image.qcow2', '1M');
    symlinkSync('image.qcow2', join(dir, 'link.qcow2'));
    await checkImage(dir, 'image.qcow2', { expect: { chain: LOOP, map: LOOP, convert: LOOP }, noQemu: ['map', 'convert'] }, true);
  });

  it('a loop through another spelling of the same path', async () => {
    const dir = caseDir();
    mkdirSync(join(dir, 'sub'));
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', './sub/../image.qcow2', '-F', 'qcow2', 'image.qcow2', '1M');
    await checkImage(dir, 'image.qcow2', { expect: { chain: LOOP, map: LOOP, convert: LOOP }, noQemu: ['map', 'convert'] }, true);
  });
});

describe.skipIf(!enabled)('deep chains', () => {
  /** L000 (data) <- L001 <- ... <- L300, built from one 4k-cluster template. */
  const depthDir = join(tmp.path, 'deep');
  const layer = (i: number) => `L${String(i).padStart(3, '0')}.qcow2`;
  beforeAll(() => {
    if (!enabled) return;
    mkdirSync(depthDir);
    img(depthDir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', layer(0), '1M');
    ok(qemuIo(['-c', 'write -P 0x5a 0 64k', layer(0)], depthDir));
    img(depthDir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-u', '-b', layer(0), '-F', 'qcow2', 'template.qcow2', '1M');
    const template = readFileSync(join(depthDir, 'template.qcow2'));
    const nameAt = Number(template.readBigUInt64BE(H.backingOffset));
    for (let i = 1; i <= 300; i++) {
      template.write(layer(i - 1), nameAt);
      writeFileSync(join(depthDir, layer(i)), template);
    }
  });

  it(`a chain of exactly ${MAX_CHAIN_DEPTH} images opens`, async () => {
    const top = layer(MAX_CHAIN_DEPTH - 1);
    await checkImage(
      depthDir,
      top,
      {
        expect: { map: 'ok', convert: 'ok' },
        then: (cmd, r) => {
          if (cmd === 'map') expect(JSON.parse(r.stdout)[0]).toMatchObject({ start: 0, length: 65536, depth: MAX_CHAIN_DEPTH - 1, data: true });
        },
      },
      true,
    );
  });

  it(`a chain of ${MAX_CHAIN_DEPTH + 1} images is refused`, async () => {
    const reason = `qimg limits chains to ${MAX_CHAIN_DEPTH} images; qemu-img has no limit`;
    await checkImage(
      depthDir,
      layer(MAX_CHAIN_DEPTH),
      { expect: { chain: DEEP, map: DEEP, convert: DEEP }, differs: { chain: reason, map: reason, convert: reason } },
      true,
    );
  });

  it('a chain of 301 images is refused', async () => {
    await checkImage(depthDir, layer(300), { expect: { info: 'ok', chain: DEEP, map: DEEP, convert: DEEP } }, false);
  });
});

describe.skipIf(!enabled)('missing and odd backing files', () => {
  it('missing backing file: info shows it, reads fail', async () => {
    const dir = caseDir();
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', 'nonexistent.qcow2', '-F', 'qcow2', 'image.qcow2', '1M');
    await checkImage(
      dir,
      'image.qcow2',
      {
        expect: {
          info: 'ok',
          chain: "Could not open 'nonexistent.qcow2': No such file or directory",
          map: "Could not open backing file: Could not open 'nonexistent.qcow2': No such file or directory",
          convert: 'Could not open backing file',
        },
        then: (cmd, r) => {
          if (cmd === 'info') expect(r.stdout).toContain('backing file: nonexistent.qcow2\nbacking file format: qcow2\n');
        },
      },
      true,
    );
  });

  it('missing file two levels down', async () => {
    const dir = caseDir();
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'mid.qcow2', '1M');
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '1M');
    await checkImage(dir, 'top.qcow2', { expect: { info: 'ok', chain: 'gone.qcow2', map: 'gone.qcow2', convert: 'gone.qcow2' } }, true);
  });

  it('backing file with a hostile header', async () => {
    const dir = caseDir();
    img(dir, 'create', '-q', '-f', 'qcow2', 'base.qcow2', '1M');
    img(dir, 'create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'image.qcow2');
    setU32(join(dir, 'base.qcow2'), H.clusterBits, 22);
    const msg = 'Unsupported cluster size: 2^22';
    await checkImage(dir, 'image.qcow2', { expect: { info: 'ok', chain: msg, map: `Could not open backing file: ${msg}`, convert: msg } }, true);
  });

  it('backing format qcow2 on a file that is not', async () => {
    const dir = caseDir();
    writeFileSync(join(dir, 'base.raw'), Buffer.alloc(1 << 20, 0x11));
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', 'base.raw', '-F', 'qcow2', 'image.qcow2', '1M');
    const msg = 'Image is not in qcow2 format';
    await checkImage(dir, 'image.qcow2', { expect: { info: 'ok', chain: msg, map: msg, convert: msg } }, true);
  });

  it('backing name with a newline: still one line on stderr', async () => {
    const dir = caseDir();
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', 'two\nlines.qcow2', '-F', 'qcow2', 'image.qcow2', '1M');
    const msg = "Could not open 'two lines.qcow2': No such file or directory";
    await checkImage(dir, 'image.qcow2', { expect: { info: 'ok', chain: msg, map: msg, convert: msg } }, true);
  });

  it('backing file that is a directory', async () => {
    const dir = caseDir();
    mkdirSync(join(dir, 'd'));
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', 'd', '-F', 'raw', 'image.qcow2', '1M');
    await checkImage(dir, 'image.qcow2', { expect: { info: 'ok', map: 'Could not open backing file', convert: 'Could not open backing file' } }, true);
  });

  it('backing file that is a FIFO (open would block forever)', async () => {
    const dir = caseDir();
    execFileSync('mkfifo', [join(dir, 'pipe')]);
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', 'pipe', '-F', 'raw', 'image.qcow2', '1M');
    const msg = "Could not open 'pipe': not a regular file or block device";
    // qemu-img blocks in open() here as well: not run.
    await checkImage(dir, 'image.qcow2', { expect: { info: 'ok', chain: msg, map: msg, convert: msg }, noQemu: ['chain', 'map', 'convert'] }, true);
    const r = await runQimg(['info', 'pipe'], dir);
    expectCleanFailure(r, msg);
  });
});

describe.skipIf(!enabled)('protocol-like names: json: is a plain file name, nbd:// an export', () => {
  it(`backing ${JSON_NAME}: never opens the JSON target`, async () => {
    const dir = caseDir();
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', JSON_NAME, '-F', 'raw', 'image.qcow2', '1M');
    const notFound = `Could not open '${JSON_NAME}': No such file or directory`;
    await checkImage(
      dir,
      'image.qcow2',
      {
        expect: { info: 'ok', chain: notFound, map: `Could not open backing file: ${notFound}`, convert: notFound },
        noQemu: ['chain', 'map', 'convert'], // qemu 7.2 follows the JSON to /etc/passwd
        then: (cmd, r) => {
          if (cmd === 'info') expect(r.stdout).toContain(`backing file: ${JSON_NAME}\n`);
        },
      },
      true,
    );
  });

  it('json: backing name pointing at a local file: qemu-img follows it, qimg does not', async () => {
    const dir = caseDir();
    writeFileSync(join(dir, 'target.raw'), Buffer.alloc(1 << 20, 0x22));
    const name = 'json:{"file.filename":"target.raw"}';
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', name, '-F', 'raw', 'image.qcow2', '1M');
    const reason = 'qimg takes json: names as plain file names (CVE-2024-4467 class); qemu 7.2 parses them';
    await checkImage(
      dir,
      'image.qcow2',
      { expect: { map: 'Could not open backing file', convert: 'Could not open backing file' }, differs: { map: reason, convert: reason } },
      true,
    );
  });

  it('a file literally named json:{...} is the backing file', async () => {
    const dir = caseDir();
    const name = 'json:{"file.filename":"target.raw"}';
    writeFileSync(join(dir, 'target.raw'), Buffer.alloc(1 << 20, 0x22));
    writeFileSync(join(dir, name), Buffer.alloc(1 << 20, 0x11));
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', name, '-F', 'raw', 'image.qcow2', '1M');
    const before = fingerprint(join(dir, 'image.qcow2'));
    const r = await runQimg(['convert', '-O', 'raw', 'image.qcow2', 'out.raw'], dir);
    expectSuccess(r);
    expect(readFileSync(join(dir, 'out.raw')).equals(Buffer.alloc(1 << 20, 0x11))).toBe(true);
    expect(fingerprint(join(dir, 'image.qcow2'))).toEqual(before);
  });

  it('backing nbd://127.0.0.1:1/x: an NBD export, as qemu-img takes it (nobody serves it: one clear line)', async () => {
    const dir = caseDir();
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', 'nbd://127.0.0.1:1/x', '-F', 'raw', 'image.qcow2', '1M');
    const refused = "Failed to connect to '127.0.0.1:1': Connection refused";
    await checkImage(dir, 'image.qcow2', { expect: { info: 'ok', chain: refused, map: refused, convert: refused } }, true);
  });

  it('an NBD backing name in an untrusted image is refused before any connection', async () => {
    const dir = caseDir();
    img(dir, 'create', '-q', '-f', 'qcow2', '-u', '-b', 'nbd://127.0.0.1:1/x', '-F', 'raw', 'image.qcow2', '1M');
    const r = await runQimg(['--untrusted', 'convert', '-O', 'raw', 'image.qcow2', 'out.raw'], dir);
    expectCleanFailure(r, "backing file 'nbd://127.0.0.1:1/x' lies outside the image's directory (refused for untrusted images)");
  });

  it(`external data file named ${JSON_NAME}`, async () => {
    const dir = caseDir();
    // Made with a plain name of the same length, then renamed in the header extension.
    const placeholder = 'x'.repeat(JSON_NAME.length);
    img(dir, 'create', '-q', '-f', 'qcow2', '-o', `data_file=${placeholder}`, 'image.qcow2', '1M');
    const f = join(dir, 'image.qcow2');
    const head = readFileSync(f).subarray(0, 4096);
    const at = head.indexOf(placeholder);
    expect(at).toBeGreaterThan(0);
    patch(f, at, Buffer.from(JSON_NAME));
    const notFound = `Could not open '${JSON_NAME}': No such file or directory`;
    await checkImage(
      dir,
      'image.qcow2',
      {
        expect: { info: 'ok', map: notFound, convert: notFound },
        noQemu: ['map', 'convert'],
        then: (cmd, r) => {
          if (cmd === 'info') expect(r.stdout).toContain(`data file: ${JSON_NAME}\n`);
        },
      },
      true,
    );
  });
});
