/**
 * Hostile VDI headers and block maps: each case patches a copy of a qemu-img image
 * and runs info, map and convert -O raw with qimg and (where safe) qemu-img. The
 * runner (mutate.ts) holds every run to one clean error line or success, a finished
 * process, an untouched input and the same outcome and data as qemu-img.
 */
import { afterAll, beforeAll, describe, it } from 'vitest';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { checkImage, patch, truncateTo, type Expectation } from './mutate.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-hostile-vdi-');
afterAll(() => tmp.cleanup());

/** VDI header field offsets (little endian). */
const V = {
  signature: 0x40,
  version: 0x44,
  headerSize: 0x48,
  imageType: 0x4c,
  imageFlags: 0x50,
  offsetBmap: 0x154,
  offsetData: 0x158,
  sectorSize: 0x168,
  diskSize: 0x170,
  blockSize: 0x178,
  blocksInImage: 0x180,
  blocksAllocated: 0x184,
  uuidLink: 0x1a8,
  uuidParent: 0x1b8,
  bmap: 0x200,
} as const;

function le32(file: string, at: number, v: number): void {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  patch(file, at, b);
}

function le64(file: string, at: number, v: bigint): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  patch(file, at, b);
}

beforeAll(() => {
  if (!enabled) return;
  const d = tmp.path;
  ok(qemuImg(['create', '-q', '-f', 'vdi', 'dyn.vdi', '4M'], d));
  ok(qemuIo(['-c', 'write -P 0xab 0 64k', '-c', 'write -P 0xcd 2M 4k', 'dyn.vdi'], d));
  ok(qemuImg(['create', '-q', '-f', 'vdi', '-o', 'static=on', 'static.vdi', '2M'], d));
  ok(qemuIo(['-c', 'write -P 0x11 1M 4k', 'static.vdi'], d));
});

interface Case extends Expectation {
  name: string;
  from?: 'dyn' | 'static';
  mutate: (file: string) => void;
}

/** Refused at open: info and convert (map opens the same way). */
const fails = (msg: string) => ({ info: msg, convert: msg });
const opens = { info: 'ok', map: 'ok', convert: 'ok' } as const;
const BEYOND_EOF = 'qemu reads a block map past the end of the file as zeros (every block then maps to data block 0)';
const BMAP_PAST_EOF = /block map \(offset 0x[0-9a-f]+, \d+ entries\) extends beyond the end of the file/;

