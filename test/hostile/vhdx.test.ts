/**
 * Hostile VHDX images: each case mutates a copy of a qemu-made image (checksums
 * resealed where the case is about a field, not a checksum) and runs info, map and
 * convert with qimg and qemu-img (mutate.ts: one clean error line or success, the
 * input untouched, the same outcome as qemu-img unless a reason says why not).
 */
import { afterAll, beforeAll, describe, it } from 'vitest';
import { copyFileSync, mkdtempSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { checkImage, patch, readAt, truncateTo, type Cmd, type Expectation } from './mutate.js';
import { sealChecksum } from '../../src/formats/vhdx/crc32c.js';
import { buildLogEntry } from '../../src/formats/vhdx/log.js';
import { newGuid, parseHeader, serializeHeader } from '../../src/formats/vhdx/format.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-hostile-vhdx-');
afterAll(() => tmp.cleanup());
const T = (name: string) => join(tmp.path, name);

// Layout of the template (qemu's, 1 MiB blocks, 16 MiB): headers at 64K/128K, region
// tables at 192K/256K, log at 1M, BAT at 2M, metadata at 3M, data from 8M.
const H1 = 64 * 1024;
const H2 = 128 * 1024;
const RT1 = 192 * 1024;
const RT2 = 256 * 1024;
const BAT = 2 * 1024 * 1024;
const MD = 3 * 1024 * 1024;

beforeAll(() => {
  if (!enabled) return;
  ok(qemuImg(['create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', 'base.vhdx', '16M'], tmp.path));
  ok(qemuIo(['-c', 'write -P 0xab 0 64k', '-c', 'write -P 0xcd 5M 1M', 'base.vhdx'], tmp.path));
});

const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
};
const u64 = (v: bigint | number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt.asUintN(64, BigInt(v)));
  return b;
};
/** The current header (the one with the higher sequence number). */
function currentAt(f: string): number {
  const a = parseHeader(readAt(f, H1, 4096))!;
  const b = parseHeader(readAt(f, H2, 4096))!;
  return a.sequenceNumber > b.sequenceNumber ? H1 : H2;
}
/** Patches both headers and reseals their checksums. */
function patchHeaders(f: string, at: number, bytes: Buffer): void {
  for (const h of [H1, H2]) {
    patch(f, h + at, bytes);
    const b = readAt(f, h, 4096);
    sealChecksum(b);
    patch(f, h, b);
  }
}
/** Patches both region tables and reseals them. */
function patchRegions(f: string, at: number, bytes: Buffer): void {
  for (const r of [RT1, RT2]) {
    patch(f, r + at, bytes);
    const b = readAt(f, r, 65536);
    sealChecksum(b);
    patch(f, r, b);
  }
}
/** Metadata item `i`'s data offset (template order: params, size, page83, logical, physical). */
function itemAt(f: string, i: number): number {
  return MD + readAt(f, MD + 32 + i * 32 + 16, 4).readUInt32LE(0);
}
/** A log entry writing `sector` at `target`, with the log GUID set in the current header. */
function dirtyLog(f: string, target: number, sector = Buffer.alloc(4096, 0xee)): void {
  const guid = newGuid();
  const entry = buildLogEntry({ guid, sequenceNumber: 3n, tail: 0, flushedFileOffset: 0, lastFileOffset: 0, writes: [{ fileOffset: target, data: sector }] });
  patch(f, 1024 * 1024, entry);
  const at = currentAt(f);
  const h = parseHeader(readAt(f, at, 4096))!;
  patch(f, at, serializeHeader({ ...h, logGuid: guid }));
}

/** open fails: info and convert (map fails at the same open) */
const fails = (msg: string | RegExp): Partial<Record<Cmd, string | RegExp>> => ({ info: msg, convert: msg });
const opens = { info: 'ok', map: 'ok', convert: 'ok' } as const;

interface Case extends Expectation {
  name: string;
  mutate: (file: string) => void;
}

