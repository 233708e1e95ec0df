/**
 * A small seeded PRNG (mulberry32) for reproducible randomised tests: the same seed
 * gives the same sequence on every platform and Node version.
 */
export class Prng {
  private state: number;

  constructor(readonly seed: number) {
    this.state = seed >>> 0;
  }

  /** Uniform 32-bit unsigned integer. */
  u32(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }

  /** Uniform float in [0, 1). */
  next(): number {
    return this.u32() / 0x100000000;
  }

  /** Uniform integer in [lo, hi] (inclusive). */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }

  /** True with probability p. */
  chance(p: number): boolean {
    return this.next() < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.next() * items.length)];
  }

  /** Picks a key by weight. */
  weighted<K extends string>(weights: Readonly<Record<K, number>>): K {
    const entries = Object.entries(weights) as Array<[K, number]>;
    const total = entries.reduce((s, [, w]) => s + w, 0);
    let x = this.next() * total;
    for (const [k, w] of entries) {
      x -= w;
      if (x < 0) return k;
    }
    return entries[entries.length - 1][0];
  }

  /**
   * A buffer of `length` bytes that is cheap to make and easy to tell apart: a random
   * 32-bit word pattern, a repeated byte, or a mix (so compressible and incompressible
   * data both occur).
   */
  data(length: number): Buffer {
    const buf = Buffer.allocUnsafe(length);
    const kind = this.int(0, 2);
    if (kind === 0) {
      buf.fill(this.int(1, 255));
    } else {
      // Words from a cheap per-buffer LCG seeded from this PRNG.
      let x = this.u32() | 1;
      const words = Math.floor(length / 4);
      for (let i = 0; i < words; i++) {
        x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
        buf.writeUInt32LE(x, i * 4);
      }
      for (let i = words * 4; i < length; i++) buf[i] = this.int(0, 255);
      if (kind === 2 && length > 16) {
        // half of it a repeated byte: compressible
        const from = this.int(0, length - 1);
        buf.fill(this.int(0, 255), from, Math.min(length, from + Math.floor(length / 2)));
      }
    }
    return buf;
  }
}

/** A seed from the environment (`name`, decimal or "random"), else the fallback. */
export function seedFrom(name: string, fallback: number): number {
  const v = process.env[name];
  if (v === undefined || v === '') return fallback >>> 0;
  if (v === 'random') return (Math.random() * 0x100000000) >>> 0;
  return Number(v) >>> 0;
}

/** A stable 32-bit hash of a string (FNV-1a), to derive per-case seeds. */
export function hashSeed(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}