const cases: Case[] = [
  { name: 'signature changed: probed as raw', mutate: (f) => le32(f, V.signature, 0x12345678), expect: opens },
  { name: 'signature changed, -f vdi', format: 'vdi', mutate: (f) => le32(f, V.signature, 0x12345678), expect: fails('Image not in VDI format (bad signature 12345678)') },
  { name: 'version 2.0', mutate: (f) => le32(f, V.version, 0x00020000), expect: fails('unsupported VDI image (version 2.0)') },
  { name: 'header size, image type and flags are not checked (as qemu)', mutate: (f) => (le32(f, V.headerSize, 0), le32(f, V.imageType, 7), le32(f, V.imageFlags, 0xffffffff)), expect: opens },
  { name: 'block map offset unaligned', mutate: (f) => le32(f, V.offsetBmap, 0x201), expect: fails('unsupported VDI image (unaligned block map offset 0x201)') },
  { name: 'data offset unaligned', mutate: (f) => le32(f, V.offsetData, 0x401), expect: fails('unsupported VDI image (unaligned data offset 0x401)') },
  { name: 'sector size 4096', mutate: (f) => le32(f, V.sectorSize, 4096), expect: fails('unsupported VDI image (sector size 4096 is not 512)') },
  { name: 'block size 2 MiB', mutate: (f) => le32(f, V.blockSize, 2 * 1024 * 1024), expect: fails('unsupported VDI image (block size 2097152 is not 1048576)') },
  { name: 'disk size beyond the block map', mutate: (f) => le64(f, V.diskSize, 5n << 20n), expect: fails('unsupported VDI image (disk size 5242880, image bitmap has room for 4194304)') },
  { name: 'disk size 2^63', mutate: (f) => le64(f, V.diskSize, 1n << 63n), expect: fails('Unsupported VDI image size (size is 0x8000000000000000, max supported is 0x1fffff8000000)') },
  { name: 'disk size rounded up past the block map', mutate: (f) => le64(f, V.diskSize, (4n << 20n) + 1n), expect: fails('unsupported VDI image (disk size 4194816, image bitmap has room for 4194304)') },
  { name: 'odd disk size rounded to a sector', mutate: (f) => le64(f, V.diskSize, (3n << 20n) + 1000n), expect: opens },
  { name: 'disk size 0', mutate: (f) => le64(f, V.diskSize, 0n), expect: opens },
  { name: 'link UUID set', mutate: (f) => le32(f, V.uuidLink + 12, 1), expect: fails('unsupported VDI image (non-NULL link UUID)') },
  { name: 'parent UUID set', mutate: (f) => le32(f, V.uuidParent, 1), expect: fails('unsupported VDI image (non-NULL parent UUID)') },
  { name: 'too many blocks (2^30)', mutate: (f) => le32(f, V.blocksInImage, 0x40000000), expect: fails('unsupported VDI image (too many blocks 1073741824, max is 536870784)') },
  {
    name: 'most blocks allowed, block map past the end of the file: refused, memory bounded',
    mutate: (f) => le32(f, V.blocksInImage, 536870784),
    expect: fails('extends beyond the end of the file'),
    // qemu would read (and allocate) a 2 GiB block map of zeros
    noQemu: true,
    maxRssKb: 300 * 1024,
  },
  { name: 'block map offset 1 GiB (past the end)', mutate: (f) => le32(f, V.offsetBmap, 0x40000000), expect: { info: BMAP_PAST_EOF, map: BMAP_PAST_EOF, convert: BMAP_PAST_EOF } as never, differs: { info: BEYOND_EOF, map: BEYOND_EOF, convert: BEYOND_EOF } },
  { name: 'header only (truncated to 512 bytes)', mutate: (f) => truncateTo(f, 512), expect: { info: BMAP_PAST_EOF, map: BMAP_PAST_EOF, convert: BMAP_PAST_EOF } as never, differs: { info: BEYOND_EOF, map: BEYOND_EOF, convert: BEYOND_EOF } },
  { name: 'truncated to 100 bytes', mutate: (f) => truncateTo(f, 100), expect: fails('unsupported VDI image (sector size 0 is not 512)') },
  { name: 'truncated inside the data: the rest reads as zeros', mutate: (f) => truncateTo(f, 0x400 + 4096), expect: opens },
  { name: 'data offset 0xfffffe00: data past the end reads as zeros', mutate: (f) => le32(f, V.offsetData, 0xfffffe00), expect: opens },
  { name: 'data offset 0: blocks over the header', mutate: (f) => le32(f, V.offsetData, 0), expect: opens },
  { name: 'block map entry past the end of the file', mutate: (f) => le32(f, V.bmap + 4, 3), expect: opens },
  { name: 'block map entry 0xfffffffd', mutate: (f) => le32(f, V.bmap, 0xfffffffd), expect: opens },
  { name: 'discarded entry (0xfffffffe) reads as zeros', mutate: (f) => le32(f, V.bmap, 0xfffffffe), expect: opens },
  { name: 'two blocks share one data block', mutate: (f) => le32(f, V.bmap + 4, 0), expect: opens },
  { name: 'allocated count 0xffffffff', mutate: (f) => le32(f, V.blocksAllocated, 0xffffffff), expect: opens },
  { name: 'static image, entries out of order', from: 'static', mutate: (f) => (le32(f, V.bmap, 1), le32(f, V.bmap + 4, 0)), expect: opens },
];

describe.skipIf(!enabled)('hostile VDI images', () => {
  it.each(cases.map((c) => [c.name, c] as const))('%s', async (_n, c) => {
    const name = `case-${cases.indexOf(c)}.vdi`;
    copyFileSync(join(tmp.path, `${c.from ?? 'dyn'}.vdi`), join(tmp.path, name));
    c.mutate(join(tmp.path, name));
    await checkImage(tmp.path, name, c, enabled);
  });
});
