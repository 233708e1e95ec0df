/**
 * ESX extents qemu-img reads but cannot make: COWD (ESX 3 vmfsSparse) and seSparse
 * (ESXi 6.5+ snapshots), built here from their layouts, plus vmfs flat descriptors.
 * qimg must read them exactly as qemu-img does (data, info, map), and refuse broken
 * ones the way qemu does.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qimg, tempDir } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-vmdk-esx-');
afterAll(() => tmp.cleanup());
const P = (n: string) => join(tmp.path, n);

/** Deterministic grain content. */
function pattern(seed: number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (seed * 31 + i * 7 + (i >> 9)) & 0xff;
  return b;
}

/** A COWD extent: header, directory at sector 4, 4096-entry tables, grains of `gran` sectors. */
function buildCowd(sectors: number, gran: number, grains: Map<number, Buffer>): Buffer {
  const perGt = 4096 * gran;
  const gdEntries = Math.ceil(sectors / perGt);
  const gdSectors = Math.ceil((gdEntries * 4) / 512);
  const gtSectors = 32;
  const gtStart = 4 + gdSectors;
  let next = gtStart + gdEntries * gtSectors;
  const head = Buffer.alloc(512);
  head.write('COWD', 0, 'latin1');
  head.writeUInt32LE(1, 4);
  head.writeUInt32LE(3, 8);
  head.writeUInt32LE(sectors, 12);
  head.writeUInt32LE(gran, 16);
  head.writeUInt32LE(4, 20);
  head.writeUInt32LE(gdEntries, 24);
  const gd = Buffer.alloc(gdSectors * 512);
  const gts = Buffer.alloc(gdEntries * gtSectors * 512);
  for (let i = 0; i < gdEntries; i++) gd.writeUInt32LE(gtStart + i * gtSectors, i * 4);
  const data: Buffer[] = [];
  for (const [g, buf] of [...grains].sort((a, b) => a[0] - b[0])) {
    gts.writeUInt32LE(next, g * 4);
    data.push(buf);
    next += gran;
  }
  head.writeUInt32LE(next, 28);
  return Buffer.concat([head, Buffer.alloc(3 * 512), gd, gts, ...data]);
}

/** An seSparse extent (4 KiB grains, 4096-entry tables of 64-bit entries). */
function buildSeSparse(sectors: number, grains: Map<number, Buffer | 'zero'>, opts: { dirty?: boolean } = {}): Buffer {
  const gdSectors = 1;
  const tables = Math.ceil(sectors / (4096 * 8));
  const gtOffset = 3;
  const grainsOffset = gtOffset + tables * 64;
  const h = Buffer.alloc(512);
  const u = (i: number, v: bigint) => h.writeBigUInt64LE(v, i * 8);
  u(0, 0xcafebaben);
  u(1, 0x200000001n);
  u(2, BigInt(sectors));
  u(3, 8n);
  u(4, 64n);
  u(10, 1n);
  u(11, 1n);
  u(16, 2n);
  u(17, BigInt(gdSectors));
  u(18, BigInt(gtOffset));
  u(19, BigInt(tables * 64));
  u(24, BigInt(grainsOffset));
  const vol = Buffer.alloc(512);
  vol.writeBigUInt64LE(0xcafecafen, 0);
  if (opts.dirty) vol.writeBigUInt64LE(1n, 24);
  const gd = Buffer.alloc(512);
  for (let i = 0; i < tables; i++) gd.writeBigUInt64LE(0x1000000000000000n | BigInt(i), i * 8);
  const gt = Buffer.alloc(tables * 64 * 512);
  const data: Buffer[] = [];
  let c = 0;
  for (const [g, b] of [...grains].sort((a, b) => a[0] - b[0])) {
    if (b === 'zero') {
      gt.writeBigUInt64LE(0x2000000000000000n, g * 8);
      continue;
    }
    const e = 0x3000000000000000n | (BigInt(c & 0xfff) << 48n) | BigInt(c >> 12);
    gt.writeBigUInt64LE(e, g * 8);
    data.push(b);
    c++;
  }
  return Buffer.concat([h, vol, gd, gt, ...data]);
}

function descriptor(createType: string, lines: string[]): string {
  return `# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\ncreateType="${createType}"\n\n# Extent description\n${lines.join('\n')}\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\n`;
}

