/**
 * Hostile qcow2 tables: L1/L2 entries (standard, extended, compressed), refcount
 * entries and the snapshot table, each mutated in a copy of a valid image made by
 * qemu-img/qemu-io; plus memory bounds for the largest tables qemu's limits allow.
 * See mutate.ts for what every run must hold.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import {
  H,
  checkImage,
  getU32,
  getU64,
  l2Offset,
  patch,
  setU16,
  setU32,
  setU64,
  truncateTo,
  type Cmd,
  type Expectation,
} from './mutate.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-hostile-tbl-');
afterAll(() => tmp.cleanup());
const T = (name: string) => join(tmp.path, name);

beforeAll(() => {
  if (!enabled) return;
  const d = tmp.path;
  const create = (name: string, ...opts: string[]) => ok(qemuImg(['create', '-q', '-f', 'qcow2', ...opts, name, '64M'], d));
  const io = (name: string, ...cmds: string[]) => ok(qemuIo([...cmds.flatMap((c) => ['-c', c]), name], d));
  create('base.qcow2');
  io('base.qcow2', 'write -P 0xab 0 128k', 'write -P 0xcd 1M 64k');
  create('v2.qcow2', '-o', 'compat=0.10');
  io('v2.qcow2', 'write -P 0xab 0 128k');
  create('zlib.qcow2');
  io('zlib.qcow2', 'write -c -P 0xab 0 64k', 'write -c -P 0xcd 64k 64k');
  create('zstd.qcow2', '-o', 'compression_type=zstd');
  io('zstd.qcow2', 'write -c -P 0xab 0 64k', 'write -c -P 0xcd 64k 64k');
  create('extl2.qcow2', '-o', 'extended_l2=on');
  io('extl2.qcow2', 'write -P 0xab 0 128k', 'write -P 0x11 1M 4k');
  create('extl2-zlib.qcow2', '-o', 'extended_l2=on');
  io('extl2-zlib.qcow2', 'write -c -P 0xab 0 64k');
  create('snapshots.qcow2');
  io('snapshots.qcow2', 'write -P 0xab 0 64k');
  ok(qemuImg(['snapshot', '-c', 's1', 'snapshots.qcow2'], d));
  ok(qemuImg(['snapshot', '-c', 'snap2', 'snapshots.qcow2'], d));
});

type Template = 'base' | 'v2' | 'zlib' | 'zstd' | 'extl2' | 'extl2-zlib' | 'snapshots';

interface Case extends Expectation {
  name: string;
  from: Template;
  mutate: (file: string) => void;
}

const L2 = (f: string, i: number) => l2Offset(f) + 8 * i;
const L2X = (f: string, i: number) => l2Offset(f) + 16 * i;
const L1 = (f: string) => Number(getU64(f, H.l1Offset));
const entry = (f: string, at: number) => getU64(f, at);
/** Offset of snapshot table entry `i` (entries are variable-length, padded to 8). */
function snapshotEntry(f: string, i: number): number {
  let pos = Number(getU64(f, H.snapshotsOffset));
  for (let k = 0; k < i; k++) {
    const idLen = getU32(f, pos + 12) >>> 16;
    const nameLen = getU32(f, pos + 12) & 0xffff;
    const extra = getU32(f, pos + 36);
    pos += 40 + extra + idLen + nameLen;
    pos = Math.ceil(pos / 8) * 8;
  }
  return pos;
}

/** info works (it reads no tables); the reads fail with `msg` (as qemu's). */
const readsFail = (msg: string | RegExp): Partial<Record<Cmd, string | RegExp>> => ({ info: 'ok', map: msg, convert: msg });
/** map works (it reads no compressed data); convert fails with `msg`. */
const convertFails = (msg: string | RegExp): Partial<Record<Cmd, string | RegExp>> => ({ info: 'ok', map: 'ok', convert: msg });
const opens = { info: 'ok', map: 'ok', convert: 'ok' } as const;
const fails = (msg: string | RegExp): Partial<Record<Cmd, string | RegExp>> => ({ info: msg, map: msg, convert: msg });

const BEYOND_2_53 = 'host offsets of 2^53 or more are refused; qemu reads zeros past EOF there';
const EXTL2_COMPRESSED = 'the spec reserves the bitmap of a compressed extended entry (must be 0); qemu 7.2 ignores it';

