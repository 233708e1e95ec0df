/**
 * The qcow2 write path under a seeded random workload (sub-cluster and unaligned
 * writes, writes across clusters and L2 tables, zero writes, discards, flushes and
 * reopens at random points, interleaved reads), checked against an in-memory model
 * and then against qemu: `qemu-img convert -O raw` must equal the model, `qemu-img
 * check` must find no corruption and no leak, qemu-io must be able to write into the
 * image afterwards, and qimg must then read what qemu reads.
 *
 * Reproduce a failure with the seed it prints:
 *   QIMG_WORKLOAD_SEED=<seed> npx vitest run test/interop/write-workload.test.ts -t '<config>'
 * QIMG_WORKLOAD_SEED=random explores new seeds; QIMG_WORKLOAD_OPS changes the op count.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openImage, type BlockImage } from '../../src/index.js';
import { qemuAvailable, qemuImg, qemuIo, qimg, tempDir, type RunResult } from '../helpers/qemu.js';
import { hashSeed, Prng, seedFrom } from '../helpers/prng.js';
import { describeDifference, readAll, runWorkload, type WorkloadGeometry } from '../helpers/workload.js';

const enabled = qemuAvailable();
const tmp = tempDir('qimg-workload-');
afterAll(() => tmp.cleanup());

const BASE_SEED = seedFrom('QIMG_WORKLOAD_SEED', 20240601);
const OPS = Number(process.env.QIMG_WORKLOAD_OPS ?? 300);
const MiB = 1 << 20;

/** Whether the CLI has `check` yet (another part of qimg adds it). */
const qimgHasCheck = (() => {
  if (!enabled) return false;
  const r = qimg(['--help']);
  return /^\s+check\b/m.test(r.stdout);
})();

