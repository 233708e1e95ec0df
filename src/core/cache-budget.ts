/**
 * One memory budget for the metadata caches of every image in a backing chain.
 *
 * Each layer of a chain keeps its own tables (qcow2 L2 tables, pages of large L1
 * tables), but a chain may be 256 layers deep and each layer's image 2^48 bytes big:
 * per-layer limits alone would let such a chain hold gigabytes. The caches of read-only
 * layers register their clean tables here; when the sum passes the budget the least
 * recently used table of the whole chain is dropped, whichever layer holds it.
 */

/** What a cache must offer for its tables to be evicted by the budget. */
export interface BudgetedCache {
  /** drops a clean table; returns false if it cannot go now (dirty, or already gone) */
  evict(key: number): boolean;
}

/** Default chain-wide budget: QEMU's per-image L2 cache maximum, times two. */
export const DEFAULT_CHAIN_CACHE_BYTES = 64 * 1024 * 1024;

interface Charge {
  cache: BudgetedCache;
  key: number;
  bytes: number;
}

export class CacheBudget {
  private used = 0;
  /** every charged table, least recently used first (Map keeps insertion order) */
  private readonly order = new Map<string, Charge>();
  private readonly ids = new WeakMap<BudgetedCache, number>();
  private nextId = 0;

  constructor(readonly limit: number = DEFAULT_CHAIN_CACHE_BYTES) {}

  get usedBytes(): number {
    return this.used;
  }

  private tag(cache: BudgetedCache, key: number): string {
    let id = this.ids.get(cache);
    if (id === undefined) {
      id = this.nextId++;
      this.ids.set(cache, id);
    }
    return `${id}:${key}`;
  }

  /** A table entered `cache`: count it, then evict the oldest tables while over budget. */
  charge(cache: BudgetedCache, key: number, bytes: number): void {
    const tag = this.tag(cache, key);
    const old = this.order.get(tag);
    if (old) {
      this.used -= old.bytes;
      this.order.delete(tag);
    }
    this.order.set(tag, { cache, key, bytes });
    this.used += bytes;
    if (this.used > this.limit) this.shrink(tag);
  }

  /** A table was used again: it becomes the most recent. */
  touch(cache: BudgetedCache, key: number): void {
    const tag = this.tag(cache, key);
    const c = this.order.get(tag);
    if (!c) return;
    this.order.delete(tag);
    this.order.set(tag, c);
  }

  /** A table left its cache by the cache's own decision. */
  release(cache: BudgetedCache, key: number): void {
    const tag = this.tag(cache, key);
    const c = this.order.get(tag);
    if (!c) return;
    this.used -= c.bytes;
    this.order.delete(tag);
  }

  private shrink(keep: string): void {
    for (const [tag, c] of this.order) {
      if (this.used <= this.limit) return;
      // The table just charged stays: its caller is about to use it.
      if (tag === keep) continue;
      if (!c.cache.evict(c.key)) continue;
      this.order.delete(tag);
      this.used -= c.bytes;
    }
  }
}
