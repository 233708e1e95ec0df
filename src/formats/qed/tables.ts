/**
 * QED L1/L2 tables: little-endian u64 offsets. A small write-back cache keeps L2
 * tables; dirty ones are written by the image in its crash-safe order.
 */

/** Entry `i` of a table as a number; values of 2^53 or more come back as -1 (invalid). */
export function tableEntry(table: Buffer, i: number): number {
  const lo = table.readUInt32LE(i * 8);
  const hi = table.readUInt32LE(i * 8 + 4);
  if (hi >= 0x200000) return -1;
  return hi * 0x100000000 + lo;
}

export function setTableEntry(table: Buffer, i: number, value: number): void {
  table.writeUInt32LE(value % 0x100000000, i * 8);
  table.writeUInt32LE(Math.floor(value / 0x100000000), i * 8 + 4);
}

interface Slot {
  table: Buffer;
  dirty: boolean;
}

/** LRU cache of L2 tables by file offset, bounded by a number of tables. */
export class L2Cache {
  private readonly slots = new Map<number, Slot>();
  constructor(
    private readonly capacity: number,
    private readonly load: (offset: number) => Promise<Buffer>,
    /** writes out dirty tables (the image orders this after the data they point at) */
    private readonly writeBack: (entries: Array<[number, Buffer]>) => Promise<void>,
  ) {}

  async get(offset: number): Promise<Buffer> {
    const hit = this.slots.get(offset);
    if (hit) {
      this.slots.delete(offset);
      this.slots.set(offset, hit);
      return hit.table;
    }
    const table = await this.load(offset);
    await this.insert(offset, { table, dirty: false });
    return table;
  }

  /** A table created in memory (a new L2), dirty from the start. */
  async add(offset: number, table: Buffer): Promise<void> {
    await this.insert(offset, { table, dirty: true });
  }

  markDirty(offset: number): void {
    const s = this.slots.get(offset);
    if (s) s.dirty = true;
  }

  get hasDirty(): boolean {
    for (const s of this.slots.values()) if (s.dirty) return true;
    return false;
  }

  /** Writes every dirty table (in offset order) and marks them clean. */
  async flush(): Promise<void> {
    const dirty = [...this.slots.entries()].filter(([, s]) => s.dirty).sort((a, b) => a[0] - b[0]);
    if (dirty.length === 0) return;
    await this.writeBack(dirty.map(([o, s]) => [o, s.table]));
    for (const [, s] of dirty) s.dirty = false;
  }

  clear(): void {
    this.slots.clear();
  }

  private async insert(offset: number, slot: Slot): Promise<void> {
    while (this.slots.size >= this.capacity) {
      const [oldest, s] = this.slots.entries().next().value as [number, Slot];
      if (s.dirty) await this.writeBack([[oldest, s.table]]);
      this.slots.delete(oldest);
    }
    this.slots.set(offset, slot);
  }
}
