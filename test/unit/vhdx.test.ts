/** VHDX building blocks: CRC-32C, GUIDs, geometry (qemu's BAT sizing), create options, log entries. */
import { afterAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import { crc32c, checksumValid, sealChecksum } from '../../src/formats/vhdx/crc32c.js';
import { MiB, geometry, guidFromString, guidToString, parseHeader, serializeHeader, ZERO_GUID, newGuid, setBatEntry, batOffset, batState } from '../../src/formats/vhdx/format.js';
import { vhdxSpecFromOptions } from '../../src/formats/vhdx/create.js';
import { buildLogEntry, findActiveSequence } from '../../src/formats/vhdx/log.js';
import { parseParentLocator, serializeParentLocator, parentCandidates } from '../../src/formats/vhdx/parent.js';
import { ImageFile } from '../../src/io/file.js';
import { tempDir } from '../helpers/qemu.js';

const tmp = tempDir('qimg-vhdx-unit-');
afterAll(() => tmp.cleanup());

describe('vhdx structures', () => {
  it('CRC-32C matches the standard check value and seals structures', () => {
    expect(crc32c(Buffer.from('123456789'))).toBe(0xe3069283);
    expect(crc32c(Buffer.alloc(32))).toBe(0x8a9136aa);
    const b = Buffer.alloc(4096, 7);
    sealChecksum(b);
    expect(checksumValid(b)).toBe(true);
    b[100] ^= 1;
    expect(checksumValid(b)).toBe(false);
  });

  it('GUIDs: text <-> MS byte order', () => {
    const g = guidFromString('{2DC27766-F623-4200-9D64-115E9BFD4A08}')!;
    expect(g.toString('hex')).toBe('6677c22d23f600429d64115e9bfd4a08');
    expect(guidToString(g)).toBe('{2DC27766-F623-4200-9D64-115E9BFD4A08}');
    expect(guidFromString('nonsense')).toBeUndefined();
  });

  it('headers round-trip with their checksum', () => {
    const h = { sequenceNumber: 42n, fileWriteGuid: newGuid(), dataWriteGuid: newGuid(), logGuid: ZERO_GUID, logVersion: 0, version: 1, logLength: MiB, logOffset: MiB };
    const raw = serializeHeader(h);
    expect(parseHeader(raw)).toEqual(h);
    raw[300] = 1;
    expect(parseHeader(raw)).toBeUndefined();
  });

  it('BAT entries: state and FileOffsetMB', () => {
    const bat = Buffer.alloc(16);
    setBatEntry(bat, 1, 6, 5000 * MiB);
    expect(batState(bat, 1)).toBe(6);
    expect(batOffset(bat, 1)).toBe(5000 * MiB);
    expect(batState(bat, 0)).toBe(0);
  });

  it('geometry: chunk ratio and BAT entries as qemu counts them', () => {
    const g = geometry(100 * MiB, 8 * MiB, 512, false);
    expect(g.chunkRatio).toBe(512);
    expect(g.batEntries).toBe(13);
    // 4 GiB + one block: one sector bitmap entry interleaved
    expect(geometry(4096 * MiB + 8 * MiB, 8 * MiB, 512, false).batEntries).toBe(514);
    // an empty disk: qemu's uint32 arithmetic
    expect(geometry(0, 8 * MiB, 512, false).batEntries).toBe(8388607);
    expect(geometry(8 * MiB, MiB, 512, true).batEntries).toBe(4097);
  });

  it('create options: qemu\'s auto block size, rounding and refusals', () => {
    const spec = (size: number, o: Record<string, unknown> = {}) => vhdxSpecFromOptions(size, new Map(Object.entries(o) as Array<[string, bigint | string | boolean]>));
    expect(spec(100 * MiB).blockSize).toBe(8 * MiB);
    expect(spec(2048 * MiB).blockSize).toBe(16 * MiB);
    expect(spec(200 * 1024 * MiB).blockSize).toBe(32 * MiB);
    expect(spec(33 * 1024 * 1024 * MiB).blockSize).toBe(64 * MiB);
    expect(spec(MiB, { block_size: 1572864n }).blockSize).toBe(2 * MiB);
    expect(spec(MiB, { block_size: 512n * BigInt(MiB) }).blockSize).toBe(256 * MiB);
    expect(spec(MiB, { log_size: 1000n }).logSize).toBe(MiB);
    expect(() => spec(MiB, { block_size: 3n * BigInt(MiB) })).toThrow('Block size must be a power of two');
    expect(() => spec(MiB, { log_size: 0n })).toThrow('Log size must be a multiple of 1 MB');
    expect(() => spec(65 * 1024 * 1024 * MiB)).toThrow('Image size too large; max of 64TB');
    expect(spec(MiB).zeroBlocks).toBe(true);
    expect(spec(MiB, { block_state_zero: false, subformat: 'fixed' })).toMatchObject({ zeroBlocks: false, fixed: true });
  });

  it('parent locators: parse, validate, candidates', () => {
    const item = serializeParentLocator([
      ['parent_linkage', '{2DC27766-F623-4200-9D64-115E9BFD4A08}'],
      ['relative_path', '..\\base\\parent.vhdx'],
      ['absolute_win32_path', 'C:\\x\\parent.vhdx'],
    ]);
    const loc = parseParentLocator(item, 'c.avhdx');
    expect(guidToString(loc.linkage)).toBe('{2DC27766-F623-4200-9D64-115E9BFD4A08}');
    expect(parentCandidates(loc)).toEqual(['../base/parent.vhdx', 'parent.vhdx']);
    const bad = Buffer.from(item);
    bad.writeUInt32LE(0xffff, 20); // first key offset outside the item
    expect(() => parseParentLocator(bad, 'c.avhdx')).toThrow(/outside the locator/);
    expect(() => parseParentLocator(serializeParentLocator([['relative_path', 'x']]), 'c.avhdx')).toThrow(/parent_linkage/);
  });

  it('log entries: built, found as the active sequence, checksum enforced', async () => {
    const path = join(tmp.path, 'log.bin');
    const guid = newGuid();
    const data = Buffer.alloc(4096, 0x5a);
    data.write('lead', 0);
    data.write('tail', 4092);
    const e1 = buildLogEntry({ guid, sequenceNumber: 9n, tail: 0, flushedFileOffset: 0, lastFileOffset: 0, writes: [{ fileOffset: 3 * MiB, data }] });
    const e2 = buildLogEntry({ guid, sequenceNumber: 10n, tail: 0, flushedFileOffset: 0, lastFileOffset: 0, writes: [{ fileOffset: 3 * MiB + 4096, data }] });
    const file = Buffer.alloc(2 * MiB);
    e1.copy(file, MiB);
    e2.copy(file, MiB + e1.length);
    writeFileSync(path, file);
    const f = await ImageFile.open(path);
    try {
      const seq = await findActiveSequence(f, { offset: MiB, length: MiB, guid });
      expect(seq.map((e) => e.sequenceNumber)).toEqual([9n, 10n]);
      expect(seq[0].descriptors[0].data!.equals(data)).toBe(true);
      expect(await findActiveSequence(f, { offset: MiB, length: MiB, guid: newGuid() })).toEqual([]);
    } finally {
      await f.close();
    }
    file[MiB + 5000] ^= 1; // damages entry 1's data sector: only entry 2 remains
    writeFileSync(path, file);
    const g = await ImageFile.open(path);
    try {
      expect((await findActiveSequence(g, { offset: MiB, length: MiB, guid })).map((e) => e.sequenceNumber)).toEqual([10n]);
    } finally {
      await g.close();
    }
  });
});
