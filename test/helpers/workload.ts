/**
 * A seeded random I/O workload against a BlockImage, checked step by step against an
 * in-memory model of the guest disk. The generator aims at the places where a qcow2
 * writer goes wrong: sub-cluster and unaligned writes (copy-on-write), writes across
 * cluster and L2-table boundaries, the last (possibly partial) cluster, zero writes
 * with and without unmap, discards, flushes and reopening at random points.
 */
import type { BlockImage } from '../../src/index.js';
import { Prng } from './prng.js';

/** First differing byte of two equally long buffers, or -1. */
export function firstDifference(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  if (a.equals(b)) return -1;
  const CHUNK = 65536;
  for (let p = 0; p < a.length; p += CHUNK) {
    const end = Math.min(a.length, p + CHUNK);
    if (!a.subarray(p, end).equals(b.subarray(p, end))) {
      for (let i = p; i < end; i++) if (a[i] !== b[i]) return i;
    }
  }
  return -1;
}

/** "at byte N: got 0x.., want 0x.. (M bytes differ in that 64 KiB)" */
export function describeDifference(got: Buffer, want: Buffer, base = 0): string {
  const i = firstDifference(got, want);
  if (i < 0) return 'identical';
  if (got.length !== want.length) return `lengths differ: ${got.length} vs ${want.length}`;
  const win = Math.floor(i / 65536) * 65536;
  let n = 0;
  for (let k = win; k < Math.min(got.length, win + 65536); k++) if (got[k] !== want[k]) n++;
  const hex = (b: Buffer, at: number) => b.subarray(at, Math.min(b.length, at + 8)).toString('hex');
  return `first difference at guest byte ${base + i} (0x${(base + i).toString(16)}): got ${hex(got, i)}, want ${hex(want, i)}; ${n} bytes differ in the 64 KiB around it`;
}

export interface WorkloadGeometry {
  size: number;
  clusterSize: number;
  /** bytes one L2 table maps */
  l2Span: number;
  /** allocation unit of zero writes (subcluster with extended L2) */
  subclusterSize: number;
}

export type RangeKind = 'small' | 'sector' | 'subcluster' | 'clusters' | 'crossCluster' | 'crossL2' | 'last' | 'large' | 'head';

/** A random range of the given shape, clamped to the image. */
export function randomRange(rng: Prng, g: WorkloadGeometry, kind: RangeKind): [number, number] {
  const { size, clusterSize: cs, l2Span, subclusterSize: sc } = g;
  const clusters = Math.ceil(size / cs);
  let off: number;
  let len: number;
  switch (kind) {
    case 'small':
      off = rng.int(0, size - 1);
      len = rng.int(1, Math.min(cs, 8192));
      break;
    case 'sector':
      off = rng.int(0, size / 512 - 1) * 512;
      len = rng.int(1, 16) * 512;
      break;
    case 'subcluster':
      off = rng.int(0, Math.floor(size / sc) - 1) * sc;
      len = rng.int(1, 6) * sc;
      break;
    case 'clusters':
      off = rng.int(0, clusters - 1) * cs;
      len = rng.int(1, Math.max(1, Math.min(4, Math.floor((4 << 20) / cs)))) * cs;
      break;
    case 'crossCluster': {
      const c = rng.int(1, Math.max(1, clusters - 1));
      off = c * cs - rng.int(1, Math.min(cs, 4096));
      len = rng.int(2, Math.min(cs + 8192, 3 << 20));
      break;
    }
    case 'crossL2': {
      const tables = Math.ceil(size / l2Span);
      if (tables < 2) return randomRange(rng, g, 'crossCluster');
      const t = rng.int(1, tables - 1);
      off = t * l2Span - rng.int(1, Math.min(2 * cs, 1 << 20));
      len = rng.int(2, Math.min(3 * cs, 3 << 20));
      break;
    }
    case 'last':
      off = Math.max(0, size - rng.int(1, Math.min(2 * cs, 1 << 20)));
      len = rng.chance(0.5) ? size - off : rng.int(1, size - off);
      break;
    case 'head':
      off = rng.int(0, Math.min(size, 2 * cs) - 1);
      len = rng.int(1, Math.min(cs, 65536));
      break;
    case 'large':
      off = rng.int(0, size - 1);
      len = rng.int(cs, Math.max(cs, Math.min(4 * cs, 3 << 20)));
      break;
  }
  off = Math.max(0, Math.min(off, size - 1));
  len = Math.max(1, Math.min(len, size - off));
  return [off, len];
}

export interface WorkloadOptions {
  seed: number;
  ops: number;
  geometry: WorkloadGeometry;
  /** what a discarded byte may read as besides zeros and its old content (the backing file's view) */
  backingView?: Buffer;
  /** reopen the image (close and open again) — returns the new handle */
  reopen: (img: BlockImage) => Promise<BlockImage>;
  /** describe the case in failure messages */
  label: string;
  /**
   * called after some flushes (the image still open): checks of the on-disk state,
   * which a flush must have made consistent
   */
  afterFlush?: (opIndex: number) => Promise<void> | void;
}