const cases: Case[] = [
  // --- L1 entries
  {
    name: 'L1 entry unaligned',
    from: 'base',
    mutate: (f) => setU64(f, L1(f), entry(f, L1(f)) + 0x200n),
    expect: readsFail('Image is corrupt: L2 table offset 0x40200 unaligned (L1 index: 0)'),
  },
  {
    name: 'L1 entry with every reserved bit set (ignored)',
    from: 'base',
    mutate: (f) => setU64(f, L1(f), entry(f, L1(f)) | 0x7f000000000001ffn),
    expect: opens,
  },
  { name: 'L1 entry past EOF (reads zeros)', from: 'base', mutate: (f) => setU64(f, L1(f), 0x8000000001000000n), expect: opens },
  {
    name: 'L1 entry at 2^53',
    from: 'base',
    mutate: (f) => setU64(f, L1(f), 0x8020000000000000n),
    expect: readsFail('is beyond 2^53'),
    differs: { map: BEYOND_2_53, convert: BEYOND_2_53 },
  },
  {
    name: 'L1 entry at the largest unaligned offset',
    from: 'base',
    mutate: (f) => setU64(f, L1(f), 0x80fffffffffffe00n),
    expect: readsFail('L2 table offset 0xfffffffffffe00 unaligned (L1 index: 0)'),
  },

  // --- standard L2 entries
  {
    name: 'L2 entry unaligned',
    from: 'base',
    mutate: (f) => setU64(f, L2(f, 0), entry(f, L2(f, 0)) + 0x200n),
    expect: readsFail('Image is corrupt: Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0)'),
  },
  {
    name: 'L2 entry unaligned at index 16',
    from: 'base',
    mutate: (f) => setU64(f, L2(f, 16), entry(f, L2(f, 16)) + 0x200n),
    expect: readsFail('Cluster allocation offset 0x70200 unaligned (L2 offset: 0x40000, L2 index: 0x10)'),
  },
  {
    name: 'L2 entry at the largest unaligned offset',
    from: 'base',
    mutate: (f) => setU64(f, L2(f, 0), 0x80fffffffffffe00n),
    expect: readsFail('Cluster allocation offset 0xfffffffffffe00 unaligned (L2 offset: 0x40000, L2 index: 0)'),
  },
  {
    name: 'L2 entry at 2^53',
    from: 'base',
    mutate: (f) => setU64(f, L2(f, 0), 0x8020000000000000n),
    expect: readsFail('cluster offset 0x20000000000000 is beyond 2^53'),
    differs: { map: BEYOND_2_53, convert: BEYOND_2_53 },
  },
  { name: 'L2 entry past EOF (reads zeros)', from: 'base', mutate: (f) => setU64(f, L2(f, 0), 0x8000000001000000n), expect: opens },
  {
    name: 'L2 entry with every reserved bit set (ignored)',
    from: 'base',
    mutate: (f) => setU64(f, L2(f, 0), entry(f, L2(f, 0)) | 0x3f000000000001fen),
    expect: opens,
  },
  { name: 'L2 entry: offset 0 with COPIED (unallocated)', from: 'base', mutate: (f) => setU64(f, L2(f, 0), 0x8000000000000000n), expect: opens },
  {
    name: 'zero flag on an unaligned offset',
    from: 'base',
    mutate: (f) => setU64(f, L2(f, 0), entry(f, L2(f, 0)) + 0x201n),
    expect: readsFail('Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0)'),
  },
  {
    name: 'v2 image with the zero flag on a data cluster',
    from: 'v2',
    mutate: (f) => setU64(f, L2(f, 0), entry(f, L2(f, 0)) | 1n),
    expect: readsFail('Zero cluster entry found in pre-v3 image (L2 offset: 0x40000, L2 index: 0)'),
  },
  {
    name: 'v2 image with the zero flag on an unallocated cluster',
    from: 'v2',
    mutate: (f) => setU64(f, L2(f, 2), 1n),
    expect: readsFail('Zero cluster entry found in pre-v3 image (L2 offset: 0x40000, L2 index: 0x2)'),
  },

  // --- compressed entries
  {
    name: 'compressed entry pointing past EOF',
    from: 'zlib',
    mutate: (f) => setU64(f, L2(f, 0), 0x4000000001000000n),
    expect: convertFails('error while reading at byte 0'),
  },
  {
    name: 'compressed entry pointing at garbage (the L1 table)',
    from: 'zlib',
    mutate: (f) => setU64(f, L2(f, 0), 0x4000000000000000n | BigInt(L1(f))),
    expect: convertFails('error while reading at byte 0'),
  },
  {
    name: 'compressed entry pointing at the header',
    from: 'zlib',
    mutate: (f) => setU64(f, L2(f, 0), 0x4000000000000000n),
    expect: convertFails('error while reading at byte 0'),
  },
  {
    name: 'second compressed cluster pointing at garbage',
    from: 'zlib',
    mutate: (f) => setU64(f, L2(f, 1), 0x4000000000000000n | BigInt(L1(f))),
    expect: convertFails('error while reading at byte 65536'),
  },
  {
    name: 'compressed entry with an offset of 2^54-1',
    from: 'zlib',
    mutate: (f) => setU64(f, L2(f, 0), 0x403fffffffffffffn),
    expect: convertFails('error while reading at byte 0'),
  },
  {
    name: 'compressed entry with the largest sector count (reads past the data)',
    from: 'zlib',
    mutate: (f) => setU64(f, L2(f, 0), entry(f, L2(f, 0)) | (0xffn << 54n)),
    expect: opens,
  },
  {
    name: 'zstd compressed entry pointing at garbage',
    from: 'zstd',
    mutate: (f) => setU64(f, L2(f, 0), 0x4000000000000000n | BigInt(L1(f))),
    expect: convertFails('error while reading at byte 0'),
  },
  {
    name: 'zstd compressed data overwritten with garbage',
    from: 'zstd',
    mutate: (f) => {
      const off = Number(entry(f, L2(f, 0)) & ((1n << 54n) - 1n));
      patch(f, off, Buffer.alloc(64, 0x5a));
    },
    expect: convertFails('error while reading at byte 0'),
  },

  // --- extended L2 entries
  {
    name: 'extended L2: allocated and zero bits overlap',
    from: 'extl2',
    mutate: (f) => setU64(f, L2X(f, 0) + 8, 0x00000001ffffffffn),
    expect: readsFail('Invalid cluster entry found (L2 offset: 0x40000, L2 index: 0)'),
  },
  {
    name: 'extended L2: allocation bits on an unallocated cluster',
    from: 'extl2',
    mutate: (f) => setU64(f, L2X(f, 4) + 8, 1n),
    expect: readsFail('Invalid cluster entry found (L2 offset: 0x40000, L2 index: 0x4)'),
  },
  {
    name: 'extended L2: zero bits on an unallocated cluster (legal)',
    from: 'extl2',
    mutate: (f) => setU64(f, L2X(f, 4) + 8, 0xffffffff00000000n),
    expect: opens,
  },
  {
    name: 'extended L2: unaligned cluster offset',
    from: 'extl2',
    mutate: (f) => setU64(f, L2X(f, 0), entry(f, L2X(f, 0)) + 0x200n),
    expect: readsFail('Cluster allocation offset 0x50200 unaligned (L2 offset: 0x40000, L2 index: 0)'),
  },
  {
    name: 'extended L2: compressed entry with allocation bits',
    from: 'extl2-zlib',
    mutate: (f) => setU64(f, L2X(f, 0) + 8, 1n),
    expect: readsFail('Invalid cluster entry found (L2 offset: 0x40000, L2 index: 0)'),
    differs: { map: EXTL2_COMPRESSED, convert: EXTL2_COMPRESSED },
  },
  {
    name: 'extended L2: compressed entry with zero bits',
    from: 'extl2-zlib',
    mutate: (f) => setU64(f, L2X(f, 0) + 8, 1n << 32n),
    expect: readsFail('Invalid cluster entry found (L2 offset: 0x40000, L2 index: 0)'),
    differs: { map: EXTL2_COMPRESSED, convert: EXTL2_COMPRESSED },
  },

  // --- refcounts (reads do not need them)
  {
    name: 'refcount table entry unaligned',
    from: 'base',
    mutate: (f) => {
      const rt = Number(getU64(f, H.refcountTableOffset));
      setU64(f, rt, getU64(f, rt) + 0x200n);
    },
    expect: opens,
  },
  {
    name: 'refcount block full of garbage',
    from: 'base',
    mutate: (f) => {
      const rb = Number(getU64(f, Number(getU64(f, H.refcountTableOffset))));
      patch(f, rb, Buffer.alloc(0x10000, 0xff));
    },
    expect: opens,
  },

  // --- snapshot table
  {
    name: 'snapshot extra_data_size 65536',
    from: 'snapshots',
    mutate: (f) => setU32(f, snapshotEntry(f, 0) + 36, 65536),
    expect: fails('Too much extra metadata in snapshot table entry 0'),
  },
  {
    name: 'snapshot extra_data_size 1025 in the second entry',
    from: 'snapshots',
    mutate: (f) => setU32(f, snapshotEntry(f, 1) + 36, 1025),
    expect: fails('Too much extra metadata in snapshot table entry 1'),
  },
  {
    name: 'snapshot id length running past EOF',
    from: 'snapshots',
    mutate: (f) => setU16(f, snapshotEntry(f, 1) + 12, 0xffff),
    expect: opens,
  },
  {
    name: 'snapshot name length running past EOF',
    from: 'snapshots',
    mutate: (f) => setU16(f, snapshotEntry(f, 1) + 14, 0xffff),
    expect: opens,
  },
  {
    name: 'snapshot table cut in the middle of an entry',
    from: 'snapshots',
    mutate: (f) => truncateTo(f, snapshotEntry(f, 1) + 20),
    expect: opens,
  },
  {
    name: 'snapshot table count beyond the entries (zeros past EOF)',
    from: 'snapshots',
    mutate: (f) => setU32(f, H.nbSnapshots, 100),
    expect: opens,
  },
  {
    name: 'snapshot L1 size 0x1000000',
    from: 'snapshots',
    mutate: (f) => setU32(f, snapshotEntry(f, 0) + 8, 0x1000000),
    expect: fails('Snapshot L1 table too large'),
    differs: {
      info: 'qemu checks a snapshot L1 size only when the snapshot is used; qimg when it reads the table',
      map: 'as info',
      convert: 'as info',
    },
  },
];

