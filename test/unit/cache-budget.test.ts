/**
 * The chain-wide metadata budget: least recently used tables go first whichever
 * cache holds them, dirty tables never go, and a TableCache that answers to a budget
 * reloads what the budget took.
 */
import { describe, expect, it } from 'vitest';
import { CacheBudget, type BudgetedCache } from '../../src/core/cache-budget.js';
import { TableCache } from '../../src/formats/qcow2/table-cache.js';
import { zeroEntriesFrom } from '../../src/formats/qcow2/l1-pages.js';

class FakeCache implements BudgetedCache {
  readonly held = new Set<number>();
  readonly pinned = new Set<number>();
  evict(key: number): boolean {
    if (this.pinned.has(key) || !this.held.has(key)) return false;
    this.held.delete(key);
    return true;
  }
}

describe('CacheBudget', () => {
  it('evicts the least recently used table of any cache once over the limit', () => {
    const budget = new CacheBudget(300);
    const a = new FakeCache();
    const b = new FakeCache();
    for (const [c, k] of [[a, 1], [b, 1], [a, 2]] as const) {
      c.held.add(k);
      budget.charge(c, k, 100);
    }
    expect(budget.usedBytes).toBe(300);
    budget.touch(a, 1); // a:1 is now newer than b:1
    b.held.add(2);
    budget.charge(b, 2, 100);
    expect([...b.held]).toEqual([2]); // b:1 was the oldest
    expect([...a.held].sort()).toEqual([1, 2]);
    expect(budget.usedBytes).toBe(300);
  });

  it('keeps tables their cache cannot give up, and the one just charged', () => {
    const budget = new CacheBudget(100);
    const a = new FakeCache();
    a.held.add(1);
    a.pinned.add(1);
    budget.charge(a, 1, 100);
    a.held.add(2);
    budget.charge(a, 2, 100);
    expect([...a.held].sort()).toEqual([1, 2]);
    expect(budget.usedBytes).toBe(200);
    budget.release(a, 2);
    expect(budget.usedBytes).toBe(100);
  });

  it('a budgeted TableCache reloads a table the budget evicted', async () => {
    const budget = new CacheBudget(2 * 16);
    const loads: number[] = [];
    const load = async (off: number) => {
      loads.push(off);
      return Buffer.alloc(16, off);
    };
    const c1 = new TableCache(100, load, undefined, budget);
    const c2 = new TableCache(100, load, undefined, budget);
    expect((await c1.get(1))[0]).toBe(1);
    expect((await c2.get(2))[0]).toBe(2);
    expect((await c2.get(3))[0]).toBe(3); // c1's table 1 goes
    expect(budget.usedBytes).toBe(32);
    expect((await c1.get(1))[0]).toBe(1);
    expect(loads).toEqual([1, 2, 3, 1]);
    c1.clear();
    c2.clear();
    expect(budget.usedBytes).toBe(0);
  });

  it('never evicts a dirty table', async () => {
    const budget = new CacheBudget(16);
    const written: number[] = [];
    const c = new TableCache(100, async () => Buffer.alloc(16), async (off) => void written.push(off), budget);
    await c.add(1, Buffer.alloc(16));
    await c.get(2);
    await c.get(3);
    expect(c.isDirty(1)).toBe(true);
    await c.flush();
    expect(written).toEqual([1]);
  });
});

describe('zeroEntriesFrom (runs of empty L1 entries)', () => {
  const table = Buffer.alloc(8 * 10);
  table.writeUInt32BE(0x10000, 5 * 8 + 4); // entry 5 points at an L2 table
  table.writeUInt32BE(0x80000000, 8 * 8); // entry 8: only a flag bit set
  it('counts up to the next non-zero entry, the limit or the table end', () => {
    expect(zeroEntriesFrom(table, 0, 100)).toBe(5);
    expect(zeroEntriesFrom(table, 1, 2)).toBe(2);
    expect(zeroEntriesFrom(table, 5, 100)).toBe(0);
    expect(zeroEntriesFrom(table, 6, 100)).toBe(2);
    expect(zeroEntriesFrom(table, 9, 100)).toBe(1);
    expect(zeroEntriesFrom(table, 10, 100)).toBe(0);
  });
});
