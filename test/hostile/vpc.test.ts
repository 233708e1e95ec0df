/**
 * Hostile VHD images: footer, dynamic disk header, BAT and parent locator fields
 * mutated on copies of qemu-made images; info, map and convert with qimg and (where
 * it is safe) qemu-img. See mutate.ts for what every run must hold.
 */
import { afterAll, beforeAll, describe, it } from 'vitest';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { checkImage, patch, setU32, setU64, truncateTo, type Expectation } from './mutate.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-hostile-vpc-');
afterAll(() => tmp.cleanup());
const T = (name: string) => join(tmp.path, name);

/** Footer (at `at`) checksum made right again, so that a later check is reached. */
function fixFooter(file: string, at = 0): void {
  const b = readFileSync(file);
  b.writeUInt32BE(0, at + 64);
  let sum = 0;
  for (let i = at; i < at + 512; i++) sum += b[i];
  b.writeUInt32BE(~sum >>> 0, at + 64);
  writeFileSync(file, b);
}

beforeAll(() => {
  if (!enabled) return;
  ok(qemuImg(['create', '-q', '-f', 'vpc', 'dyn.vhd', '8M'], tmp.path));
  ok(qemuIo(['-c', 'write -P 0xab 0 1M', '-c', 'write -P 0xcd 4M 64k', 'dyn.vhd'], tmp.path));
  ok(qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', 'fixed.vhd', '2M'], tmp.path));
});

const BAT = 1536;
/** Where a fixed disk's footer is. */
const END = (f: string) => readFileSync(f).length - 512;
const HDR = 512;
const TRUNCATED = 'block-vpc: free_data_block_offset points after the end of file. The image has been truncated.';
const all = (e: string | 'ok'): Expectation['expect'] => ({ info: e, map: e, convert: e });

interface Case extends Expectation {
  name: string;
  from?: 'dyn.vhd' | 'fixed.vhd';
  mutate: (file: string) => void;
}

const cases: Case[] = [
  { name: 'footer checksum wrong', mutate: (f) => setU32(f, 64, 0x12345678), expect: all('Incorrect header checksum') },
  { name: 'no cookie anywhere', mutate: (f) => patch(f, 0, Buffer.from('xonectix')), expect: all('invalid VPC image'), format: 'vpc' },
  { name: 'dynamic header magic', mutate: (f) => patch(f, HDR, Buffer.from('XXsparse')), expect: all('Invalid header magic') },
  { name: 'dynamic header beyond the file', mutate: (f) => (setU64(f, 16, 1n << 60n), fixFooter(f)), expect: all('Invalid header magic') },
  { name: 'block size not a power of two', mutate: (f) => setU32(f, HDR + 32, 3 << 20), expect: all('Invalid block size 3145728') },
  { name: 'block size 0', mutate: (f) => setU32(f, HDR + 32, 0), expect: all('Invalid block size 0') },
  { name: 'block size 256', mutate: (f) => setU32(f, HDR + 32, 256), expect: all('Invalid block size 256') },
  { name: 'BAT too small for the disk', mutate: (f) => setU32(f, HDR + 28, 1), expect: all('Page table too small') },
  { name: 'BAT entry count 2^31-1', mutate: (f) => setU32(f, HDR + 28, 0x7fffffff), expect: all('Max Table Entries too large (2147483647)'), maxRssKb: 200_000 },
  { name: 'BAT entry count -1', mutate: (f) => setU32(f, HDR + 28, 0xffffffff), expect: all('Max Table Entries too large (-1)') },
  { name: 'BAT of 2 GiB', mutate: (f) => setU32(f, HDR + 28, 0x1fffffff), expect: all('Error reading pagetable'), maxRssKb: 200_000 },
  { name: 'BAT of 512 MiB past the end', mutate: (f) => setU32(f, HDR + 28, 0x08000000), expect: all(TRUNCATED), maxRssKb: 200_000 },
  { name: 'BAT offset past the end', mutate: (f) => setU64(f, HDR + 16, 1n << 40n), expect: all(TRUNCATED) },
  { name: 'BAT offset beyond 2^63', mutate: (f) => setU64(f, HDR + 16, 0xfffffffffffffe00n), expect: all('Error reading pagetable'), noQemu: true },
  { name: 'BAT entry past the end', mutate: (f) => setU32(f, BAT, 0x00100000), expect: all(TRUNCATED) },
  {
    name: 'BAT entry pointing at the metadata (qemu reads it as data)',
    mutate: (f) => setU32(f, BAT + 4, 0),
    expect: all('ok'),
  },
  { name: 'truncated in the header', mutate: (f) => truncateTo(f, 600), expect: all(TRUNCATED) },
  { name: 'truncated in the BAT', mutate: (f) => truncateTo(f, 1800), expect: all(TRUNCATED) },
  { name: 'truncated in a block', mutate: (f) => truncateTo(f, 1 << 20), expect: all(TRUNCATED) },
  {
    name: 'Hyper-V creator with a huge current size',
    mutate: (f) => (patch(f, 28, Buffer.from('win ')), setU64(f, 48, 1n << 60n), fixFooter(f)),
    expect: all('File too large'),
  },
  {
    name: 'Hyper-V creator with a size the BAT cannot hold',
    mutate: (f) => (patch(f, 28, Buffer.from('win ')), setU64(f, 48, 1n << 30n), fixFooter(f)),
    expect: all('Page table too small'),
  },
  {
    name: 'CHS geometry of zero',
    mutate: (f) => (setU32(f, 56, 0), fixFooter(f)),
    expect: all('ok'),
  },
  {
    name: 'fixed: footer says dynamic',
    from: 'fixed.vhd',
    mutate: (f) => (setU32(f, END(f) + 60, 3), fixFooter(f, END(f))),
    expect: all('invalid VPC image'),
    format: 'vpc',
  },
  {
    name: 'fixed: footer checksum wrong',
    from: 'fixed.vhd',
    mutate: (f) => setU32(f, END(f) + 64, 1),
    expect: all('Incorrect header checksum'),
    format: 'vpc',
  },
  {
    name: 'fixed: size beyond the file',
    from: 'fixed.vhd',
    mutate: (f) => (patch(f, END(f) + 28, Buffer.from('win ')), setU64(f, END(f) + 48, 1n << 24n), fixFooter(f, END(f))),
    expect: all('ok'),
    format: 'vpc',
  },
  {
    name: 'file smaller than a footer',
    mutate: (f) => truncateTo(f, 300),
    from: 'fixed.vhd',
    expect: all('invalid VPC image'),
    format: 'vpc',
  },
  {
    name: 'differencing: locator outside the file',
    mutate: (f) => {
      setU32(f, 60, 4);
      fixFooter(f);
      patch(f, HDR + 576, Buffer.from('W2ru'));
      setU32(f, HDR + 576 + 8, 64);
      setU64(f, HDR + 576 + 16, 1n << 40n);
    },
    expect: { info: 'parent locator W2ru lies outside the image or is too long', convert: 'parent locator W2ru lies outside the image or is too long' },
    differs: { info: 'qemu 7.2 has no differencing support and ignores locators', convert: 'qemu 7.2 has no differencing support and ignores locators' },
  },
  {
    name: 'differencing: no locator at all',
    mutate: (f) => (setU32(f, 60, 4), fixFooter(f)),
    expect: { info: 'ok', convert: 'differencing disk without a usable parent locator' },
    differs: { convert: 'qemu 7.2 reads a differencing disk as a standalone disk' },
  },
  {
    name: 'differencing: its own parent',
    mutate: (f) => {
      setU32(f, 60, 4);
      fixFooter(f);
      const name = Buffer.from('case.vhd', 'utf16le');
      const size = readFileSync(f).length;
      patch(f, size - 512, Buffer.concat([name, Buffer.alloc(512 - name.length)]));
      patch(f, size, readFileSync(f).subarray(0, 512)); // footer after the locator data
      patch(f, HDR + 576, Buffer.from('W2ru'));
      setU32(f, HDR + 576 + 8, name.length);
      setU64(f, HDR + 576 + 16, BigInt(size - 512));
    },
    expect: { convert: /infinite loop|unique id/ },
    differs: { convert: 'qemu 7.2 reads a differencing disk as a standalone disk' },
  },
];

describe.runIf(enabled)('hostile vpc images', () => {
  it.each(cases)('$name', async (c) => {
    const name = 'case.vhd';
    copyFileSync(T(c.from ?? 'dyn.vhd'), T(name));
    c.mutate(T(name));
    await checkImage(tmp.path, name, c, enabled);
  });
});
