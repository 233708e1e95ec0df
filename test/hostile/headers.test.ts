/**
 * Hostile qcow2 headers and header extensions (reference §3.1, §3.4): each case
 * mutates a copy of a valid image and runs info, map and convert -O raw with qimg
 * and (where it is safe) qemu-img. See mutate.ts for what every run must hold.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import {
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_FEATURE_TABLE,
  H,
  checkImage,
  extension,
  extensions,
  getU32,
  getU64,
  patch,
  readAt,
  setU32,
  setU64,
  setU8,
  truncateTo,
  type Cmd,
  type Expectation,
} from './mutate.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-hostile-hdr-');
afterAll(() => tmp.cleanup());
const T = (name: string) => join(tmp.path, name);

/** Templates, made once: qemu-img's own images. */
beforeAll(() => {
  if (!enabled) return;
  const d = tmp.path;
  ok(qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], d));
  ok(qemuIo(['-c', 'write -P 0xab 0 128k', '-c', 'write -P 0xcd 1M 64k', 'base.qcow2'], d));
  ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2'], d));
  ok(qemuIo(['-c', 'write -P 0x11 64k 64k', 'overlay.qcow2'], d));
  ok(qemuImg(['create', '-q', '-f', 'qcow2', 'bitmaps.qcow2', '64M'], d));
  ok(qemuImg(['bitmap', '--add', 'bitmaps.qcow2', 'b0'], d));
  ok(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', 'c2m.qcow2', '64M'], d));
  ok(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '64M'], d));
  ok(qemuIo(['-c', 'write -P 0xab 0 128k', 'v2.qcow2'], d));
});

// Why qimg is stricter than qemu 7.2 in some cases (asserted against qemu-img).
const OFFSET_2_53 = 'offsets of 2^53 or more are refused; qemu opens the table past EOF as zeros';

type Template = 'base' | 'overlay' | 'bitmaps' | 'c2m' | 'v2';

interface Case extends Expectation {
  name: string;
  from?: Template;
  mutate: (file: string) => void;
}

/** Every command fails with `msg` (qemu-img fails too). */
const fails = (msg: string | RegExp): Partial<Record<Cmd, string | RegExp>> => ({ info: msg, map: msg, convert: msg });
/** Every command succeeds (qemu-img too), and reads the same data. */
const opens = { info: 'ok', map: 'ok', convert: 'ok' } as const;
/** info works, the reads fail with `msg`. */
const infoOnly = (msg: string | RegExp): Partial<Record<Cmd, string | RegExp>> => ({ info: 'ok', map: msg, convert: msg });

