/**
 * `check` against qemu-img as the oracle: every qcow2 fixture (JSON, human text, exit
 * code), damaged copies made here (the same per-problem lines, counts and exit codes),
 * and repairs (`-r leaks`, `-r all`) after which qemu-img check must be clean and the
 * guest content unchanged where the damage did not destroy data.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { copyFileSync, readFileSync, writeFileSync, appendFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { IMAGES_DIR, fixturePath, loadManifest } from '../helpers/fixtures.js';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, run, sha256File, tempDir, type RunResult } from '../helpers/qemu.js';

const enabled = qemuAvailable();
const fixtures = loadManifest();
const tmp = tempDir('qimg-check-');
afterAll(() => tmp.cleanup());

/** qemu's final error line names the tool only; qimg's also names the file. */
function normStderr(text: string, file: string): string {
  return text
    .replace(/^qemu-img: /gm, `qimg: ${file}: `)
    .replace(/Marking image as corrupt: (.*); further corruption events will be suppressed/g, 'Image is corrupt: $1; further non-fatal corruption events will be suppressed');
}

// ------------------------------------------------------------------ fixtures

describe.skipIf(!enabled)('check vs qemu-img on every qcow2 fixture', () => {
  for (const f of fixtures.filter((x) => x.format === 'qcow2')) {
    it(f.name, () => {
      const file = fixturePath(f);
      const q = qemuImg(['check', '--output=json', file], IMAGES_DIR);
      const m = qimg(['check', '--output=json', file], { cwd: IMAGES_DIR });
      if (q.status !== 0 && q.stdout === '') {
        // qemu-img cannot check it either (missing backing file, LUKS without a key)
        expect(m.status).toBe(1);
        expect(m.stdout).toBe('');
        expect(m.stderr).toMatch(/^qimg: [^\n]+\n$/);
        return;
      }
      expect(m.stderr).toBe(q.stderr);
      expect(m.status).toBe(q.status);
      expect(JSON.parse(m.stdout)).toEqual(JSON.parse(q.stdout));
      expect(m.stdout).toBe(q.stdout);
      const qh = qemuImg(['check', file], IMAGES_DIR);
      const mh = qimg(['check', file], { cwd: IMAGES_DIR });
      expect(mh.stdout).toBe(qh.stdout);
      expect(mh.status).toBe(qh.status);
    });
  }

  for (const f of fixtures.filter((x) => x.format === 'raw')) {
    it(`${f.name}: no check for raw (exit 63)`, () => {
      const file = fixturePath(f);
      const q = qemuImg(['check', file], IMAGES_DIR);
      const m = qimg(['check', file], { cwd: IMAGES_DIR });
      expect(q.status).toBe(63);
      expect(m.status).toBe(63);
      expect(m.stdout).toBe('');
      expect(m.stderr).toBe(`qimg: ${file}: This image format does not support checks\n`);
    });
  }
});

// ------------------------------------------------------------------ damaged images

interface Layout {
  cs: number;
  refcountBits: number;
  l1Offset: number;
  l1Size: number;
  reftableOffset: number;
  refblock0: number;
  l2Offset: number;
}

function layout(path: string): Layout {
  const d = readFileSync(path);
  const cs = 2 ** d.readUInt32BE(20);
  const version = d.readUInt32BE(4);
  const l1Offset = Number(d.readBigUInt64BE(40));
  const reftableOffset = Number(d.readBigUInt64BE(48));
  const mask = 0x00fffffffffffe00n;
  return {
    cs,
    refcountBits: version >= 3 ? 1 << d.readUInt32BE(96) : 16,
    l1Offset,
    l1Size: d.readUInt32BE(36),
    reftableOffset,
    refblock0: Number(d.readBigUInt64BE(reftableOffset) & ~0x1ffn),
    l2Offset: Number(d.readBigUInt64BE(l1Offset) & mask),
  };
}

function patch(path: string, offset: number, bytes: Buffer): void {
  const d = readFileSync(path);
  bytes.copy(d, offset);
  writeFileSync(path, d);
}

function u64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
}

function readU64(path: string, offset: number): bigint {
  return readFileSync(path).readBigUInt64BE(offset);
}

/** Sets the refcount of `cluster` in refcount block 0, any entry width. */
function setRefcount(path: string, cluster: number, value: bigint): void {
  const L = layout(path);
  const d = readFileSync(path);
  const bits = L.refcountBits;
  if (bits >= 8) {
    const bytes = bits / 8;
    const pos = L.refblock0 + cluster * bytes;
    for (let i = 0; i < bytes; i++) d[pos + i] = Number((value >> BigInt(8 * (bytes - 1 - i))) & 0xffn);
  } else {
    const perByte = 8 / bits;
    const pos = L.refblock0 + Math.floor(cluster / perByte);
    const shift = (cluster % perByte) * bits;
    const m = ((1 << bits) - 1) << shift;
    d[pos] = (d[pos] & ~m) | ((Number(value) << shift) & m);
  }
  writeFileSync(path, d);
}

