/**
 * VDI pieces in-process: header creation and validation (QEMU's order and texts),
 * the write path's allocation and its order on disk (data, then the header's count,
 * then the block map, with barriers between), and the check's counting.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { HostFile } from '../../src/io/host.js';
import { F, newHeader, parseHeader, probeVdi, VDI_DISK_SIZE_MAX, VDI_UNALLOCATED } from '../../src/formats/vdi/header.js';
import { VdiImage } from '../../src/formats/vdi/image.js';
import { readVdiMetadata } from '../../src/formats/vdi/driver.js';
import { checkVdi } from '../../src/formats/vdi/check.js';
import { tempDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const tmp = tempDir('qimg-vdi-unit-');
afterAll(() => tmp.cleanup());

/** A HostFile in memory that records every write and flush, in order. */
class MemFile implements HostFile {
  readonly path = 'mem.vdi';
  readonly writable = true;
  data: Buffer;
  log: string[] = [];
  constructor(initial: Buffer) {
    this.data = Buffer.from(initial);
  }
  get size(): number {
    return this.data.length;
  }
  async read(buf: Buffer, pos: number): Promise<void> {
    buf.fill(0);
    if (pos < this.data.length) this.data.copy(buf, 0, pos, Math.min(this.data.length, pos + buf.length));
  }
  async readBytes(pos: number, length: number): Promise<Buffer> {
    const b = Buffer.alloc(length);
    await this.read(b, pos);
    return b;
  }
  async write(buf: Buffer, pos: number): Promise<void> {
    if (pos + buf.length > this.data.length) this.data = Buffer.concat([this.data, Buffer.alloc(pos + buf.length - this.data.length)]);
    buf.copy(this.data, pos);
    this.log.push(`write ${pos} ${buf.length}`);
  }
  async truncate(length: number): Promise<void> {
    this.data = length <= this.data.length ? this.data.subarray(0, length) : Buffer.concat([this.data, Buffer.alloc(length - this.data.length)]);
  }
  async flush(): Promise<void> {
    this.log.push('flush');
  }
  async allocatedSize(): Promise<number> {
    return this.data.length;
  }
  runAt(_pos: number, length: number) {
    return { data: true, length, eof: false };
  }
  async close(): Promise<void> {}
}

/** A complete image as qemu-img creates it: header and block map. */
function imageBytes(size: number, isStatic = false): Buffer {
  const { header, blocks, bmapBytes } = newHeader(size, isStatic);
  const bmap = Buffer.alloc(bmapBytes);
  for (let i = 0; i < blocks; i++) bmap.writeUInt32LE(isStatic ? i : VDI_UNALLOCATED, i * 4);
  return Buffer.concat([header, bmap]);
}

async function open(bytes: Buffer): Promise<{ img: VdiImage; file: MemFile }> {
  const file = new MemFile(bytes);
  const { header, headerBytes, bmap } = await readVdiMetadata(file);
  return { img: new VdiImage(file, file.path, header, headerBytes, bmap), file };
}

describe('VDI header', () => {
  it('new headers are what QEMU writes and parse back', () => {
    const { header, blocks, bmapBytes } = newHeader(5 * MiB + 512, false);
    expect(blocks).toBe(6);
    expect(bmapBytes).toBe(512);
    expect(header.subarray(0, 0x40).toString('latin1').replace(/\0+$/, '')).toBe('<<< QEMU VM Virtual Disk Image >>>\n');
    expect(header.readUInt32LE(F.headerSize)).toBe(0x180);
    const h = parseHeader(header, 'x');
    expect(h).toMatchObject({ version: 0x10001, imageType: 1, offsetBmap: 512, offsetData: 1024, diskSize: 5 * MiB + 512, blocksInImage: 6, blocksAllocated: 0 });
    expect(parseHeader(newHeader(3 * MiB, true).header, 'x')).toMatchObject({ imageType: 2, blocksAllocated: 3 });
    expect(probeVdi(header)).toBe(100);
    expect(probeVdi(header.subarray(0, 0x44))).toBe(100);
    expect(probeVdi(header.subarray(0, 0x43))).toBe(0);
  });

  it('validates in QEMU order: the size limit comes before the signature', () => {
    const b = Buffer.alloc(512);
    b.writeBigUInt64LE(BigInt(VDI_DISK_SIZE_MAX) + 1n, F.diskSize);
    expect(() => parseHeader(b, 'x')).toThrow('Unsupported VDI image size (size is 0x1fffff8000001, max supported is 0x1fffff8000000)');
    b.writeBigUInt64LE(0n, F.diskSize);
    expect(() => parseHeader(b, 'x')).toThrow('Image not in VDI format (bad signature 00000000)');
  });

  it('rounds odd sizes up to a sector and refuses one that no longer fits', () => {
    const b = newHeader(2 * MiB, false).header;
    b.writeBigUInt64LE(BigInt(MiB + 1), F.diskSize);
    expect(parseHeader(b, 'x').diskSize).toBe(MiB + 512);
    b.writeBigUInt64LE(BigInt(2 * MiB + 1), F.diskSize);
    expect(() => parseHeader(b, 'x')).toThrow('unsupported VDI image (disk size 2097664, image bitmap has room for 2097152)');
  });

  it('makes distinct random UUIDs for the image and its last snapshot', () => {
    const a = newHeader(MiB, false).header;
    const b = newHeader(MiB, false).header;
    expect(a.subarray(F.uuidImage, F.uuidImage + 16)).not.toEqual(b.subarray(F.uuidImage, F.uuidImage + 16));
    expect(a.subarray(F.uuidImage, F.uuidImage + 16)).not.toEqual(a.subarray(F.uuidLastSnap, F.uuidLastSnap + 16));
    expect(a.subarray(F.uuidLink, F.uuidLink + 32)).toEqual(Buffer.alloc(32));
  });
});

