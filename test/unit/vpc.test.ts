/** VHD pieces on their own: CHS sizing, checksums, creator rule, sector bitmaps. */
import { describe, expect, it } from 'vitest';
import { calculateGeometry, newDiskSize } from '../../src/formats/vpc/geometry.js';
import { F, bitmapBytes, footerSectors, parseFooter, vhdChecksum } from '../../src/formats/vpc/structs.js';
import { bitRun, setBits } from '../../src/formats/vpc/image.js';
import { makeFooter } from '../../src/formats/vpc/create.js';

describe('vpc geometry', () => {
  it('rounds sizes up to the next CHS size, as qemu-img create', () => {
    // observed with qemu-img 7.2
    expect(newDiskSize(104857600, false)?.totalSize).toBe(104865792);
    expect(newDiskSize(1500160, false)?.totalSize).toBe(1531904);
    expect(newDiskSize(512, false)?.totalSize).toBe(34816);
    expect(newDiskSize(0, false)?.totalSize).toBe(0);
    expect(newDiskSize(136365211648, false)?.totalSize).toBe(136365219840);
  });
  it('keeps sizes beyond CHS and force_size sizes exact, up to 2040 GiB', () => {
    expect(newDiskSize(200 * 2 ** 30, false)).toEqual({ geometry: { cylinders: 65535, heads: 16, sectorsPerTrack: 255 }, totalSize: 200 * 2 ** 30 });
    expect(newDiskSize(1500160, true)?.totalSize).toBe(1500160);
    expect(newDiskSize(2040 * 2 ** 30, true)?.totalSize).toBe(2040 * 2 ** 30);
    expect(newDiskSize(2040 * 2 ** 30 + 512, true)).toBeNull();
    expect(newDiskSize(2041 * 2 ** 30, false)).toBeNull();
  });
  it('uses 255 sectors per track from 65535*16*63 sectors on (the spec, as qemu 7.2)', () => {
    expect(calculateGeometry(65535 * 16 * 63)).toEqual({ cylinders: 16191, heads: 16, sectorsPerTrack: 255 });
    expect(calculateGeometry(65535 * 16 * 63 - 1).sectorsPerTrack).toBe(63);
  });
});

describe('vpc footer', () => {
  it('checksums as the one complement of the byte sum', () => {
    const f = makeFooter(104865792, calculateGeometry(204816), 3, false);
    expect(vhdChecksum(f, F.checksum)).toBe(f.readUInt32BE(F.checksum));
    f[100] ^= 1;
    expect(vhdChecksum(f, F.checksum)).not.toBe(f.readUInt32BE(F.checksum));
  });
  it('trusts current_size only for the creators qemu 7.2 trusts, or at the maximum geometry', () => {
    const size = (app: Buffer, maxGeometry = false) => {
      const f = makeFooter(1048576, maxGeometry ? { cylinders: 65535, heads: 16, sectorsPerTrack: 255 } : { cylinders: 100, heads: 4, sectorsPerTrack: 17 }, 3, false);
      app.copy(f, F.creatorApp);
      return Number(footerSectors(parseFooter(f))) * 512;
    };
    for (const app of ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0']) expect(size(Buffer.from(app, 'latin1')), app).toBe(1048576);
    for (const app of ['vpc ', 'qemu', 'wa\0\0', 'tap ', 'vs  ']) expect(size(Buffer.from(app, 'latin1')), app).toBe(100 * 4 * 17 * 512);
    expect(size(Buffer.from('qemu'), true)).toBe(1048576);
  });
  it('sizes bitmaps as qemu (none below 4 KiB blocks)', () => {
    expect(bitmapBytes(2 * 1024 * 1024)).toBe(512);
    expect(bitmapBytes(4096)).toBe(512);
    expect(bitmapBytes(2048)).toBe(0);
    expect(bitmapBytes(2 ** 31)).toBe(2 ** 31 / 4096);
  });
});

describe('vpc sector bitmaps', () => {
  it('finds runs MSB first and sets bits', () => {
    const b = Buffer.alloc(64);
    expect(setBits(b, 3, 20)).toBe(true);
    expect(setBits(b, 3, 20)).toBe(false);
    expect(b[0]).toBe(0x1f);
    expect(bitRun(b, 0, 512)).toEqual({ set: false, first: 0, count: 3 });
    expect(bitRun(b, 3, 512)).toEqual({ set: true, first: 3, count: 20 });
    expect(bitRun(b, 23, 512)).toEqual({ set: false, first: 23, count: 512 - 23 });
    expect(bitRun(b, 10, 16)).toEqual({ set: true, first: 10, count: 6 });
  });
});