/** Appends one zero cluster (after padding the file to a cluster boundary); returns its index. */
function appendCluster(path: string): number {
  const { cs } = layout(path);
  const size = statSync(path).size;
  const n = Math.ceil(size / cs);
  appendFileSync(path, Buffer.alloc(n * cs - size + cs));
  return n;
}

function guestSha(path: string): string {
  const out = `${path}.sha.raw`;
  ok(qemuImg(['convert', '-O', 'raw', path, out]), 'qemu-img convert');
  return sha256File(out);
}

/** qcow2 image with 192 KiB of data: clusters 0 header, 1 reftable, 2 refblock, 3 L1, 4 L2, 5-7 data. */
function makeBase(name: string, opts: string[] = [], size = '1M', data = 'write -P 1 0 192k'): string {
  const path = join(tmp.path, name);
  ok(qemuImg(['create', '-f', 'qcow2', ...(opts.length ? ['-o', opts.join(',')] : []), path, size]), 'create');
  ok(qemuIo(['-c', data, path]), 'qemu-io');
  return path;
}

interface Case {
  name: string;
  /** builds the pristine image, returns its path */
  base: () => string;
  /** damages the image in place */
  damage: (path: string) => void;
  /** the damage leaves the guest data readable and unchanged */
  dataIntact: boolean;
  /** repair modes where qimg deliberately differs from qemu-img 7.2 (see notes) */
  differs?: Array<'leaks' | 'all'>;
  /** repair modes after which qemu-img check must find the image clean */
  clean?: Array<'leaks' | 'all'>;
}

