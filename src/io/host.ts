/**
 * The host-storage interface: where an image's bytes live. Formats read and write
 * through it and never care whether it is a local file, a window into a tar archive
 * (an OVA's disk) or, later, a network export.
 */
import type { FileRun } from './sparse.js';

/** One run of a storage's own block status. */
export interface HostRun {
  length: number;
  /** the range holds data (false: a hole) */
  data: boolean;
  /** the range reads as zeros */
  zero: boolean;
}

export interface HostFile {
  /** the name the storage was opened by (for messages and relative references) */
  readonly path: string;
  readonly writable: boolean;
  /** length in bytes (as of open, or as changed through this object) */
  readonly size: number;
  /** a local file descriptor for native calls (fallocate); absent for other storage */
  readonly fd?: number;
  /** a block device (its size cannot change; no holes) */
  readonly isBlockDevice?: boolean;
  /** Fills `buf` from `pos`; bytes past the end read as zeros. */
  read(buf: Buffer, pos: number): Promise<void>;
  readBytes(pos: number, length: number): Promise<Buffer>;
  write(buf: Buffer, pos: number): Promise<void>;
  truncate(length: number): Promise<void>;
  flush(): Promise<void>;
  /** bytes the storage occupies (qemu's actual-size); undefined when it cannot tell (a remote export) */
  allocatedSize(): Promise<number | undefined>;
  /** data/hole run at `pos` (all data when the storage cannot tell) */
  runAt(pos: number, length: number): FileRun;
  /**
   * Storage that knows its own allocation without local file calls (an NBD export's
   * base:allocation): the status at `pos`, preferred over runAt when present.
   */
  statusAt?(pos: number, length: number): Promise<HostRun>;
  /**
   * Zeroes a range natively (NBD WRITE_ZEROES); `mayUnmap` allows freeing it, `fast`
   * asks for failure rather than a slow write. Absent: callers write zeros.
   */
  writeZeroes?(pos: number, length: number, opts: { mayUnmap?: boolean; fast?: boolean }): Promise<void>;
  /** Releases a range (NBD TRIM); advisory. */
  discard?(pos: number, length: number): Promise<void>;
  /** Storage on another host (NBD, HTTP): no local locks, no real path. */
  readonly remote?: boolean;
  close(): Promise<void>;
}
