/**
 * A bounded LRU cache of metadata tables (L2 tables, refcount blocks), keyed by host
 * offset, with write-back of dirty tables. Concurrent requests for the same table
 * share one read. A dirty table leaving the cache goes through `writeBack`, which the
 * owner uses to keep QEMU's ordering (refcounts on disk before the L2 tables that
 * depend on them). A cache of a read-only layer may also answer to its chain's
 * CacheBudget, which evicts its clean tables when the whole chain holds too many.
 */
import type { BudgetedCache, CacheBudget } from '../../core/cache-budget.js';

export class TableCache implements BudgetedCache {
  private readonly tables = new Map<number, Buffer>();
  private readonly dirty = new Set<number>();
  private readonly pending = new Map<number, Promise<Buffer>>();

  constructor(
    private readonly capacity: number,
    private readonly load: (offset: number) => Promise<Buffer>,
    private readonly writeBack?: (offset: number, table: Buffer) => Promise<void>,
    private readonly budget?: CacheBudget,
  ) {}

  /** The budget's eviction: only clean tables go. */
  evict(offset: number): boolean {
    if (this.dirty.has(offset) || !this.tables.has(offset)) return false;
    this.tables.delete(offset);
    return true;
  }

  async get(offset: number): Promise<Buffer> {
    const hit = this.tables.get(offset);
    if (hit) {
      // Refresh recency: Map keeps insertion order.
      this.tables.delete(offset);
      this.tables.set(offset, hit);
      this.budget?.touch(this, offset);
      return hit;
    }
    let p = this.pending.get(offset);
    if (!p) {
      p = this.load(offset).then(
        async (buf) => {
          this.pending.delete(offset);
          await this.insert(offset, buf);
          return buf;
        },
        (err) => {
          this.pending.delete(offset);
          throw err;
        },
      );
      this.pending.set(offset, p);
    }
    return p;
  }

  /** Adds a table created in memory (a new L2 table or refcount block), dirty. */
  async add(offset: number, buf: Buffer): Promise<void> {
    await this.insert(offset, buf);
    this.dirty.add(offset);
  }

  /**
   * Marks a table modified. The caller passes the buffer it changed: if the table was
   * evicted (and written) meanwhile, it comes back so the change is not lost.
   */
  markDirty(offset: number, buf: Buffer): void {
    if (!this.tables.has(offset)) {
      this.tables.set(offset, buf);
      this.budget?.charge(this, offset, buf.length);
    }
    this.dirty.add(offset);
  }

  isDirty(offset: number): boolean {
    return this.dirty.has(offset);
  }

  get dirtyCount(): number {
    return this.dirty.size;
  }

  /** Writes every dirty table through `writeBack` (in offset order). */
  async flush(): Promise<void> {
    if (!this.writeBack) return;
    const offsets = [...this.dirty].sort((a, b) => a - b);
    for (const off of offsets) {
      const buf = this.tables.get(off);
      this.dirty.delete(off);
      if (buf) await this.writeBack(off, buf);
    }
  }

  /** Forgets a table (its cluster was freed); a dirty copy is dropped unwritten. */
  drop(offset: number): void {
    this.tables.delete(offset);
    this.dirty.delete(offset);
    this.budget?.release(this, offset);
  }

  private async insert(offset: number, buf: Buffer): Promise<void> {
    this.tables.set(offset, buf);
    this.budget?.charge(this, offset, buf.length);
    while (this.tables.size > this.capacity) {
      const oldest = this.tables.keys().next().value as number;
      const table = this.tables.get(oldest)!;
      if (this.dirty.has(oldest)) {
        this.dirty.delete(oldest);
        await this.writeBack!(oldest, table);
      }
      // Writing back awaited: the entry may have been touched again meanwhile.
      if (!this.dirty.has(oldest)) {
        this.tables.delete(oldest);
        this.budget?.release(this, oldest);
      } else break;
    }
  }

  clear(): void {
    if (this.budget) for (const off of this.tables.keys()) this.budget.release(this, off);
    this.tables.clear();
    this.dirty.clear();
  }
}