describe('VDI writes', () => {
  it('a partial write allocates a whole zero-filled block at the end, then the count, then the map', async () => {
    const { img, file } = await open(imageBytes(4 * MiB));
    file.log = [];
    await img.write(2 * MiB + 100, Buffer.from('hello'));
    expect(file.log).toEqual([`write 1024 ${MiB}`, 'flush', 'write 0 512', 'flush', 'write 512 512']);
    expect(file.data.readUInt32LE(F.blocksAllocated)).toBe(1);
    expect(file.data.readUInt32LE(512 + 2 * 4)).toBe(0);
    const back = Buffer.alloc(MiB);
    await img.read(2 * MiB, back);
    expect(back.subarray(100, 105).toString()).toBe('hello');
    expect(back.subarray(0, 100).equals(Buffer.alloc(100))).toBe(true);
    expect((await img.layerStatus(0, 4 * MiB)).length).toBe(2 * MiB);
    expect(await img.layerStatus(2 * MiB, 2 * MiB)).toMatchObject({ data: true, zero: false, hostOffset: 1024, length: MiB });
    // in place the second time: no metadata
    file.log = [];
    await img.write(2 * MiB, Buffer.alloc(10, 1));
    expect(file.log).toEqual(['write 1024 10']);
  });

  it('whole blocks allocated together go out in one write; under cache=unsafe the metadata waits for close', async () => {
    const { img, file } = await open(imageBytes(4 * MiB));
    img.unsafeCache = true;
    file.log = [];
    await img.write(MiB, Buffer.alloc(2 * MiB, 7));
    expect(file.log).toEqual([`write 1024 ${2 * MiB}`]);
    await img.close();
    expect(file.log.slice(1)).toEqual(['write 0 512', 'write 512 512']);
    const again = await open(file.data);
    const st = await again.img.layerStatus(0, 4 * MiB);
    expect(st).toMatchObject({ data: false, zero: true, length: MiB });
    expect(await again.img.layerStatus(MiB, 3 * MiB)).toMatchObject({ data: true, hostOffset: 1024, length: MiB });
    expect(await again.img.layerStatus(2 * MiB, 2 * MiB)).toMatchObject({ data: true, hostOffset: 1024 + MiB, length: MiB });
  });

  it('zero writes allocate, as QEMU (no zero-write support in its driver); discards change nothing', async () => {
    const { img, file } = await open(imageBytes(2 * MiB));
    await img.discard(0, MiB);
    expect(file.data.readUInt32LE(F.blocksAllocated)).toBe(0);
    await img.writeZeroes(0, 4096);
    expect(file.data.readUInt32LE(F.blocksAllocated)).toBe(1);
  });

  it('refuses to allocate over a block in use when the header undercounts', async () => {
    const bytes = imageBytes(4 * MiB);
    bytes.writeUInt32LE(0, 512 + 4 * 3); // block 3 uses data block 0, the count says 0
    const { img, file } = await open(bytes);
    const before = Buffer.from(file.data);
    await expect(img.write(0, Buffer.alloc(512, 1))).rejects.toThrow('does not cover block 0 in use');
    expect(file.data.equals(before)).toBe(true);
  });

  it('refuses to write through a block map entry past the last block', async () => {
    const bytes = imageBytes(2 * MiB);
    bytes.writeUInt32LE(0xfffffffd, 512);
    const { img, file } = await open(bytes);
    await expect(img.write(0, Buffer.alloc(512, 1))).rejects.toThrow('block map entry of block 0 is out of range (4294967293, 2 blocks)');
    expect(file.size).toBe(bytes.length);
  });

  it('static images write in place', async () => {
    const { img, file } = await open(imageBytes(2 * MiB, true));
    file.log = [];
    await img.write(MiB + 512, Buffer.alloc(512, 9));
    expect(file.log).toEqual([`write ${1024 + MiB + 512} 512`]);
    expect(img.allocationUnit).toBe(512);
  });
});

describe('VDI check', () => {
  it('counts entries out of range, duplicates and the allocated count as QEMU', async () => {
    const bytes = imageBytes(4 * MiB);
    bytes.writeUInt32LE(0, 512);
    bytes.writeUInt32LE(0, 512 + 4);
    bytes.writeUInt32LE(9, 512 + 8);
    bytes.writeUInt32LE(0xfffffffe, 512 + 12);
    bytes.writeUInt32LE(2, F.blocksAllocated);
    const path = join(tmp.path, 'bad.vdi');
    writeFileSync(path, bytes);
    const lines: string[] = [];
    const r = await checkVdi(path, { fix: 0, log: (l) => lines.push(l) });
    expect(lines).toEqual(['ERROR: block index 0 also used by 0', 'ERROR: block index 2 too large, is 9']);
    expect(r.corruptions).toBe(2);
    bytes.writeUInt32LE(3, F.blocksAllocated);
    writeFileSync(path, bytes);
    lines.length = 0;
    expect((await checkVdi(path, { fix: 0, log: (l) => lines.push(l) })).corruptions).toBe(3);
    expect(lines[2]).toBe('ERROR: allocated blocks mismatch, is 2, should be 3');
    await expect(checkVdi(path, { fix: 1, log: () => undefined })).rejects.toMatchObject({ exitCode: 63, message: 'This image format does not support checks' });
  });
});