const cases: Case[] = [
  // --- magic and version
  { name: 'magic changed: probed as raw', mutate: (f) => setU32(f, H.magic, 0x12345678), expect: opens, then: rawInfo },
  { name: 'magic changed, -f qcow2', format: 'qcow2', mutate: (f) => setU32(f, H.magic, 0x12345678), expect: fails('Image is not in qcow2 format') },
  {
    name: 'version 1: probed as qcow v1, whose header this is not (as qemu)',
    mutate: (f) => setU32(f, H.version, 1),
    expect: fails('Cluster size must be between 512 and 64k'),
  },
  { name: 'version 0: not qcow at all, probed as raw', mutate: (f) => setU32(f, H.version, 0), expect: opens, then: rawInfo },
  { name: 'version 4', mutate: (f) => setU32(f, H.version, 4), expect: fails('Unsupported qcow2 version 4') },
  { name: 'version 0xffffffff', mutate: (f) => setU32(f, H.version, 0xffffffff), expect: fails('Unsupported qcow2 version 4294967295') },

  // --- cluster size and header length
  { name: 'cluster_bits 8', mutate: (f) => setU32(f, H.clusterBits, 8), expect: fails('Unsupported cluster size: 2^8') },
  { name: 'cluster_bits 22', mutate: (f) => setU32(f, H.clusterBits, 22), expect: fails('Unsupported cluster size: 2^22') },
  { name: 'cluster_bits 0xffffffff', mutate: (f) => setU32(f, H.clusterBits, 0xffffffff), expect: fails('Unsupported cluster size: 2^4294967295') },
  { name: 'header_length 100', mutate: (f) => setU32(f, H.headerLength, 100), expect: fails('qcow2 header too short') },
  { name: 'header_length 0', mutate: (f) => setU32(f, H.headerLength, 0), expect: fails('qcow2 header too short') },
  { name: 'header_length 0x20000', mutate: (f) => setU32(f, H.headerLength, 0x20000), expect: fails('qcow2 header exceeds cluster size') },
  { name: 'header_length 105 (accepted, not a multiple of 8)', mutate: (f) => setU32(f, H.headerLength, 105), expect: opens },

  // --- backing file name
  { name: 'backing offset 0x20000', mutate: (f) => setU64(f, H.backingOffset, 0x20000), expect: fails('Invalid backing file offset') },
  {
    name: 'backing size 2000',
    mutate: (f) => {
      setU64(f, H.backingOffset, 0x1000);
      setU32(f, H.backingSize, 2000);
    },
    expect: fails('Backing file name too long'),
  },
  {
    name: 'backing name running past the end of cluster 0',
    mutate: (f) => {
      setU64(f, H.backingOffset, 0xff00);
      setU32(f, H.backingSize, 0x200);
    },
    expect: fails('Backing file name too long'),
  },
  {
    name: 'backing offset set, size 0: no backing file (as qemu)',
    mutate: (f) => {
      setU64(f, H.backingOffset, 0x1000);
      setU32(f, H.backingSize, 0);
    },
    expect: opens,
    then: (cmd, r) => {
      if (cmd === 'info') expect(r.stdout).not.toContain('backing file');
    },
  },
  {
    name: 'backing name with a NUL byte ends there (as qemu)',
    from: 'overlay',
    mutate: (f) => {
      const off = Number(getU64(f, H.backingOffset));
      expect(readAt(f, off, 10).toString()).toBe('base.qcow2');
      setU8(f, off + 4, 0);
    },
    expect: infoOnly(/Could not open backing file: Could not open '([^']*\/)?base'/),
    then: (cmd, r) => {
      if (cmd === 'info') expect(r.stdout).toContain('backing file: base\n');
    },
  },
  {
    name: 'backing-format extension length 20',
    from: 'overlay',
    mutate: (f) => setU32(f, extension(f, EXT_BACKING_FORMAT).at + 4, 20),
    expect: fails('ERROR: ext_backing_format: len=20 too large (>=16)'),
  },

  // --- feature bits
  {
    name: 'incompatible bit 20',
    mutate: (f) => setU64(f, H.incompatible, 1n << 20n),
    expect: fails('Unsupported qcow2 feature(s): Unknown incompatible feature: 100000'),
  },
  {
    name: 'incompatible bit 20 named by the feature table',
    mutate: (f) => {
      setU64(f, H.incompatible, 3n << 20n);
      // Rename the table's last entry (autoclear bit 1) to incompatible bit 20.
      const e = extension(f, EXT_FEATURE_TABLE);
      const last = e.at + 8 + e.length - 48;
      const entry = Buffer.alloc(48);
      entry[0] = 0;
      entry[1] = 20;
      entry.write('hostile feature', 2);
      patch(f, last, entry);
    },
    expect: fails('Unsupported qcow2 feature(s): hostile feature, Unknown incompatible feature: 200000'),
  },
  {
    name: 'compression bit with type 0 (zlib)',
    mutate: (f) => setU64(f, H.incompatible, 1n << 3n),
    expect: fails('qcow2: Compression type incompatible feature bit must not be set'),
  },
  {
    name: 'compression bit with type 2',
    mutate: (f) => {
      setU64(f, H.incompatible, 1n << 3n);
      setU8(f, H.compressionType, 2);
    },
    expect: fails('qcow2: unknown compression type: 2'),
  },
  {
    name: 'compression type 1 (zstd) without the bit',
    mutate: (f) => setU8(f, H.compressionType, 1),
    expect: fails('qcow2: Compression type incompatible feature bit must be set'),
  },
  {
    name: 'compression type 1 with the bit (legal: a zstd image)',
    mutate: (f) => {
      setU64(f, H.incompatible, 1n << 3n);
      setU8(f, H.compressionType, 1);
    },
    expect: opens,
  },
  { name: 'dirty bit (read-only commands ignore it)', mutate: (f) => setU64(f, H.incompatible, 1n), expect: opens },
  { name: 'corrupt bit (read-only commands ignore it)', mutate: (f) => setU64(f, H.incompatible, 2n), expect: opens },
  { name: 'unknown autoclear bit', mutate: (f) => setU64(f, H.autoclear, 1n << 40n), expect: opens },
  { name: 'autoclear bitmaps bit without the extension', mutate: (f) => setU64(f, H.autoclear, 1n), expect: opens },
  {
    name: 'external data file bit without a name',
    mutate: (f) => setU64(f, H.incompatible, 4n),
    expect: infoOnly("'data-file' is required for this image"),
  },
  {
    name: 'raw external data bit without a data file',
    mutate: (f) => setU64(f, H.autoclear, 2n),
    expect: fails('data-file-raw requires a data file'),
    differs: { info: 'qemu 7.2 skips this check for info (no-I/O open); qimg checks it with the header' },
  },

  // --- refcounts and encryption
  {
    name: 'refcount_order 7',
    mutate: (f) => setU32(f, H.refcountOrder, 7),
    expect: fails('Reference count entry width too large; may not exceed 64 bits'),
  },
  { name: 'crypt_method 3', mutate: (f) => setU32(f, H.cryptMethod, 3), expect: fails('Unsupported encryption method 3') },
  {
    name: 'crypt_method 1 (legacy AES): info works, reads need a key',
    mutate: (f) => setU32(f, H.cryptMethod, 1),
    expect: infoOnly(/[Ee]ncrypt/),
    then: (cmd, r) => {
      if (cmd === 'info') expect(r.stdout).toContain('encrypted: yes');
    },
  },
  {
    name: 'crypt_method 2 (LUKS) without the crypto extension',
    mutate: (f) => setU32(f, H.cryptMethod, 2),
    expect: infoOnly(/Missing CRYPTO header for crypt method 2|Encrypted qcow2 images cannot be read/),
    differs: { info: 'qemu 7.2 info crashes (SIGSEGV, fixed in 10.0); qimg shows the header' },
    then: (cmd, r) => {
      if (cmd === 'info') expect(r.stdout).toContain('encrypted: yes');
    },
  },

  // --- L1 table
  { name: 'l1_size 0x1000000', mutate: (f) => setU32(f, H.l1Size, 0x1000000), expect: fails('Active L1 table too large') },
  { name: 'l1_size 0', mutate: (f) => setU32(f, H.l1Size, 0), expect: fails('L1 table is too small') },
  { name: 'L1 offset unaligned', mutate: (f) => setU64(f, H.l1Offset, 0x30200), expect: fails('Active L1 table offset invalid') },
  { name: 'L1 offset past EOF (reads zeros)', mutate: (f) => setU64(f, H.l1Offset, 0x1000000), expect: opens },
  {
    name: 'L1 offset 2^60',
    mutate: (f) => setU64(f, H.l1Offset, 1n << 60n),
    expect: fails('L1 table offset is too large'),
    differs: { info: OFFSET_2_53, map: OFFSET_2_53, convert: OFFSET_2_53 },
  },
  { name: 'L1 offset 2^63', mutate: (f) => setU64(f, H.l1Offset, 1n << 63n), expect: fails(/L1 table offset (is too large|invalid)/) },

  // --- refcount table
  {
    name: 'refcount table offset unaligned',
    mutate: (f) => setU64(f, H.refcountTableOffset, 0x10200),
    expect: fails('Reference count table offset invalid'),
  },
  {
    name: 'refcount table of 0 clusters',
    mutate: (f) => setU32(f, H.refcountTableClusters, 0),
    expect: fails('Image does not contain a reference count table'),
  },
  {
    name: 'refcount table of 0x100000 clusters',
    mutate: (f) => setU32(f, H.refcountTableClusters, 0x100000),
    expect: fails('Reference count table too large'),
  },
  {
    name: 'refcount table of 0xffffffff clusters',
    mutate: (f) => setU32(f, H.refcountTableClusters, 0xffffffff),
    expect: fails('Reference count table too large'),
  },
  { name: 'refcount table past EOF (reads need no refcounts)', mutate: (f) => setU64(f, H.refcountTableOffset, 0x1000000), expect: opens },

  // --- snapshot table
  { name: 'nb_snapshots 70000', mutate: (f) => setU32(f, H.nbSnapshots, 70000), expect: fails('Snapshot table too large') },
  { name: 'nb_snapshots 0xffffffff', mutate: (f) => setU32(f, H.nbSnapshots, 0xffffffff), expect: fails('Snapshot table too large') },
  {
    name: 'snapshots offset unaligned',
    mutate: (f) => {
      setU32(f, H.nbSnapshots, 1);
      setU64(f, H.snapshotsOffset, 0x10200);
    },
    expect: fails('Snapshot table offset invalid'),
  },
  {
    name: 'snapshots offset unaligned, no snapshots',
    mutate: (f) => setU64(f, H.snapshotsOffset, 0x10200),
    expect: fails('Snapshot table offset invalid'),
  },

  // --- virtual size
  { name: 'size 2^62', mutate: (f) => setU64(f, H.size, 1n << 62n), expect: fails('Image is too big') },
  { name: 'size 2^64-1', mutate: (f) => setU64(f, H.size, (1n << 64n) - 1n), expect: fails('Image is too big') },
  { name: 'size 2^53+512 (64k clusters)', mutate: (f) => setU64(f, H.size, (1n << 53n) + 512n), expect: fails('L1 table is too small') },
  {
    name: 'size 2^53+2M with 2M clusters and a large enough L1',
    from: 'c2m',
    mutate: (f) => {
      setU64(f, H.size, (1n << 53n) + (1n << 21n));
      setU32(f, H.l1Size, 16385);
      setU64(f, H.l1Offset, 1n << 40n); // past EOF: an empty L1
    },
    // as qemu: sizes past 2^53 are exact as whole sectors (qcow2 reaches 2 EiB)
    expect: { info: 'ok', map: 'ok' },
  },
  {
    name: 'size 2^53-2M with 2M clusters',
    from: 'c2m',
    mutate: (f) => {
      setU64(f, H.size, (1n << 53n) - (1n << 21n));
      setU32(f, H.l1Size, 16384);
      setU64(f, H.l1Offset, 1n << 40n);
    },
    expect: { info: 'ok', map: 'ok' },
  },

  // --- header extensions
  {
    name: 'first extension length 0xffff',
    mutate: (f) => setU32(f, extensions(f)[0].at + 4, 0xffff),
    expect: fails('Header extension too large'),
  },
  {
    name: 'first extension length 0xffffffff',
    mutate: (f) => setU32(f, extensions(f)[0].at + 4, 0xffffffff),
    expect: fails('Header extension too large'),
  },
  {
    name: 'extension area without an end marker (all 0xff)',
    mutate: (f) => {
      const start = getU32(f, H.headerLength);
      patch(f, start, Buffer.alloc(0x10000 - start, 0xff));
    },
    expect: fails('Header extension too large'),
  },
  {
    name: 'bitmaps extension with a bad length',
    from: 'bitmaps',
    mutate: (f) => setU32(f, extension(f, EXT_BITMAPS).at + 4, 16),
    expect: fails('bitmaps_ext: Invalid extension length'),
  },
  {
    name: 'bitmaps extension with zero bitmaps',
    from: 'bitmaps',
    mutate: (f) => setU32(f, extension(f, EXT_BITMAPS).at + 8, 0),
    expect: fails('found bitmaps extension with zero bitmaps'),
  },
  {
    name: 'bitmaps extension with 70000 bitmaps',
    from: 'bitmaps',
    mutate: (f) => setU32(f, extension(f, EXT_BITMAPS).at + 8, 70000),
    expect: fails('bitmaps_ext: Image has 70000 bitmaps, exceeding the QEMU supported maximum of 65535'),
  },
  {
    name: 'bitmaps extension with reserved field nonzero',
    from: 'bitmaps',
    mutate: (f) => setU32(f, extension(f, EXT_BITMAPS).at + 12, 1),
    expect: fails('bitmaps_ext: Reserved field is not zero'),
  },
  {
    name: 'bitmaps extension with an unaligned directory',
    from: 'bitmaps',
    mutate: (f) => setU64(f, extension(f, EXT_BITMAPS).at + 24, getU64(f, extension(f, EXT_BITMAPS).at + 24) + 0x200n),
    expect: fails('bitmaps_ext: invalid bitmap directory offset'),
  },
  {
    name: 'bitmaps extension with a huge directory',
    from: 'bitmaps',
    mutate: (f) => setU64(f, extension(f, EXT_BITMAPS).at + 16, 1024 * 65535 + 8),
    expect: fails('bitmaps_ext: bitmap directory size (67107848) exceeds the maximum supported size (67107840)'),
  },

  // --- truncated files
  { name: 'file cut at 10 bytes', mutate: (f) => truncateTo(f, 10), expect: fails('Unsupported cluster size: 2^0') },
  { name: 'file cut at 50 bytes', mutate: (f) => truncateTo(f, 50), expect: fails('qcow2 header too short') },
  { name: 'file cut at 100 bytes', mutate: (f) => truncateTo(f, 100), expect: fails('qcow2 header too short') },
  { name: 'file cut at 4 bytes: probed as raw', mutate: (f) => truncateTo(f, 4), expect: opens },
  { name: 'file cut inside the refcount table', mutate: (f) => truncateTo(f, 0x10004), expect: opens },
  { name: 'file cut inside the L1 table', mutate: (f) => truncateTo(f, 0x30004), expect: opens },
  { name: 'file cut inside the L2 table', mutate: (f) => truncateTo(f, 0x40008), expect: opens },
  { name: 'file cut inside a data cluster', mutate: (f) => truncateTo(f, 0x50000 + 100), expect: opens },
  { name: 'empty file, -f qcow2', format: 'qcow2', mutate: (f) => truncateTo(f, 0), expect: fails('Image is not in qcow2 format') },
  { name: 'file of 200 zero bytes, -f qcow2', format: 'qcow2', mutate: (f) => writeFileSync(f, Buffer.alloc(200)), expect: fails('Image is not in qcow2 format') },
  {
    name: 'empty file: raw of size 0',
    mutate: (f) => truncateTo(f, 0),
    expect: opens,
    then: (cmd, r) => {
      if (cmd === 'info') expect(r.stdout).toContain('virtual size: 0 B (0 bytes)');
    },
  },
];

function rawInfo(cmd: Cmd, r: { stdout: string }): void {
  if (cmd === 'info') expect(r.stdout).toContain('file format: raw');
}

describe.skipIf(!enabled)('hostile qcow2 headers', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const dir = mkdtempSync(join(tmp.path, 'case-'));
      const from = c.from ?? 'base';
      copyFileSync(T('base.qcow2'), join(dir, 'base.qcow2')); // an overlay's backing file
      copyFileSync(T(`${from}.qcow2`), join(dir, 'image.qcow2'));
      c.mutate(join(dir, 'image.qcow2'));
      await checkImage(dir, 'image.qcow2', c, true);
    });
  }

});
