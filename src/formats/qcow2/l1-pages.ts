/**
 * A large L1 table of a read-only qcow2 image, read a page at a time as lookups reach
 * it. A 2^48-byte image has a 4 MiB L1 table; a chain of 256 of them would hold 1 GiB
 * if every layer read its table whole at open. Pages live in a TableCache that answers
 * to the chain's CacheBudget, so the whole chain's tables share one bound.
 */
import type { CacheBudget } from '../../core/cache-budget.js';
import type { HostFile } from '../../io/host.js';
import { TableCache } from './table-cache.js';

/** Bytes per page: 8192 entries, 4 TiB of guest space with 64 KiB clusters. */
export const L1_PAGE_BYTES = 64 * 1024;
/** L1 tables up to this size are read whole at open (one read, no paging overhead). */
export const L1_WHOLE_MAX_BYTES = L1_PAGE_BYTES;
/** Pages one image keeps at most (its share of the chain budget may be smaller). */
const PAGES_PER_IMAGE = 64;

export class PagedL1 {
  private readonly pages: TableCache;

  constructor(
    file: HostFile,
    tableOffset: number,
    readonly entries: number,
    budget?: CacheBudget,
  ) {
    const bytes = entries * 8;
    this.pages = new TableCache(
      PAGES_PER_IMAGE,
      (pageOffset) => file.readBytes(tableOffset + pageOffset, Math.min(L1_PAGE_BYTES, bytes - pageOffset)),
      undefined,
      budget,
    );
  }

  /** The page holding entry `index`, and the index of the page's first entry. */
  async pageOf(index: number): Promise<{ page: Buffer; first: number }> {
    const perPage = L1_PAGE_BYTES / 8;
    const first = index - (index % perPage);
    return { page: await this.pages.get(first * 8), first };
  }
}

/**
 * How many entries from `from` (relative to `table`) are zero, counting at most `limit`
 * and never past the end of `table`: a run of L2-less L1 entries skipped in one step.
 */
export function zeroEntriesFrom(table: Buffer, from: number, limit: number): number {
  const end = Math.min(table.length / 8, from + limit);
  let i = from;
  while (i < end && table.readUInt32BE(i * 8) === 0 && table.readUInt32BE(i * 8 + 4) === 0) i++;
  return i - from;
}