function must(r: RunResult, what: string): RunResult {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stderr}${r.stdout}`);
  return r;
}

/** qemu-io commands on an image; a failed command fails the test. */
function io(dir: string, image: string, cmds: string[]): void {
  const r = qemuIo(['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), image], dir);
  if (r.status !== 0 || /error|failed|fail/i.test(r.stdout + r.stderr)) {
    throw new Error(`qemu-io ${cmds.join('; ')} on ${image}: ${r.stdout}${r.stderr}`);
  }
}

function convertRaw(dir: string, image: string, out: string, extra: string[] = []): Buffer {
  must(qemuImg(['convert', ...extra, '-O', 'raw', image, out], dir), `qemu-img convert ${extra.join(' ')} ${image}`);
  return readFileSync(join(dir, out));
}

/** `qemu-img check`: exit 0, no errors, no corruptions, no leaks. */
function cleanCheck(dir: string, image: string, what: string, extra: string[] = []): void {
  const r = qemuImg(['check', ...extra, '--output=json', image], dir);
  let report: Record<string, unknown> = {};
  try {
    report = JSON.parse(r.stdout) as Record<string, unknown>;
  } catch {
    // reported below with the raw output
  }
  const text = () => `${what}:\n${qemuImg(['check', ...extra, image], dir).stdout}${r.stderr}`;
  expect(r.status, text()).toBe(0);
  expect(report['check-errors'] ?? 0, text()).toBe(0);
  expect(report.corruptions ?? 0, text()).toBe(0);
  expect(report.leaks ?? 0, text()).toBe(0);
}

interface Prepared {
  image: string;
  /** the backing chain's view of the whole disk (what a discard may expose) */
  backingView?: Buffer;
  /** internal snapshot to keep unchanged */
  snapshot?: string;
  /** a raw external data file that must equal the guest disk */
  rawDataFile?: string;
}

interface Config {
  name: string;
  size: number;
  clusterSize: number;
  extendedL2?: boolean;
  lazyRefcounts?: boolean;
  /** write the whole disk through qimg first (many refcount blocks: cache eviction, table growth) */
  prefill?: boolean;
  prepare: (dir: string, rng: Prng) => Prepared;
}

/** qimg create with -o options. */
function qimgCreate(dir: string, image: string, opts: string, size: number | undefined, backing?: string): void {
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts) args.push('-o', opts);
  if (backing) args.push('-b', backing, '-F', 'qcow2');
  args.push(image);
  if (size !== undefined) args.push(String(size));
  must(qimg(args, { cwd: dir }), `qimg ${args.join(' ')}`);
}

/** Some data, zeros and holes written by qemu-io, so that the image is not empty. */
function scribble(dir: string, image: string, size: number, rng: Prng, n = 12): void {
  const cmds: string[] = [];
  for (let i = 0; i < n; i++) {
    const len = rng.int(1, 64) * 4096;
    const off = rng.int(0, Math.floor((size - len) / 512)) * 512;
    if (rng.chance(0.2)) cmds.push(`write -z ${off} ${len}`);
    else cmds.push(`write -P 0x${rng.int(1, 255).toString(16)} ${off} ${len}`);
  }
  io(dir, image, cmds);
}

const fresh = (name: string, size: number, clusterSize: number, opts: string, extendedL2 = false): Config => ({
  name,
  size,
  clusterSize,
  extendedL2,
  prepare: (dir) => {
    qimgCreate(dir, 'img.qcow2', opts, size);
    return { image: 'img.qcow2' };
  },
});

/** An overlay (made by qimg) over a qcow2 base that qemu-io filled. */
const overlay = (name: string, o: { size: number; baseSize: number; clusterSize: number; opts: string; baseOpts: string; extendedL2?: boolean }): Config => ({
  name,
  size: o.size,
  clusterSize: o.clusterSize,
  extendedL2: o.extendedL2,
  prepare: (dir, rng) => {
    must(qemuImg(['create', '-q', '-f', 'qcow2', ...(o.baseOpts ? ['-o', o.baseOpts] : []), 'base.qcow2', String(o.baseSize)], dir), 'base');
    scribble(dir, 'base.qcow2', o.baseSize, rng, 20);
    qimgCreate(dir, 'img.qcow2', o.opts, o.size === o.baseSize ? undefined : o.size, 'base.qcow2');
    const base = convertRaw(dir, 'base.qcow2', 'base.raw');
    const view = Buffer.alloc(o.size);
    base.copy(view, 0, 0, Math.min(base.length, o.size));
    // Some data in the overlay already, so writes meet allocated clusters too.
    scribble(dir, 'img.qcow2', o.size, rng, 6);
    return { image: 'img.qcow2', backingView: view };
  },
});

/** An image with internal snapshots taken by qemu-img, so clusters are shared. */
const withSnapshots = (name: string, size: number, clusterSize: number, opts: string, extendedL2 = false): Config => ({
  name,
  size,
  clusterSize,
  extendedL2,
  prepare: (dir, rng) => {
    qimgCreate(dir, 'img.qcow2', opts, size);
    scribble(dir, 'img.qcow2', size, rng, 24);
    must(qemuImg(['snapshot', '-c', 's1', 'img.qcow2'], dir), 'snapshot s1');
    scribble(dir, 'img.qcow2', size, rng, 8);
    must(qemuImg(['snapshot', '-c', 's2', 'img.qcow2'], dir), 'snapshot s2');
    scribble(dir, 'img.qcow2', size, rng, 4);
    return { image: 'img.qcow2', snapshot: 's1' };
  },
});

/** An image qemu-img convert -c made: most clusters compressed. */
const compressed = (name: string, size: number, clusterSize: number, compression: 'zlib' | 'zstd', extra = ''): Config => ({
  name,
  size,
  clusterSize,
  extendedL2: extra.includes('extended_l2=on'),
  prepare: (dir, rng) => {
    const raw = Buffer.alloc(size);
    // compressible runs, incompressible runs and holes
    for (let p = 0; p < size; p += 32768) {
      const kind = rng.int(0, 3);
      const chunk = raw.subarray(p, Math.min(size, p + 32768));
      if (kind === 0) chunk.fill(rng.int(1, 255));
      else if (kind === 1) rng.data(chunk.length).copy(chunk);
      else if (kind === 2) for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 7 + p) & 0x3f;
    }
    writeFileSync(join(dir, 'src.raw'), raw);
    const opts = `cluster_size=${clusterSize},compression_type=${compression}${extra ? ',' + extra : ''}`;
    must(qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', opts, 'src.raw', 'img.qcow2'], dir), 'convert -c');
    // and a few ordinary clusters among them
    scribble(dir, 'img.qcow2', size, rng, 4);
    return { image: 'img.qcow2' };
  },
});

const CONFIGS: Config[] = [
  // cluster sizes (sizes not multiples of the cluster size: a partial last cluster)
  fresh('cluster_size=512', 4 * MiB - 3 * 512, 512, 'cluster_size=512'),
  fresh('cluster_size=4k', 12 * MiB + 7 * 512, 4096, 'cluster_size=4k'),
  fresh('cluster_size=64k', 16 * MiB - 512, 65536, ''),
  fresh('cluster_size=2M', 16 * MiB - 1024, 2 * MiB, 'cluster_size=2M'),
  // extended L2
  fresh('extended_l2 cluster_size=16k', 8 * MiB + 512, 16384, 'extended_l2=on,cluster_size=16k', true),
  fresh('extended_l2 cluster_size=64k', 16 * MiB - 512, 65536, 'extended_l2=on', true),
  fresh('extended_l2 cluster_size=2M', 16 * MiB, 2 * MiB, 'extended_l2=on,cluster_size=2M', true),
  // refcount widths
  fresh('refcount_bits=1', 4 * MiB, 512, 'refcount_bits=1,cluster_size=512'),
  fresh('refcount_bits=2', 8 * MiB, 4096, 'refcount_bits=2,cluster_size=4k'),
  fresh('refcount_bits=8', 4 * MiB, 512, 'refcount_bits=8,cluster_size=512'),
  fresh('refcount_bits=16 cluster_size=1k', 4 * MiB, 1024, 'refcount_bits=16,cluster_size=1k'),
  fresh('refcount_bits=64', 4 * MiB, 512, 'refcount_bits=64,cluster_size=512'),
  {
    ...fresh('refcount_bits=64 prefilled', 16 * MiB, 512, 'refcount_bits=64,cluster_size=512'),
    // 512 refcount blocks of 64 entries: more than the block cache holds, and a
    // refcount table that has to move several times
    prefill: true,
  },
  { ...fresh('refcount_bits=1 prefilled', 12 * MiB, 512, 'refcount_bits=1,cluster_size=512'), prefill: true },
  fresh('refcount_bits=32 extended_l2', 8 * MiB, 32768, 'refcount_bits=32,cluster_size=32k,extended_l2=on', true),
  // compat, lazy refcounts
  fresh('compat=0.10', 8 * MiB, 4096, 'compat=0.10,cluster_size=4k'),
  fresh('compat=0.10 cluster_size=64k', 16 * MiB, 65536, 'compat=0.10'),
  { ...fresh('lazy_refcounts', 8 * MiB, 4096, 'lazy_refcounts=on,cluster_size=4k'), lazyRefcounts: true },
  // preallocated images: writes land in allocated (zero) clusters
  fresh('preallocation=metadata', 8 * MiB, 4096, 'preallocation=metadata,cluster_size=4k'),
  fresh('preallocation=falloc extended_l2', 8 * MiB, 65536, 'preallocation=falloc,extended_l2=on', true),
  // external data files
  fresh('data_file', 8 * MiB, 65536, 'data_file=img.data'),
  fresh('data_file cluster_size=4k', 8 * MiB, 4096, 'data_file=img.data,cluster_size=4k'),
  {
    ...fresh('data_file_raw', 8 * MiB, 4096, ''),
    prepare: (dir) => {
      qimgCreate(dir, 'img.qcow2', 'data_file=img.data,data_file_raw=on,cluster_size=4k', 8 * MiB);
      return { image: 'img.qcow2', rawDataFile: 'img.data' };
    },
  },
  {
    ...fresh('data_file_raw extended_l2', 8 * MiB, 65536, '', true),
    prepare: (dir) => {
      qimgCreate(dir, 'img.qcow2', 'data_file=img.data,data_file_raw=on,extended_l2=on', 8 * MiB);
      return { image: 'img.qcow2', rawDataFile: 'img.data' };
    },
  },
  fresh('data_file extended_l2', 8 * MiB, 65536, 'data_file=img.data,extended_l2=on', true),
  // overlays
  overlay('overlay over qcow2', { size: 8 * MiB, baseSize: 8 * MiB, clusterSize: 4096, opts: 'cluster_size=4k', baseOpts: '' }),
  overlay('overlay over qcow2, 64k over 4k', { size: 8 * MiB, baseSize: 8 * MiB, clusterSize: 65536, opts: '', baseOpts: 'cluster_size=4k' }),
  overlay('overlay extended_l2', { size: 8 * MiB, baseSize: 8 * MiB, clusterSize: 65536, opts: 'extended_l2=on', baseOpts: '', extendedL2: true }),
  overlay('overlay extended_l2 over extended_l2', { size: 8 * MiB, baseSize: 8 * MiB, clusterSize: 32768, opts: 'extended_l2=on,cluster_size=32k', baseOpts: 'extended_l2=on', extendedL2: true }),
  overlay('overlay bigger than its backing', { size: 10 * MiB + 512, baseSize: 4 * MiB - 512, clusterSize: 65536, opts: '', baseOpts: '' }),
  overlay('overlay bigger than its backing, extended_l2', { size: 9 * MiB, baseSize: 3 * MiB + 512, clusterSize: 16384, opts: 'extended_l2=on,cluster_size=16k', baseOpts: '', extendedL2: true }),
  overlay('overlay compat=0.10', { size: 8 * MiB, baseSize: 8 * MiB, clusterSize: 4096, opts: 'compat=0.10,cluster_size=4k', baseOpts: '' }),
  // internal snapshots: writes hit clusters shared with snapshots
  withSnapshots('snapshots', 8 * MiB, 65536, ''),
  withSnapshots('snapshots cluster_size=4k', 8 * MiB, 4096, 'cluster_size=4k'),
  withSnapshots('snapshots extended_l2', 8 * MiB, 32768, 'extended_l2=on,cluster_size=32k', true),
  withSnapshots('snapshots refcount_bits=2', 6 * MiB, 4096, 'refcount_bits=2,cluster_size=4k'),
  // compressed clusters
  compressed('compressed zlib', 8 * MiB, 65536, 'zlib'),
  compressed('compressed zstd', 8 * MiB, 65536, 'zstd'),
  compressed('compressed zlib cluster_size=4k', 6 * MiB, 4096, 'zlib'),
  compressed('compressed zstd extended_l2', 8 * MiB, 32768, 'zstd', 'extended_l2=on'),
];

async function open(path: string): Promise<BlockImage> {
  return openImage(path, { writable: true });
}

describe.skipIf(!enabled)(`qcow2 write workload (base seed ${BASE_SEED}, ${OPS} ops)`, () => {
  let n = 0;
  for (const c of CONFIGS) {
    it(c.name, { timeout: 120_000 }, async () => {
      const seed = (BASE_SEED ^ hashSeed(c.name)) >>> 0;
      const label = `[${c.name}] QIMG_WORKLOAD_SEED=${BASE_SEED}`;
      const dir = join(tmp.path, `w${n++}`);
      mkdirSync(dir);
      const rng = new Prng(seed ^ 0x5eed);
      const prep = c.prepare(dir, rng);
      const path = join(dir, prep.image);

      const model = convertRaw(dir, prep.image, 'initial.raw');
      expect(model.length, label).toBe(c.size);
      const snapBefore = prep.snapshot ? convertRaw(dir, prep.image, 'snap-before.raw', ['-l', prep.snapshot]) : undefined;

      const cs = c.clusterSize;
      const l2Entries = cs / (c.extendedL2 ? 16 : 8);
      const geometry: WorkloadGeometry = {
        size: c.size,
        clusterSize: cs,
        l2Span: cs * l2Entries,
        subclusterSize: c.extendedL2 ? cs / 32 : cs,
      };

      // the open handle (reopening replaces it), closed once whatever happens
      let img: BlockImage | null = await open(path);
      try {
        expect(img.virtualSize, label).toBe(c.size);
        if (c.prefill) {
          const fill = new Prng(seed ^ 0xf111);
          for (let p = 0; p < c.size; p += MiB) {
            const chunk = fill.data(Math.min(MiB, c.size - p));
            await img.write(p, chunk);
            chunk.copy(model, p);
          }
        }
        await runWorkload(img, model, {
          seed,
          ops: OPS,
          geometry,
          backingView: prep.backingView,
          label,
          // After a flush the file on disk is a consistent image: qemu reads the model from it.
          afterFlush: c.lazyRefcounts
            ? undefined
            : () => {
                cleanCheck(dir, prep.image, `${label}: qemu-img check -U after a flush`, ['-U']);
                const view = convertRaw(dir, prep.image, 'flushed.raw', ['-U']);
                if (!view.equals(model)) throw new Error(`${label}: qemu-img convert -U after a flush vs model: ${describeDifference(view, model)}`);
              },
          reopen: async (old) => {
            img = null;
            await old.close();
            img = await open(path);
            return img;
          },
        });
        const all = await readAll(img);
        expect(all.equals(model), `${label}: qimg's final read vs model: ${describeDifference(all, model)}`).toBe(true);
      } finally {
        const last = img as BlockImage | null;
        img = null;
        await last?.close();
      }

      // qemu's view
      cleanCheck(dir, prep.image, `${label}: qemu-img check after the workload`);
      const qemuView = convertRaw(dir, prep.image, 'after.raw');
      expect(qemuView.equals(model), `${label}: qemu-img convert vs model: ${describeDifference(qemuView, model)}`).toBe(true);
      if (prep.snapshot) {
        const snapAfter = convertRaw(dir, prep.image, 'snap-after.raw', ['-l', prep.snapshot]);
        expect(snapAfter.equals(snapBefore!), `${label}: snapshot ${prep.snapshot} changed: ${describeDifference(snapAfter, snapBefore!)}`).toBe(true);
      }
      if (prep.rawDataFile) {
        const data = readFileSync(join(dir, prep.rawDataFile)).subarray(0, c.size);
        expect(data.equals(model), `${label}: raw data file vs model: ${describeDifference(data, model)}`).toBe(true);
      }

      // qemu-io writes into the image qimg wrote
      const ioRng = new Prng((seed ^ 0x51f0) >>> 0);
      const cmds: string[] = [];
      for (let i = 0; i < 6; i++) {
        const len = ioRng.int(1, 40) * 512;
        const off = ioRng.int(0, Math.floor((c.size - len) / 512)) * 512;
        const r = ioRng.int(0, 3);
        if (r === 0) {
          cmds.push(`write -z ${off} ${len}`);
          model.fill(0, off, off + len);
        } else if (r === 1) {
          // cluster-aligned zero write with unmap allowed
          const coff = Math.floor(off / cs) * cs;
          const clen = Math.min(cs, c.size - coff);
          cmds.push(`write -z -u ${coff} ${clen}`);
          model.fill(0, coff, coff + clen);
        } else {
          const pattern = ioRng.int(1, 255);
          cmds.push(`write -P 0x${pattern.toString(16)} ${off} ${len}`);
          model.fill(pattern, off, off + len);
        }
      }
      io(dir, prep.image, cmds);
      cleanCheck(dir, prep.image, `${label}: qemu-img check after qemu-io`);
      const qemuView2 = convertRaw(dir, prep.image, 'after-io.raw');
      expect(qemuView2.equals(model), `${label}: qemu-img convert after qemu-io vs model: ${describeDifference(qemuView2, model)}`).toBe(true);
      const ro = await openImage(path);
      try {
        const mine = await readAll(ro);
        expect(mine.equals(qemuView2), `${label}: qimg vs qemu after qemu-io: ${describeDifference(mine, qemuView2)}`).toBe(true);
      } finally {
        await ro.close();
      }
      if (qimgHasCheck) {
        const ck = qimg(['check', prep.image], { cwd: dir });
        expect(ck.status, `${label}: qimg check:\n${ck.stdout}${ck.stderr}`).toBe(0);
      }
      expect(existsSync(path)).toBe(true);
    });
  }
});