describe.skipIf(!enabled)('hostile qcow2 tables', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const dir = mkdtempSync(join(tmp.path, 'case-'));
      copyFileSync(T(`${c.from}.qcow2`), join(dir, 'image.qcow2'));
      c.mutate(join(dir, 'image.qcow2'));
      await checkImage(dir, 'image.qcow2', c, true);
    });
  }
});

// ---------------------------------------------------------------- memory bounds

/** Far above what these need (~100-200 MB), far below what a runaway would take. */
const RSS_LIMIT_KB = 600 * 1024;

describe.skipIf(!enabled)('memory stays bounded', () => {
  it('L1 table at the maximum (32 MiB) for a 64 MiB image', async () => {
    const dir = mkdtempSync(join(tmp.path, 'mem-'));
    const f = join(dir, 'image.qcow2');
    copyFileSync(T('base.qcow2'), f);
    setU32(f, H.l1Size, 0x400000);
    setU64(f, H.l1Offset, 1n << 32n); // past EOF: all entries zero
    await checkImage(dir, 'image.qcow2', { expect: opens, maxRssKb: RSS_LIMIT_KB }, true);
  });

  it('L1 table at the maximum, mapping all of its 2 PiB', async () => {
    const dir = mkdtempSync(join(tmp.path, 'mem-'));
    const f = join(dir, 'image.qcow2');
    copyFileSync(T('base.qcow2'), f);
    setU64(f, H.size, 1n << 51n);
    setU32(f, H.l1Size, 0x400000);
    setU64(f, H.l1Offset, 1n << 32n);
    // qemu-img agrees but takes about as long as the hang guard here: qimg only.
    await checkImage(
      dir,
      'image.qcow2',
      {
        expect: { info: 'ok', map: 'ok' },
        maxRssKb: RSS_LIMIT_KB,
        then: (cmd, r) => {
          if (cmd === 'map') {
            expect(JSON.parse(r.stdout)).toEqual([{ start: 0, length: 2 ** 51, depth: 0, present: false, zero: true, data: false, compressed: false }]);
          }
        },
      },
      false,
    );
  });

  it('65536 snapshots (the maximum count), read as zeros past EOF', async () => {
    const dir = mkdtempSync(join(tmp.path, 'mem-'));
    const f = join(dir, 'image.qcow2');
    copyFileSync(T('snapshots.qcow2'), f);
    setU32(f, H.nbSnapshots, 65536);
    // qemu-img agrees (exit 0) but needs seconds of system time here: not run.
    await checkImage(
      dir,
      'image.qcow2',
      {
        expect: { info: 'ok', map: 'ok' },
        maxRssKb: RSS_LIMIT_KB,
        then: (cmd, r) => {
          // the two real snapshots, then 65534 empty ones
          if (cmd === 'info') expect(r.stdout.split('\n').filter((l) => l.includes(' 1970-01-01 00:00:00 ')).length).toBe(65534);
        },
      },
      false,
    );
  });

  it('snapshot table over 64 MiB (entries with maximal extra data and names)', async () => {
    const dir = mkdtempSync(join(tmp.path, 'mem-'));
    const f = join(dir, 'image.qcow2');
    copyFileSync(T('base.qcow2'), f);
    // 600 entries of 40 + 1024 + 65535 + 65535 bytes (~75 MiB), only their
    // headers written: the file stays sparse.
    const start = 0x100000;
    const entrySize = Math.ceil((40 + 1024 + 2 * 65535) / 8) * 8;
    const n = 600;
    const h = Buffer.alloc(40);
    h.writeUInt16BE(0xffff, 12);
    h.writeUInt16BE(0xffff, 14);
    h.writeUInt32BE(1024, 36);
    for (let i = 0; i < n; i++) patch(f, start + i * entrySize, h);
    truncateTo(f, start + n * entrySize);
    setU32(f, H.nbSnapshots, n);
    setU64(f, H.snapshotsOffset, start);
    await checkImage(dir, 'image.qcow2', { expect: fails('Snapshot table is too big'), maxRssKb: RSS_LIMIT_KB }, true);
  });
});
