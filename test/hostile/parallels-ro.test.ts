/**
 * Hostile parallels, dmg, bochs and cloop images: header fields, tables and
 * truncation. Every case must end with exit 0 or 1 and one clean `qimg:` line, leave
 * the input untouched and no output behind, and succeed or fail as qemu-img does.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, ok, qemuAvailable, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { expectCleanFailure, fingerprint, runQimg } from './mutate.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-hostile-ro-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
const FOREIGN = join(ROOT, 'fixtures', 'foreign');

function le32(b: Buffer, at: number, v: number): void {
  b.writeUInt32LE(v >>> 0, at);
}
function be32(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(v >>> 0, at);
}
function be64(b: Buffer, at: number, v: bigint): void {
  b.writeBigUInt64BE(BigInt.asUintN(64, v), at);
}

interface Case {
  name: string;
  base: string;
  ext: string;
  mutate: (b: Buffer) => Buffer;
}

let prl = '';
beforeAll(() => {
  if (!enabled) return;
  ok(qemuImg(['create', '-q', '-f', 'parallels', '-o', 'cluster_size=64k', 'base.prl', '2M'], d));
  ok(qemuIo(['-c', 'write -P 0xab 0 64k', '-c', 'write -P 0xcd 1M 4k', 'base.prl'], d));
  prl = join(d, 'base.prl');
});

const koly = (b: Buffer) => b.length - 512;
const cases: Case[] = [
  // parallels
  { name: 'prl bad version', base: 'prl', ext: 'prl', mutate: (b) => (le32(b, 16, 3), b) },
  { name: 'prl zero tracks', base: 'prl', ext: 'prl', mutate: (b) => (le32(b, 28, 0), b) },
  { name: 'prl huge tracks', base: 'prl', ext: 'prl', mutate: (b) => (le32(b, 28, 0x7fffffff), b) },
  { name: 'prl huge BAT count', base: 'prl', ext: 'prl', mutate: (b) => (le32(b, 32, 0x7fffffff), b) },
  { name: 'prl BAT count past the file', base: 'prl', ext: 'prl', mutate: (b) => (le32(b, 32, 0x1fffffff), b) },
  { name: 'prl BAT entry far outside', base: 'prl', ext: 'prl', mutate: (b) => (le32(b, 64, 0xffffffff), b) },
  { name: 'prl huge sector count', base: 'prl', ext: 'prl', mutate: (b) => (b.writeBigUInt64LE(1n << 60n, 36), b) },
  { name: 'prl ext_off past the file', base: 'prl', ext: 'prl', mutate: (b) => (b.writeBigUInt64LE(1n << 40n, 56), b) },
  { name: 'prl ext_off at data', base: 'prl', ext: 'prl', mutate: (b) => (b.writeBigUInt64LE(128n, 56), b) },
  { name: 'prl truncated header', base: 'prl', ext: 'prl', mutate: (b) => b.subarray(0, 40) },
  { name: 'prl truncated BAT', base: 'prl', ext: 'prl', mutate: (b) => b.subarray(0, 70) },
  // cloop
  { name: 'cloop block size 0', base: 'cloop', ext: 'cloop', mutate: (b) => (be32(b, 128, 0), b) },
  { name: 'cloop block size odd', base: 'cloop', ext: 'cloop', mutate: (b) => (be32(b, 128, 1000), b) },
  { name: 'cloop block size huge', base: 'cloop', ext: 'cloop', mutate: (b) => (be32(b, 128, 0x10000000), b) },
  { name: 'cloop n_blocks huge', base: 'cloop', ext: 'cloop', mutate: (b) => (be32(b, 132, 0xfffffff0), b) },
  { name: 'cloop too many offsets', base: 'cloop', ext: 'cloop', mutate: (b) => (be32(b, 132, 0x8000000), b) },
  { name: 'cloop offsets past the file', base: 'cloop', ext: 'cloop', mutate: (b) => (be32(b, 132, 0x100000), b) },
  { name: 'cloop offsets decreasing', base: 'cloop', ext: 'cloop', mutate: (b) => (be64(b, 136 + 16, 10n), b) },
  { name: 'cloop block too large', base: 'cloop', ext: 'cloop', mutate: (b) => (be64(b, 136 + 8 * 9, 1n << 40n), b) },
  { name: 'cloop corrupt zlib', base: 'cloop', ext: 'cloop', mutate: (b) => (b.fill(0x55, 300, 340), b) },
  { name: 'cloop truncated', base: 'cloop', ext: 'cloop', mutate: (b) => b.subarray(0, 400) },
  // bochs
  { name: 'bochs bad version', base: 'bochs', ext: 'bochs', mutate: (b) => (le32(b, 64, 3), b) },
  { name: 'bochs catalog huge', base: 'bochs', ext: 'bochs', mutate: (b) => (le32(b, 72, 0x100001), b) },
  { name: 'bochs catalog too small', base: 'bochs', ext: 'bochs', mutate: (b) => (le32(b, 72, 3), b) },
  { name: 'bochs extent 0', base: 'bochs', ext: 'bochs', mutate: (b) => (le32(b, 80, 0), b) },
  { name: 'bochs extent not pow2', base: 'bochs', ext: 'bochs', mutate: (b) => (le32(b, 80, 3000), b) },
  { name: 'bochs extent huge', base: 'bochs', ext: 'bochs', mutate: (b) => (le32(b, 80, 0x1000000), b) },
  { name: 'bochs bitmap 0', base: 'bochs', ext: 'bochs', mutate: (b) => (le32(b, 76, 0), b) },
  { name: 'bochs catalog entry far', base: 'bochs', ext: 'bochs', mutate: (b) => (le32(b, 512, 0xfffffffe), b) },
  { name: 'bochs header offset far', base: 'bochs', ext: 'bochs', mutate: (b) => (le32(b, 68, 0xfffffff0), b) },
  { name: 'bochs truncated', base: 'bochs', ext: 'bochs', mutate: (b) => b.subarray(0, 1000) },
  // dmg
  { name: 'dmg no koly', base: 'dmg', ext: 'dmg', mutate: (b) => (b.fill(0, koly(b), koly(b) + 4), b) },
  { name: 'dmg tiny', base: 'dmg', ext: 'dmg', mutate: (b) => b.subarray(0, 100) },
  { name: 'dmg data fork past koly', base: 'dmg', ext: 'dmg', mutate: (b) => (be64(b, koly(b) + 0x18, 1n << 50n), b) },
  { name: 'dmg plist past koly', base: 'dmg', ext: 'dmg', mutate: (b) => (be64(b, koly(b) + 0xe0, 1n << 40n), b) },
  { name: 'dmg plist empty', base: 'dmg', ext: 'dmg', mutate: (b) => (be64(b, koly(b) + 0xe0, 0n), b) },
  { name: 'dmg negative sectors', base: 'dmg', ext: 'dmg', mutate: (b) => (be64(b, koly(b) + 0x1ec, 1n << 63n), b) },
  { name: 'dmg more sectors than chunks', base: 'dmg', ext: 'dmg', mutate: (b) => (be64(b, koly(b) + 0x1ec, 4096n), b) },
  { name: 'dmg unterminated data', base: 'dmg', ext: 'dmg', mutate: (b) => Buffer.from(b.toString('latin1').replace('</data>', '</dat_>'), 'latin1') },
  { name: 'dmg garbage base64', base: 'dmg', ext: 'dmg', mutate: (b) => Buffer.from(b.toString('latin1').replace(/<data>\s*bWlza/, '<data>!!!!!'), 'latin1') },
  { name: 'dmg corrupt zlib chunk', base: 'dmg', ext: 'dmg', mutate: (b) => (b.fill(0x11, 10, 60), b) },
];

const sources: Record<string, () => string> = {
  prl: () => prl,
  cloop: () => join(FOREIGN, 'cloop', 'small-512.cloop'),
  bochs: () => join(FOREIGN, 'bochs', 'growing-v2.bochs'),
  dmg: () => join(FOREIGN, 'dmg', 'mixed.dmg'),
};

describe.skipIf(!enabled)('hostile parallels/dmg/bochs/cloop images', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const name = `${c.name.replace(/\W+/g, '-')}.${c.ext}`;
      const file = join(d, name);
      writeFileSync(file, c.mutate(Buffer.from(readFileSync(sources[c.base]()))));
      const fmt = c.base === 'prl' ? 'parallels' : c.base;
      const before = fingerprint(file);
      const out = `${name}.out.raw`;
      for (const args of [
        ['info', '-f', fmt, name],
        ['convert', '-f', fmt, '-O', 'raw', name, out],
      ]) {
        copyFileSync(file, join(d, `q-${name}`));
        const q = qemuImg(args.map((a) => (a === name ? `q-${name}` : a)).map((a) => (a === out ? `q-${out}` : a)), d);
        const r = await runQimg(args, d);
        // qemu's warnings (unsupported dmg chunk types) come before the result
        const clean = { ...r, stderr: r.stderr.replace(/^(qimg: warning: .*\n)+/, '') };
        if (r.status === 0) expect(clean.stderr).toBe('');
        else {
          expectCleanFailure(clean, /./, `${c.name}: ${args.join(' ')}`);
          if (args[0] === 'convert') expect(existsSync(join(d, out))).toBe(false);
        }
        expect(r.status, `${c.name} ${args[0]}: qemu ${q.status} ${q.stderr}; qimg ${r.stderr}`).toBe(q.status === 0 ? 0 : 1);
        if (r.status === 0 && args[0] === 'convert') {
          expect(readFileSync(join(d, out)).equals(readFileSync(join(d, `q-${out}`)))).toBe(true);
        }
      }
      expect(fingerprint(file)).toEqual(before);
    });
  }
});
