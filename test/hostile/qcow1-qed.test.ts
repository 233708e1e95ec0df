/**
 * Hostile qcow (v1) and qed headers and tables: one clean error line (QEMU's message
 * where it has one), no hang, bounded memory, input untouched; qemu-img agrees on
 * success or failure.
 */
import { afterAll, describe, it } from 'vitest';
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, tempDir, ROOT } from '../helpers/qemu.js';
import { checkImage, patch, setU32, setU8, truncateTo, type Expectation } from './mutate.js';

const withQemu = qemuAvailable();
const tmp = tempDir('qimg-hostile-q1qed-');
afterAll(() => tmp.cleanup());
let n = 0;

function le32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
}
function le64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b;
}

function caseFor(fmt: 'qcow1' | 'qed', src: string, name: string, damage: (f: string) => void, e: Expectation): void {
  it(name, async () => {
    const dir = join(tmp.path, `h${n++}`);
    mkdirSync(dir);
    copyFileSync(join(ROOT, 'fixtures/foreign', fmt, src), join(dir, src));
    damage(join(dir, src));
    await checkImage(dir, src, e, withQemu);
  });
}

const all = (m: string | RegExp): Expectation => ({ expect: { info: m, map: m, convert: m } });
/** header fine (info works), tables or data damaged: map and convert fail */
const readFails = (m: string | RegExp): Expectation => ({ expect: { info: 'ok', map: m, convert: m } });

describe('hostile qed', () => {
  caseFor('qed', 'plain.qed', 'unknown feature bit', (f) => patch(f, 16, le64(0x100n)), all('Unsupported QED features: 100'));
  caseFor('qed', 'plain.qed', 'cluster size not a power of two', (f) => patch(f, 4, le32(65537)), all('QED cluster size is invalid'));
  caseFor('qed', 'plain.qed', 'cluster size 2^31', (f) => patch(f, 4, le32(0x80000000)), all('QED cluster size is invalid'));
  caseFor('qed', 'plain.qed', 'table size 32', (f) => patch(f, 8, le32(32)), all('QED table size is invalid'));
  caseFor('qed', 'plain.qed', 'image size huge', (f) => patch(f, 48, le64(1n << 62n)), all('QED image size is invalid'));
  caseFor('qed', 'plain.qed', 'image size not a sector multiple', (f) => patch(f, 48, le64(1000n)), all('QED image size is invalid'));
  caseFor('qed', 'plain.qed', 'L1 offset past the end', (f) => patch(f, 40, le64(1n << 40n)), all('QED table offset is invalid'));
  caseFor('qed', 'plain.qed', 'L1 offset unaligned', (f) => patch(f, 40, le64(65537n)), all('QED table offset is invalid'));
  caseFor('qed', 'plain.qed', 'truncated file', (f) => truncateTo(f, 200000), all('QED table offset is invalid'));
  caseFor('qed', 'plain.qed', 'header size overflow', (f) => patch(f, 12, le32(0xffffffff)), all(/QED/));
  caseFor(
    'qed',
    'overlay.qed',
    'backing name beyond the header clusters',
    (f) => patch(f, 56, Buffer.concat([le32(60000), le32(9000)])),
    all('QED backing filename offset is invalid'),
  );
  caseFor('qed', 'plain.qed', 'L1 entry past the end of the file', (f) => patch(f, 65536, le64(0x7000000n)), readFails(/L2 table offset/));
  caseFor('qed', 'plain.qed', 'L2 entry past the end of the file', (f) => patch(f, 0x70000, le64(0x10000000n)), readFails(/data cluster offset/));
  caseFor('qed', 'plain.qed', 'L2 entry 2^63', (f) => patch(f, 0x70000, le64(1n << 63n)), readFails(/data cluster offset/));
});

describe('hostile qcow', () => {
  caseFor('qcow1', 'plain.qcow', 'size 1', (f) => patch(f, 24, Buffer.from('0000000000000001', 'hex')), all('Image size is too small'));
  caseFor('qcow1', 'plain.qcow', 'cluster_bits 17', (f) => setU8(f, 32, 17), all('Cluster size must be between 512 and 64k'));
  caseFor('qcow1', 'plain.qcow', 'l2_bits 14', (f) => setU8(f, 33, 14), all('L2 table size must be between 512 and 64k'));
  caseFor('qcow1', 'plain.qcow', 'crypt method 2', (f) => setU32(f, 36, 2), all('invalid encryption method in qcow header'));
  caseFor('qcow1', 'plain.qcow', 'AES: info works, reading needs the key', (f) => setU32(f, 36, 1), readFails("Parameter 'encrypt.key-secret' is required for cipher"));
  caseFor('qcow1', 'plain.qcow', 'size 2^62 (L1 too large)', (f) => patch(f, 24, Buffer.from('4000000000000000', 'hex')), all('Image too large'));
  caseFor('qcow1', 'overlay.qcow', 'backing name too long', (f) => setU32(f, 16, 5000), all('Backing file name too long'));
  caseFor('qcow1', 'plain.qcow', 'L1 past the end of the file reads as unallocated', (f) => patch(f, 40, Buffer.from('0000000100000000', 'hex')), {
    expect: { info: 'ok', map: 'ok', convert: 'ok' },
  });
  caseFor('qcow1', 'plain.qcow', 'unaligned data cluster', (f) => patch(f, 0x1000, Buffer.from('0000000000002001', 'hex')), {
    ...readFails(/unaligned cluster offset/),
    differs: { map: 'qimg validates the L2 entry on lookup; qemu only when reading data' },
  });
});
