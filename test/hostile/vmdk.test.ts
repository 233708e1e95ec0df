/**
 * Hostile VMDKs: header fields, grain tables, stream markers and descriptors mutated
 * in copies of qemu-img's own images. Each case runs info, map and convert with qimg
 * and qemu-img (see mutate.ts for what every run must hold).
 */
import { afterAll, beforeAll, describe, it } from 'vitest';
import { copyFileSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { checkImage, patch, truncateTo, type Expectation } from './mutate.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-hostile-vmdk-');
afterAll(() => tmp.cleanup());
const T = (n: string) => join(tmp.path, n);

beforeAll(() => {
  if (!enabled) return;
  const d = tmp.path;
  ok(qemuImg(['create', '-q', '-f', 'vmdk', 'sparse.vmdk', '4M'], d));
  ok(qemuIo(['-c', 'write -P 0xab 0 128k', '-c', 'write -P 0xcd 1M 64k', 'sparse.vmdk'], d));
  ok(qemuImg(['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'sparse.vmdk', 'stream.vmdk'], d));
  ok(qemuImg(['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', 'flat.vmdk', '1M'], d));
});

const le32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
};
const le64 = (v: bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b;
};
/** Replaces text in the (embedded or separate) descriptor, keeping the file's length. */
function editDescriptor(file: string, from: string | RegExp, to: string): void {
  const b = readFileSync(file);
  const at = b.readUInt32BE(0) === 0x4b444d56 ? 512 : 0;
  const len = at ? 20 * 512 : b.length;
  const text = b.subarray(at, at + len).toString('latin1');
  const next = Buffer.from(text.replace(from, to), 'latin1');
  if (at) {
    const area = Buffer.alloc(len);
    next.copy(area, 0, 0, Math.min(len, next.length));
    patch(file, at, area);
  } else writeFileSync(file, next);
}
const gdOf = (file: string) => Number(readFileSync(file).readBigUInt64LE(56)) * 512;
const firstGt = (file: string) => readFileSync(file).readUInt32LE(gdOf(file)) * 512;

interface Case extends Expectation {
  name: string;
  from: 'sparse' | 'stream' | 'flat';
  mutate: (file: string) => void;
}

const all = (o: string | RegExp) => ({ info: o, map: o, convert: o });
const cases: Case[] = [
  { name: 'version 4', from: 'sparse', mutate: (f) => patch(f, 4, le32(4)), expect: all('Unsupported VMDK version 4') },
  { name: 'numGTEsPerGT 1024', from: 'sparse', mutate: (f) => patch(f, 44, le32(1024)), expect: all('L2 table size too big') },
  { name: 'numGTEsPerGT 0', from: 'sparse', mutate: (f) => patch(f, 44, le32(0)), expect: all('L1 entry size is invalid') },
  { name: 'grain of 2 GiB', from: 'sparse', mutate: (f) => patch(f, 20, le64(0x400000n)), expect: all('Invalid granularity, image may be corrupt') },
  { name: 'grainOffset past the end of the file', from: 'sparse', mutate: (f) => patch(f, 64, le64(1n << 40n)), expect: all(/File truncated, expecting at least \d+ bytes/) },
  {
    name: 'capacity of 2^62 sectors',
    from: 'sparse',
    mutate: (f) => patch(f, 12, le64(1n << 62n)),
    expect: all('capacity is too large'),
  },
  { name: 'grain directory far past the end of the file', from: 'sparse', mutate: (f) => patch(f, 56, le64(0xfffffffn)), expect: all('ok') },
  { name: 'grain table entry past the end of the file (reads zeros)', from: 'sparse', mutate: (f) => patch(f, firstGt(f) + 4, le32(0x7fffffff)), expect: all('ok') },
  { name: 'descriptor without CID', from: 'sparse', mutate: (f) => editDescriptor(f, /CID/g, 'XID'), expect: all('Invalid argument') },
  { name: 'parentFileNameHint without a closing quote', from: 'sparse', mutate: (f) => editDescriptor(f, /ddb\.toolsVersion[^\n]*\n/, 'parentFileNameHint="abc\n'), expect: all('Invalid argument') },
  { name: 'footer marker damaged', from: 'stream', mutate: (f) => { patch(f, 56, le64(0xffffffffffffffffn)); }, expect: all('Invalid footer') },
  {
    name: 'compressed grain claims 1 GiB',
    from: 'stream',
    mutate: (f) => {
      const gt = firstGt(f);
      const grain = readFileSync(f).readUInt32LE(gt) * 512;
      patch(f, grain + 8, le32(0x40000000));
    },
    expect: { info: 'ok', map: 'ok', convert: /Invalid compressed grain/ },
  },
  { name: 'compressed grain with garbage data', from: 'stream', mutate: (f) => { const grain = readFileSync(f).readUInt32LE(firstGt(f)) * 512; patch(f, grain + 12, Buffer.alloc(64, 0x55)); }, expect: { info: 'ok', map: 'ok', convert: /Invalid compressed grain/ } },
  { name: 'unsupported createType', from: 'flat', mutate: (f) => editDescriptor(f, 'monolithicFlat"', 'fancyType"'), expect: all("Unsupported image type 'fancyType'") },
  { name: 'FLAT extent line without an offset', from: 'flat', mutate: (f) => editDescriptor(f, '" 0\n', '"\n'), expect: all('Invalid extent line: RW 2048 FLAT "flat-flat.vmdk"') },
  { name: 'descriptor without createType', from: 'flat', mutate: (f) => editDescriptor(f, 'createType', 'kind'), expect: all('invalid VMDK image descriptor') },
  { name: 'extent file missing', from: 'flat', mutate: (f) => editDescriptor(f, 'flat-flat.vmdk', 'gone-flat.vmdk'), expect: all(/No such file or directory/) },
  { name: 'truncated inside the grain directory', from: 'sparse', mutate: (f) => truncateTo(f, 21 * 512 + 2), expect: all(/File truncated/) },
  { name: 'file of 3 bytes, -f vmdk', from: 'sparse', format: 'vmdk', mutate: (f) => truncateTo(f, 3), expect: all('File is too small, not a valid image') },
];

describe.skipIf(!enabled)('hostile vmdk', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const dir = mkdtempSync(join(tmp.path, 'case-'));
      const name = c.from === 'flat' ? 'flat.vmdk' : 'image.vmdk';
      copyFileSync(T(`${c.from}.vmdk`), join(dir, name));
      if (c.from === 'flat') copyFileSync(T('flat-flat.vmdk'), join(dir, 'flat-flat.vmdk'));
      c.mutate(join(dir, name));
      await checkImage(dir, name, c, true);
    });
  }
});