const cases: Case[] = [
  {
    // a leak only: the refcount table's cluster counted twice
    name: 'leak',
    base: () => makeBase('leak.qcow2'),
    damage: (p) => setRefcount(p, layout(p).reftableOffset / layout(p).cs, 2n),
    dataIntact: true,
    clean: ['leaks', 'all'],
  },
  {
    name: 'leaked data cluster (refcount 2, COPIED set)',
    base: () => makeBase('leak2.qcow2'),
    damage: (p) => setRefcount(p, 5, 2n),
    dataIntact: true,
    clean: ['leaks', 'all'],
  },
  {
    // refcount 0 for a used data cluster: needs a rebuild of the refcount structure
    name: 'refcount too low',
    base: () => makeBase('low.qcow2'),
    damage: (p) => setRefcount(p, 5, 0n),
    dataIntact: true,
    clean: ['all'],
  },
  {
    name: 'refcount too low but not zero',
    base: () => makeBase('low2.qcow2'),
    damage: (p) => {
      // the data cluster of guest cluster 1 also mapped at guest cluster 3: 2 references, refcount 1
      const L = layout(p);
      patch(p, L.l2Offset + 3 * 8, u64(readU64(p, L.l2Offset + 8)));
    },
    dataIntact: false,
    clean: ['all'],
  },
  {
    name: 'COPIED flag missing on an L2 entry',
    base: () => makeBase('copied-l2.qcow2'),
    damage: (p) => {
      const at = layout(p).l2Offset + 8;
      patch(p, at, u64(readU64(p, at) & ~(1n << 63n)));
    },
    dataIntact: true,
    clean: ['leaks', 'all'],
  },
  {
    name: 'COPIED flag missing on an L1 entry',
    base: () => makeBase('copied-l1.qcow2'),
    damage: (p) => {
      const at = layout(p).l1Offset;
      patch(p, at, u64(readU64(p, at) & ~(1n << 63n)));
    },
    dataIntact: true,
    clean: ['leaks', 'all'],
  },
  {
    name: 'L2 table past the end of the file',
    base: () => makeBase('l2-eof.qcow2'),
    damage: (p) => patch(p, layout(p).l1Offset, u64((1n << 63n) | 0x100000n)),
    dataIntact: false,
  },
  {
    name: 'unaligned L2 entry',
    base: () => makeBase('unaligned-l2e.qcow2'),
    damage: (p) => {
      const at = layout(p).l2Offset + 8;
      patch(p, at, u64(readU64(p, at) | 0x200n));
    },
    dataIntact: false,
  },
  {
    // a misaligned preallocated zero cluster: -r all turns it into a plain zero cluster
    name: 'unaligned preallocated zero cluster',
    base: () => makeBase('unaligned-zero.qcow2'),
    damage: (p) => {
      const at = layout(p).l2Offset + 8;
      patch(p, at, u64(readU64(p, at) | 0x201n));
    },
    dataIntact: false,
    clean: ['all'],
  },
  {
    name: 'unaligned L1 entry',
    base: () => makeBase('unaligned-l1e.qcow2'),
    damage: (p) => {
      const at = layout(p).l1Offset;
      patch(p, at, u64(readU64(p, at) | 0x200n));
    },
    dataIntact: false,
  },
  {
    // qemu 7.2 follows an L1 entry whose only set bits are reserved: the header is read as an L2 table
    name: 'L1 entry with only reserved bits',
    base: () => makeBase('l1-reserved.qcow2', [], '1G'),
    damage: (p) => patch(p, layout(p).l1Offset + 8, u64(1n)),
    dataIntact: false,
  },
  {
    name: 'L2 entry with reserved bits',
    base: () => makeBase('l2-reserved.qcow2'),
    damage: (p) => patch(p, layout(p).l2Offset + 3 * 8, u64(2n)),
    dataIntact: true,
  },
  {
    // qemu 7.2 fails to repair this (it marks the image corrupt); qimg rebuilds the refcount structure
    name: 'unaligned refcount block',
    base: () => makeBase('refblock-unaligned.qcow2'),
    damage: (p) => patch(p, layout(p).reftableOffset, u64(BigInt(layout(p).refblock0) | 0x200n)),
    dataIntact: true,
    differs: ['all'],
    clean: ['all'],
  },
  {
    // qemu grows the file to the block's offset; qimg rebuilds instead (one corruption fewer counted)
    name: 'refcount block outside the image',
    base: () => makeBase('refblock-outside.qcow2'),
    damage: (p) => patch(p, layout(p).reftableOffset, u64(0x200000n)),
    dataIntact: true,
    differs: ['all'],
    clean: ['all'],
  },
  {
    name: 'refcount table entry with reserved bits',
    base: () => makeBase('reftable-reserved.qcow2'),
    damage: (p) => patch(p, layout(p).reftableOffset + 8, u64(1n)),
    dataIntact: true,
    clean: ['all'],
  },
  {
    name: 'refcount_bits=1 with a leak',
    base: () => makeBase('rc1-leak.qcow2', ['refcount_bits=1'], '1M', 'write -P 5 0 128k'),
    damage: (p) => setRefcount(p, appendCluster(p), 1n),
    dataIntact: true,
    clean: ['leaks', 'all'],
  },
  {
    name: 'refcount_bits=64 with a leak',
    base: () => makeBase('rc64-leak.qcow2', ['refcount_bits=64'], '1M', 'write -P 5 0 128k'),
    damage: (p) => setRefcount(p, appendCluster(p), 1n),
    dataIntact: true,
    clean: ['leaks', 'all'],
  },
  {
    name: 'refcount_bits=64 with a huge refcount',
    base: () => makeBase('rc64-huge.qcow2', ['refcount_bits=64'], '1M', 'write -P 5 0 128k'),
    damage: (p) => setRefcount(p, 1, 0x123456789an),
    dataIntact: true,
    clean: ['leaks', 'all'],
  },
  {
    // beyond 2^53: the per-problem line must show the exact uint64, as qemu prints it
    name: 'refcount_bits=64 with a refcount beyond 2^53',
    base: () => makeBase('rc64-beyond.qcow2', ['refcount_bits=64'], '1M', 'write -P 5 0 128k'),
    damage: (p) => setRefcount(p, 1, 0xffffffffffffff01n),
    dataIntact: true,
    clean: ['leaks', 'all'],
  },
  {
    // an L2 table's refcount beyond 2^53: the OFLAG_COPIED line shows it exactly too
    name: 'refcount_bits=64 with an L2 table refcount beyond 2^53',
    base: () => makeBase('rc64-beyond-l2.qcow2', ['refcount_bits=64'], '1M', 'write -P 5 0 128k'),
    damage: (p) => setRefcount(p, 4, 0x20000000000001n),
    dataIntact: true,
    clean: ['all'],
  },
  {
    name: 'refcount_bits=1 with a zeroed refcount (rebuild)',
    base: () => makeBase('rc1-low.qcow2', ['refcount_bits=1'], '1M', 'write -P 5 0 128k'),
    damage: (p) => setRefcount(p, 5, 0n),
    dataIntact: true,
    clean: ['all'],
  },
  {
    name: 'refcount_bits=64 with a zeroed refcount (rebuild)',
    base: () => makeBase('rc64-low.qcow2', ['refcount_bits=64'], '1M', 'write -P 5 0 128k'),
    damage: (p) => setRefcount(p, 5, 0n),
    dataIntact: true,
    clean: ['all'],
  },
  {
    name: 'refcount_bits=2 with a leak',
    base: () => makeBase('rc2-leak.qcow2', ['refcount_bits=2'], '1M', 'write -P 5 0 128k'),
    damage: (p) => setRefcount(p, 1, 3n),
    dataIntact: true,
    clean: ['leaks', 'all'],
  },
  {
    // many refcount blocks (512-byte clusters), an internal snapshot, refcounts zeroed in block 1
    name: '512-byte clusters, snapshot, zeroed refcount block (rebuild)',
    base: () => {
      const p = makeBase('multi.qcow2', ['cluster_size=512'], '4M', 'write -P 5 0 2M');
      ok(qemuImg(['snapshot', '-c', 's1', p]), 'snapshot');
      ok(qemuIo(['-c', 'write -P 9 64k 64k', '-c', 'write -P 6 3M 100k', p]), 'qemu-io');
      return p;
    },
    damage: (p) => {
      const rt = layout(p).reftableOffset;
      patch(p, Number(readU64(p, rt + 8)), Buffer.alloc(64));
    },
    dataIntact: true,
    clean: ['all'],
  },
  {
    name: 'snapshot image with a leaked shared cluster',
    base: () => {
      const p = makeBase('snap-leak.qcow2');
      ok(qemuImg(['snapshot', '-c', 's1', p]), 'snapshot');
      ok(qemuIo(['-c', 'write -P 2 0 64k', p]), 'qemu-io');
      return p;
    },
    damage: (p) => setRefcount(p, 6, 3n),
    dataIntact: true,
    clean: ['leaks', 'all'],
  },
  {
    name: 'COPIED flag on a compressed cluster',
    base: () => {
      const src = join(tmp.path, 'c.raw');
      writeFileSync(src, Buffer.alloc(256 * 1024, 'compressible '));
      const p = join(tmp.path, 'compressed.qcow2');
      ok(qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', src, p]), 'convert -c');
      return p;
    },
    damage: (p) => {
      const at = layout(p).l2Offset + 8;
      patch(p, at, u64(readU64(p, at) | (1n << 63n)));
    },
    dataIntact: true,
  },
  {
    name: 'extended L2: bad subcluster bitmaps',
    base: () => makeBase('extl2.qcow2', ['extended_l2=on'], '1M', 'write -P 4 0 192k'),
    damage: (p) => {
      const l2 = layout(p).l2Offset;
      // allocated and zero bit for subcluster 0 of guest cluster 0
      patch(p, l2 + 8, u64(readU64(p, l2 + 8) | (1n << 32n) | 1n));
      // compressed entry with a bitmap; unallocated entry with allocation bits
      patch(p, l2 + 6 * 16, Buffer.concat([u64((1n << 62n) | 0x12345n), u64(3n)]));
      patch(p, l2 + 7 * 16 + 8, u64(5n));
    },
    dataIntact: false,
  },
  {
    // lazy refcounts, killed while writing: dirty bit set, refcounts stale
    name: 'dirty image with stale lazy refcounts',
    base: () => {
      const p = join(tmp.path, 'dirty.qcow2');
      ok(qemuImg(['create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', p, '4M']), 'create');
      run('qemu-io', ['-c', 'write -P 3 0 1M', '-c', 'sigraise 9', p]);
      return p;
    },
    damage: () => undefined,
    dataIntact: true,
    clean: ['all'],
  },
];

function checkJsonOf(r: RunResult): Record<string, number> {
  return r.stdout ? (JSON.parse(r.stdout) as Record<string, number>) : {};
}

describe.skipIf(!enabled)('damaged images: qimg check agrees with qemu-img check', () => {
  for (const c of cases) {
    describe(c.name, () => {
      let damaged = '';
      let baseSha = '';
      const prepare = () => {
        if (damaged) return;
        const base = c.base();
        baseSha = guestSha(base);
        damaged = base.replace(/\.qcow2$/, '.damaged.qcow2');
        copyFileSync(base, damaged);
        c.damage(damaged);
      };

      it('check: same lines, counts and exit code', () => {
        prepare();
        const q = qemuImg(['check', '--output=json', damaged]);
        const m = qimg(['check', '--output=json', damaged]);
        expect(q.status).toBeGreaterThan(0);
        expect(m.status).toBe(q.status);
        expect(checkJsonOf(m)).toEqual(checkJsonOf(q));
        expect(m.stderr).toBe(normStderr(q.stderr, damaged));
        const qh = qemuImg(['check', damaged]);
        const mh = qimg(['check', damaged]);
        expect(mh.stdout).toBe(qh.stdout);
        expect(mh.status).toBe(qh.status);
      });

      for (const mode of ['leaks', 'all'] as const) {
        it(`check -r ${mode}`, () => {
          prepare();
          const qCopy = damaged.replace(/\.qcow2$/, `.q-${mode}.qcow2`);
          const mCopy = damaged.replace(/\.qcow2$/, `.m-${mode}.qcow2`);
          copyFileSync(damaged, qCopy);
          copyFileSync(damaged, mCopy);
          const q = qemuImg(['check', '-r', mode, '--output=json', qCopy]);
          const m = qimg(['check', '-r', mode, '--output=json', mCopy]);
          const qAfter = qemuImg(['check', qCopy]);
          const mAfter = qemuImg(['check', mCopy]);
          if (!c.differs?.includes(mode)) {
            expect(m.status).toBe(q.status);
            const qj = checkJsonOf(q);
            const mj = checkJsonOf(m);
            expect(mj['leaks-fixed']).toBe(qj['leaks-fixed']);
            expect(mj['corruptions-fixed']).toBe(qj['corruptions-fixed']);
            expect(mj.corruptions).toBe(qj.corruptions);
            expect(mj.leaks).toBe(qj.leaks);
            expect(mAfter.status).toBe(qAfter.status);
          }
          if (c.clean?.includes(mode)) {
            expect(m.status).toBe(0);
            expect(mAfter.stderr).toBe('');
            expect(mAfter.status).toBe(0);
            expect(qemuImg(['info', '--output=json', mCopy]).stdout).not.toMatch(/"dirty-flag": true|"corrupt": true/);
            if (c.dataIntact) expect(guestSha(mCopy)).toBe(baseSha);
          }
        });
      }
    });
  }
});

describe.skipIf(!enabled)('check command line', () => {
  const base = () => {
    const p = join(tmp.path, 'cli.qcow2');
    ok(qemuImg(['create', '-f', 'qcow2', p, '1M']), 'create');
    return p;
  };

  it('-r with a bad value', () => {
    const p = base();
    const m = qimg(['check', '-r', 'bogus', p]);
    const q = qemuImg(['check', '-r', 'bogus', p]);
    expect(m.status).toBe(1);
    expect(q.status).toBe(1);
    // the same two lines, qemu-img's name swapped for qimg's
    expect(m.stderr).toBe(q.stderr.replace(/qemu-img/g, 'qimg'));
    expect(m.stderr).toContain("Unknown option value for -r (expecting 'leaks' or 'all'): bogus\nTry 'qimg --help' for more information");
  });

  it('-r with -U is refused', () => {
    const p = base();
    const m = qimg(['check', '-r', 'leaks', '-U', p]);
    expect(m.status).toBe(1);
    expect(m.stderr).toContain('force-share=on can only be used with read-only images');
  });

  it('-q prints nothing on stdout, problems still on stderr', () => {
    const p = makeBase('quiet.qcow2');
    setRefcount(p, 1, 2n);
    const m = qimg(['check', '-q', p]);
    expect(m.stdout).toBe('');
    expect(m.status).toBe(3);
    expect(m.stderr).toBe('Leaked cluster 1 refcount=2 reference=1\n');
  });

  it('repair output matches qemu-img (leak)', () => {
    const a = makeBase('rep-a.qcow2');
    setRefcount(a, 1, 2n);
    const b = join(tmp.path, 'rep-b.qcow2');
    copyFileSync(a, b);
    // same file name in both outputs
    const q = qemuImg(['check', '-r', 'leaks', 'rep-a.qcow2'], tmp.path);
    const m = qimg(['check', '-r', 'leaks', 'rep-b.qcow2'], { cwd: tmp.path });
    expect(m.status).toBe(q.status);
    expect(m.stdout).toBe(q.stdout);
    expect(m.stderr).toBe(q.stderr);
  });

  it('nonexistent file', () => {
    const m = qimg(['check', join(tmp.path, 'nope.qcow2')]);
    expect(m.status).toBe(1);
    expect(m.stderr).toMatch(/^qimg: .*No such file or directory\n$/);
  });

  it('-f qcow2 on a raw file', () => {
    const p = join(tmp.path, 'plain.raw');
    writeFileSync(p, Buffer.alloc(65536));
    const m = qimg(['check', '-f', 'qcow2', p]);
    expect(m.status).toBe(1);
    expect(m.stderr).toContain('Image is not in qcow2 format');
  });
});