const cases: Case[] = [
  // --- file identifier and headers
  { name: 'signature changed: probed as raw', mutate: (f) => patch(f, 0, Buffer.from('vhdxfilf')), expect: opens },
  { name: 'signature changed, -f vhdx', format: 'vhdx', mutate: (f) => patch(f, 0, Buffer.from('VHDXFILE')), expect: fails('Image not in VHDX format') },
  { name: 'current header checksum bad: the other header is used', mutate: (f) => patch(f, currentAt(f) + 200, Buffer.from([1])), expect: opens },
  {
    name: 'both headers damaged',
    mutate: (f) => {
      patch(f, H1 + 4, u32(1));
      patch(f, H2 + 4, u32(1));
    },
    expect: fails('No valid VHDX header found'),
  },
  {
    name: 'equal sequence numbers, different headers',
    mutate: (f) => {
      patchHeaders(f, 8, u64(5));
      patch(f, H1 + 100, Buffer.from([9]));
      const b = readAt(f, H1, 4096);
      sealChecksum(b);
      patch(f, H1, b);
    },
    expect: fails('No valid VHDX header found'),
  },
  { name: 'header version 2', mutate: (f) => patchHeaders(f, 66, Buffer.from([2, 0])), expect: fails('No valid VHDX header found') },
  { name: 'log offset 0', mutate: (f) => patchHeaders(f, 72, u64(0)), expect: fails('Invalid VHDX log offset 0') },
  { name: 'log offset not 1 MiB aligned', mutate: (f) => patchHeaders(f, 72, u64(1024 * 1024 + 4096)), expect: fails(/Invalid VHDX log offset/) },
  {
    name: 'log offset 2^63',
    mutate: (f) => patchHeaders(f, 72, u64(1n << 63n)),
    expect: fails(/Invalid VHDX log offset/),
    differs: { info: 'offsets of 2^53 or more are refused; qemu ignores an empty log', map: 'same', convert: 'same' },
  },
  { name: 'log version 1', mutate: (f) => patchHeaders(f, 64, Buffer.from([1, 0])), expect: fails('Unsupported VHDX log version 1') },
  {
    name: 'log length not a multiple of 1 MiB (with a log GUID)',
    mutate: (f) => {
      patchHeaders(f, 48, newGuid());
      patchHeaders(f, 68, u32(1000));
    },
    expect: fails('Invalid VHDX log length 1000'),
  },
  { name: 'log GUID set, log empty: nothing to replay', mutate: (f) => patchHeaders(f, 48, newGuid()), expect: opens },
  {
    name: 'log GUID set, log length 4 GiB - 1 MiB past the end of the file: bounded scan',
    mutate: (f) => {
      patchHeaders(f, 48, newGuid());
      patchHeaders(f, 68, u32(4095 * 1024 * 1024));
    },
    // the log region then overlaps the BAT: qemu refuses the region table
    expect: fails(/overlaps with region/),
  },

  // --- the log
  { name: 'a valid log entry: read-only opens refuse it', mutate: (f) => dirtyLog(f, BAT), expect: fails('contains a log that needs to be replayed') },
  {
    name: 'a log entry with a bad checksum is no log',
    mutate: (f) => {
      dirtyLog(f, BAT);
      patch(f, 1024 * 1024 + 4096 + 100, Buffer.from([0x55]));
    },
    expect: opens,
  },
  {
    name: 'a log entry for another log GUID is no log',
    mutate: (f) => {
      dirtyLog(f, BAT);
      patchHeaders(f, 48, newGuid());
    },
    expect: opens,
  },

  // --- region table
  {
    name: 'both region tables damaged',
    mutate: (f) => {
      patch(f, RT1 + 100, Buffer.from([1]));
      patch(f, RT2 + 100, Buffer.from([1]));
    },
    expect: fails('No valid VHDX region table found'),
  },
  {
    name: 'first region table damaged: the second copy is used',
    mutate: (f) => patch(f, RT1 + 100, Buffer.from([1])),
    expect: opens,
    differs: { info: 'qemu reads only the first copy', map: 'qemu reads only the first copy', convert: 'qemu reads only the first copy' },
  },
  { name: 'region entry count 2048', mutate: (f) => patchRegions(f, 8, u32(2048)), expect: fails('No valid VHDX region table found') },
  { name: 'region entry count 0', mutate: (f) => patchRegions(f, 8, u32(0)), expect: fails('VHDX region table has no BAT region') },
  { name: 'BAT region overlapping the metadata region', mutate: (f) => patchRegions(f, 16 + 16, u64(MD)), expect: fails(/overlaps with region/) },
  { name: 'BAT region overlapping the log', mutate: (f) => patchRegions(f, 16 + 16, u64(1024 * 1024)), expect: fails(/overlaps with region/) },
  {
    name: 'BAT region beyond the end of the file',
    mutate: (f) => patchRegions(f, 16 + 16, u64(1024 * 1024 * 1024)),
    expect: fails(/lies outside the file/),
    differs: { info: 'qemu reads the BAT past EOF as zeros', map: 'qemu reads the BAT past EOF as zeros', convert: 'qemu reads the BAT past EOF as zeros' },
  },
  { name: 'BAT region length 0', mutate: (f) => patchRegions(f, 16 + 24, u32(0)), expect: fails(/region .* is invalid/), differs: { info: 'qemu accepts a BAT region too small', map: 'same', convert: 'same' }, noQemu: true },
  {
    name: 'an unknown required region',
    mutate: (f) => {
      patchRegions(f, 8, u32(3));
      patchRegions(f, 16 + 64, Buffer.concat([newGuid(), u64(5 * 1024 * 1024), u32(1024 * 1024), u32(1)]));
    },
    expect: fails('VHDX region table has a required region qimg does not know'),
  },

  // --- metadata
  { name: 'metadata signature damaged', mutate: (f) => patch(f, MD, Buffer.from('METADATA')), expect: fails('Invalid VHDX metadata table') },
  { name: 'metadata entry count 0xffff', mutate: (f) => patch(f, MD + 10, Buffer.from([0xff, 0xff])), expect: fails('Invalid VHDX metadata table') },
  { name: 'metadata entry count 0', mutate: (f) => patch(f, MD + 10, Buffer.from([0, 0])), expect: fails(/VHDX metadata has no file parameters item/) },
  {
    name: 'file parameters item offset beyond the metadata region',
    mutate: (f) => patch(f, MD + 32 + 16, u32(0xffffff00)),
    expect: fails(/lies outside the metadata region/),
  },
  { name: 'file parameters item length 2^32-1', mutate: (f) => patch(f, MD + 32 + 20, u32(0xffffffff)), expect: fails(/lies outside the metadata region/), noQemu: true },
  { name: 'block size 3 MiB', mutate: (f) => patch(f, itemAt(f, 0), u32(3 * 1024 * 1024)), expect: fails('Invalid VHDX block size 3145728') },
  { name: 'block size 512 KiB', mutate: (f) => patch(f, itemAt(f, 0), u32(512 * 1024)), expect: fails(/Invalid VHDX block size/) },
  { name: 'block size 512 MiB', mutate: (f) => patch(f, itemAt(f, 0), u32(512 * 1024 * 1024)), expect: fails(/Invalid VHDX block size/) },
  { name: 'logical sector size 1024', mutate: (f) => patch(f, itemAt(f, 3), u32(1024)), expect: fails('Invalid VHDX logical sector size 1024') },
  { name: 'virtual size 2^62', mutate: (f) => patch(f, itemAt(f, 1), u64(1n << 62n)), expect: fails(/Invalid VHDX virtual disk size/) },
  { name: 'virtual size not a multiple of the sector size', mutate: (f) => patch(f, itemAt(f, 1), u64(16 * 1024 * 1024 + 100)), expect: fails(/Invalid VHDX virtual disk size/), noQemu: true },
  { name: 'virtual size 1 TiB: BAT region too small', mutate: (f) => patch(f, itemAt(f, 1), u64(1n << 40n)), expect: fails(/BAT region .* is too small/) },
  { name: 'HasParent without a parent locator', mutate: (f) => patch(f, itemAt(f, 0) + 4, u32(2)), expect: fails('VHDX differencing image has no parent locator') },
  {
    name: 'an unknown required metadata item',
    mutate: (f) => patch(f, MD + 32, newGuid()),
    expect: fails('VHDX metadata has a required item qimg does not know'),
  },

  // --- BAT entries
  { name: 'BAT entry past the end of the file', mutate: (f) => patch(f, BAT, u64((1000n << 20n) | 6n)), expect: fails(/VHDX BAT entry 0 start offset 1048576000 points after end of file/) },
  { name: 'BAT entry with FileOffsetMB 2^44-1', mutate: (f) => patch(f, BAT, u64(((1n << 44n) - 1n) << 20n | 6n)), expect: fails(/VHDX BAT entry 0 offset overflow/), noQemu: true },
  { name: 'BAT entry pointing into the BAT', mutate: (f) => patch(f, BAT, u64((2n << 20n) | 6n)), expect: fails(/overlaps with region/) },
  {
    name: 'BAT entry pointing into the header section',
    mutate: (f) => patch(f, BAT, u64(6n)),
    expect: fails(/overlaps with region 0-1048576/),
    differs: { info: 'qemu reads a block at offset 0 (the file header)', map: 'same', convert: 'same' },
  },
  { name: 'payload state 7 (partially present) in a dynamic image: reads fail', mutate: (f) => patch(f, BAT + 8, u64(7)), expect: { info: 'ok', map: 'ok', convert: /Input\/output error/ } },
  { name: 'payload state 4 (reserved): reads fail', mutate: (f) => patch(f, BAT + 8, u64(4)), expect: { info: 'ok', map: 'ok', convert: /Input\/output error/ } },
  { name: 'payload state 3 (unmapped) and 5 (v0.95 unmapped) read as zeros', mutate: (f) => patch(f, BAT, Buffer.concat([u64(3), u64(5)])), expect: opens },

  // --- truncation
  { name: 'truncated to 5 MiB', mutate: (f) => truncateTo(f, 5 * 1024 * 1024), expect: fails(/points after end of file/) },
  { name: 'truncated to 1.5 MiB', mutate: (f) => truncateTo(f, 1536 * 1024), expect: fails(/lies outside the file/) },
  { name: 'truncated to 100 KiB', mutate: (f) => truncateTo(f, 100 * 1024), expect: fails(/No valid VHDX header found|region table/) },
  { name: 'truncated to 8 bytes', mutate: (f) => truncateTo(f, 8), expect: fails('No valid VHDX header found') },
];

describe.skipIf(!enabled).concurrent('hostile vhdx images', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const dir = mkdtempSync(join(tmp.path, 'case-'));
      copyFileSync(T('base.vhdx'), join(dir, 'image.vhdx'));
      c.mutate(join(dir, 'image.vhdx'));
      await checkImage(dir, 'image.vhdx', c, true);
    });
  }
});
