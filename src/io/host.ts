/**
 * The host-storage interface: where an image's bytes live. Formats read and write
 * through it and never care whether it is a local file, a window into a tar archive
 * (an OVA's disk) or, later, a network export.
 */
import type { FileRun } from './sparse.js';

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
  /** bytes the storage occupies (qemu's actual-size) */
  allocatedSize(): Promise<number>;
  /** data/hole run at `pos` (all data when the storage cannot tell) */
  runAt(pos: number, length: number): FileRun;
  close(): Promise<void>;
}
