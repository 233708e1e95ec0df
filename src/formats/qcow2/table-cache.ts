/**
 * A bounded LRU cache of metadata tables (L2 tables, refcount blocks), keyed by host
 * offset, with write-back of dirty tables. Concurrent requests for the same table
 * share one read. A dirty table leaving the cache goes through `writeBack`, which the
 * owner uses to keep QEMU's ordering (refcounts on disk before the L2 tables that
 * depend on them).
 */
export class TableCache {
  private readonly tables = new Map<number, Buffer>();
  private readonly dirty = new Set<number>();
  private readonly pending = new Map<number, Promise<Buffer>>();

  constructor(
    private readonly capacity: number,
    private readonly load: (offset: number) => Promise<Buffer>,
    private readonly writeBack?: (offset: number, table: Buffer) => Promise<void>,
  ) {}

  async get(offset: number): Promise<Buffer> {
    const hit = this.tables.get(offset);
    if (hit) {
      // Refresh recency: Map keeps insertion order.
      this.tables.delete(offset);
      this.tables.set(offset, hit);
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
    if (!this.tables.has(offset)) this.tables.set(offset, buf);
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
  }

  private async insert(offset: number, buf: Buffer): Promise<void> {
    this.tables.set(offset, buf);
    while (this.tables.size > this.capacity) {
      const oldest = this.tables.keys().next().value as number;
      const table = this.tables.get(oldest)!;
      if (this.dirty.has(oldest)) {
        this.dirty.delete(oldest);
        await this.writeBack!(oldest, table);
      }
      // Writing back awaited: the entry may have been touched again meanwhile.
      if (!this.dirty.has(oldest)) this.tables.delete(oldest);
      else break;
    }
  }

  clear(): void {
    this.tables.clear();
    this.dirty.clear();
  }
}