function same(file: string): void {
  for (const args of [['info', '--output=json'], ['info'], ['map', '--output=json']]) {
    const q = qemuImg([...args, file], tmp.path);
    const m = qimg([...args, file], { cwd: tmp.path });
    expect(m.status, m.stderr).toBe(q.status);
    const norm = (s: string) => s.replace(/"actual-size": \d+/, '').replace(/disk size: .*/, '').replace(/, "compressed": (true|false)/g, '');
    expect(norm(m.stdout)).toBe(norm(q.stdout));
  }
  const qc = qemuImg(['convert', '-O', 'raw', file, 'q.raw'], tmp.path);
  expect(qc.status, qc.stderr).toBe(0);
  const m = qimg(['convert', '-O', 'raw', file, 'm.raw'], { cwd: tmp.path });
  expect(m.status, m.stderr).toBe(0);
  expect(readFileSync(P('m.raw')).equals(readFileSync(P('q.raw')))).toBe(true);
}

describe.skipIf(!enabled)('ESX extents read as qemu-img reads them', () => {
  it('a bare COWD file has no descriptor (no CID): refused by both', () => {
    writeFileSync(P('cowd.vmdk'), buildCowd(8192, 16, new Map([[0, pattern(1, 8192)]])));
    const q = qemuImg(['info', 'cowd.vmdk'], tmp.path);
    const m = qimg(['info', 'cowd.vmdk'], { cwd: tmp.path });
    expect(q.stderr).toContain('Invalid argument');
    expect(m.status).toBe(1);
    expect(m.stderr).toBe("qimg: Could not open 'cowd.vmdk': Invalid argument\n");
  });

  it('vmfsSparse descriptor with a COWD delta extent', () => {
    writeFileSync(P('delta-delta.vmdk'), buildCowd(16384, 1, new Map([[3, pattern(4, 512)], [4, pattern(5, 512)], [9000, pattern(6, 512)]])));
    writeFileSync(P('delta.vmdk'), descriptor('vmfsSparse', ['RW 16384 VMFSSPARSE "delta-delta.vmdk"']));
    same('delta.vmdk');
  });

  it('seSparse descriptor with allocated, zeroed and unallocated grains', () => {
    const grains = new Map<number, Buffer | 'zero'>([[0, pattern(7, 4096)], [1, 'zero'], [2, pattern(8, 4096)], [1000, pattern(9, 4096)], [4095, pattern(10, 4096)]]);
    writeFileSync(P('se-sesparse.vmdk'), buildSeSparse(65536, grains));
    writeFileSync(P('se.vmdk'), descriptor('seSparse', ['RW 65536 SESPARSE "se-sesparse.vmdk"']));
    same('se.vmdk');
  });

  it('vmfs descriptor with VMFS and FLAT extents, RDONLY lines skipped', () => {
    writeFileSync(P('v-flat.vmdk'), pattern(11, 1 << 20));
    writeFileSync(P('v2-flat.vmdk'), Buffer.concat([Buffer.alloc(4096), pattern(12, 1 << 20)]));
    writeFileSync(P('v.vmdk'), descriptor('vmfs', ['RW 2048 VMFS "v-flat.vmdk"', 'RW 2048 FLAT "v2-flat.vmdk" 8', 'RDONLY 2048 FLAT "v2-flat.vmdk" 0']));
    same('v.vmdk');
  });

  it('dirty seSparse and bad magics are refused like qemu', () => {
    writeFileSync(P('d-sesparse.vmdk'), buildSeSparse(65536, new Map(), { dirty: true }));
    writeFileSync(P('d.vmdk'), descriptor('seSparse', ['RW 65536 SESPARSE "d-sesparse.vmdk"']));
    const q = qemuImg(['info', 'd.vmdk'], tmp.path);
    const m = qimg(['info', 'd.vmdk'], { cwd: tmp.path });
    expect(q.status).toBe(1);
    expect(m.status).toBe(1);
    expect(m.stderr).toContain('Image is dirty, Replaying journal not supported');
    const bad = buildSeSparse(65536, new Map());
    bad.writeBigUInt64LE(0x1234n, 0);
    writeFileSync(P('d-sesparse.vmdk'), bad);
    expect(qimg(['info', 'd.vmdk'], { cwd: tmp.path }).stderr).toContain('Bad const header magic: 0x0000000000001234');
  });

  it('seSparse cannot be written (qemu: read-only)', () => {
    const r = qimg(['convert', '-n', '-O', 'vmdk', 'm.raw', 'se.vmdk'], { cwd: tmp.path });
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('No write support for seSparse images available');
  });
});
