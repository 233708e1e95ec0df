/**
 * A bounded LRU cache of metadata tables (L2 tables, refcount blocks), keyed by host
 * offset. Concurrent requests for the same table share one read.
 */
export class TableCache {
  private readonly tables = new Map<number, Buffer>();
  private readonly pending = new Map<number, Promise<Buffer>>();

  constructor(
    private readonly capacity: number,
    private readonly load: (offset: number) => Promise<Buffer>,
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
        (buf) => {
          this.pending.delete(offset);
          this.insert(offset, buf);
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

  private insert(offset: number, buf: Buffer): void {
    this.tables.set(offset, buf);
    while (this.tables.size > this.capacity) {
      const oldest = this.tables.keys().next().value as number;
      this.tables.delete(oldest);
    }
  }

  clear(): void {
    this.tables.clear();
  }
}