const WRITE_KINDS: Record<RangeKind, number> = {
  small: 5,
  sector: 3,
  subcluster: 2,
  clusters: 2,
  crossCluster: 3,
  crossL2: 2,
  last: 2,
  large: 1,
  head: 1,
};

const ZERO_KINDS: Record<RangeKind, number> = {
  small: 2,
  sector: 2,
  subcluster: 3,
  clusters: 4,
  crossCluster: 2,
  crossL2: 1,
  last: 2,
  large: 2,
  head: 0,
};

const DISCARD_KINDS: Record<RangeKind, number> = {
  small: 1,
  sector: 1,
  subcluster: 1,
  clusters: 4,
  crossCluster: 2,
  crossL2: 1,
  last: 2,
  large: 2,
  head: 0,
};

/**
 * Runs the workload on `img`, keeping `model` (the whole guest disk) in step; returns
 * the image handle (reopening replaces it). Throws with the seed and the recent
 * operations on the first disagreement.
 */
export async function runWorkload(img: BlockImage, model: Buffer, o: WorkloadOptions): Promise<BlockImage> {
  const rng = new Prng(o.seed);
  const g = o.geometry;
  const log: string[] = [];
  const fail = (i: number, what: string): never => {
    throw new Error(`${o.label} (seed ${o.seed}), op #${i}: ${what}\nlast operations:\n  ${log.slice(-12).join('\n  ')}`);
  };
  const verify = async (i: number, off: number, len: number, why: string) => {
    const buf = Buffer.alloc(len);
    await img.read(off, buf);
    const want = model.subarray(off, off + len);
    if (!buf.equals(want)) fail(i, `${why}: read [${off}, +${len}) disagrees with the model: ${describeDifference(buf, want, off)}`);
  };

  let flushChecks = 0;
  for (let i = 0; i < o.ops; i++) {
    const op = rng.weighted({ write: 45, zero: 14, discard: 9, read: 20, flush: 5, reopen: 2, verifyAll: 1 });
    try {
      switch (op) {
        case 'write': {
          const [off, len] = randomRange(rng, g, rng.weighted(WRITE_KINDS));
          const data = rng.data(len);
          log.push(`write ${off} +${len}`);
          await img.write(off, data);
          data.copy(model, off);
          if (rng.chance(0.3)) await verify(i, Math.max(0, off - 512), Math.min(g.size, off + len + 512) - Math.max(0, off - 512), 'after write');
          break;
        }
        case 'zero': {
          const [off, len] = randomRange(rng, g, rng.weighted(ZERO_KINDS));
          const mayUnmap = rng.chance(0.5);
          log.push(`writeZeroes ${off} +${len} mayUnmap=${mayUnmap}`);
          await img.writeZeroes(off, len, { mayUnmap });
          model.fill(0, off, off + len);
          if (rng.chance(0.5)) await verify(i, off, len, 'after writeZeroes');
          break;
        }
        case 'discard': {
          const [off, len] = randomRange(rng, g, rng.weighted(DISCARD_KINDS));
          log.push(`discard ${off} +${len}`);
          await img.discard(off, len);
          // Discarded content is the format's business (zeros or the backing file):
          // check that each sector is one of those or unchanged, then adopt it.
          const now = Buffer.alloc(len);
          await img.read(off, now);
          const zero = Buffer.alloc(512);
          // (per 512-byte sector of the guest: clusters are made of whole sectors)
          for (let p = 0; p < len; ) {
            const n = Math.min(512 - ((off + p) % 512), len - p);
            const got = now.subarray(p, p + n);
            const old = model.subarray(off + p, off + p + n);
            const fromBacking = o.backingView?.subarray(off + p, off + p + n);
            if (!got.equals(old) && !got.equals(zero.subarray(0, n)) && !(fromBacking && got.equals(fromBacking))) {
              fail(i, `discard left bytes at ${off + p} that are neither the old data, zeros nor the backing file's`);
            }
            p += n;
          }
          now.copy(model, off);
          break;
        }
        case 'read': {
          const [off, len] = randomRange(rng, g, rng.weighted(WRITE_KINDS));
          log.push(`read ${off} +${len}`);
          await verify(i, off, len, 'read');
          break;
        }
        case 'flush':
          log.push('flush');
          await img.flush();
          if (o.afterFlush && flushChecks < 2 && rng.chance(0.3)) {
            flushChecks++;
            log.push('check the flushed image on disk');
            await o.afterFlush(i);
          }
          break;
        case 'reopen':
          log.push('close + reopen');
          img = await o.reopen(img);
          break;
        case 'verifyAll':
          log.push('read everything');
          await verify(i, 0, g.size, 'full read');
          break;
      }
    } catch (err) {
      if (err instanceof Error && err.message.startsWith(o.label)) throw err;
      fail(i, `${op} threw: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    }
  }
  return img;
}

/** Reads a whole image through qimg. */
export async function readAll(img: BlockImage): Promise<Buffer> {
  const buf = Buffer.alloc(img.virtualSize);
  const CHUNK = 4 << 20;
  for (let p = 0; p < buf.length; p += CHUNK) await img.read(p, buf.subarray(p, Math.min(buf.length, p + CHUNK)));
  return buf;
}
