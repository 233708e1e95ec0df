/**
 * The BlockImage interface: every opened image (raw file, qcow2 layer, ...) is one
 * object with this shape. Operations (convert, map, compare, ...) speak only this.
 */
import { QimgError } from './errors.js';

/**
 * The check every driver's write paths start with: the image was opened for writing
 * and [offset, offset+length) lies inside the disk.
 */
export function assertWritableRange(img: { readonly filename: string; readonly virtualSize: number }, writable: boolean, offset: number, length: number): void {
  if (!writable) throw new QimgError('image is opened read-only', { file: img.filename });
  if (offset < 0 || length < 0 || offset + length > img.virtualSize) {
    throw new QimgError(`write beyond the end of the image (offset ${offset}, length ${length})`, { file: img.filename });
  }
}

/**
 * What one layer says about the range starting at an offset: qemu's block status
 * flags for this layer alone (no backing resolution).
 */
export interface LayerStatus {
  /** bytes from the asked offset that share this status (> 0) */
  length: number;
  /** reads come from data stored in this layer */
  data: boolean;
  /** reads as zeros */
  zero: boolean;
  /** host offset of the data in `file` when it is stored unencoded */
  hostOffset?: number;
  /** the file holding hostOffset (the image file, or its external data file) */
  file?: string;
  /** stored compressed */
  compressed?: boolean;
  /**
   * reported as data (qemu's status for formats without block status) but known from
   * metadata to read as zeros: copies skip reading it, `map` still shows qemu's ranges
   */
  readsAsZero?: boolean;
}

export type ExtentKind = 'data' | 'zero' | 'unallocated';

/** A chain-resolved range: which layer answers, and how. */
export interface Extent {
  offset: number;
  length: number;
  /** data: must be read; zero: reads as zeros from metadata; unallocated: nowhere in the chain */
  kind: ExtentKind;
  /** chain level that answered (0 = top); for unallocated ranges the bottom's level */
  depth: number;
  /** allocated in some layer (qemu's "present") */
  present: boolean;
  /** qemu's "data" flag */
  data: boolean;
  /** qemu's "zero" flag */
  zero: boolean;
  compressed: boolean;
  hostOffset?: number;
  file?: string;
  /** a data range the layer knows reads as zeros (LayerStatus.readsAsZero) */
  knownZero?: boolean;
}

/** Data `info` reports, shaped as qemu-img's ImageInfo (field names mapped by the CLI). */
export interface ImageInfo {
  filename: string;
  format: string;
  virtualSize: number;
  actualSize?: number;
  clusterSize?: number;
  dirtyFlag?: boolean;
  encrypted?: boolean;
  backingFilename?: string;
  fullBackingFilename?: string;
  backingFilenameFormat?: string;
  snapshots?: SnapshotInfo[];
  formatSpecific?: { type: string; data: Record<string, unknown> };
}

export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockSec: number;
  vmClockNsec: number;
  /** undefined when the snapshot records none (-1) */
  icount?: number;
}

export type CompressionAlgorithm = 'deflate' | 'zlib' | 'zstd';

export interface BlockImage {
  readonly format: string;
  /** the name the image was opened by */
  readonly filename: string;
  readonly virtualSize: number;
  /**
   * QEMU's block status for this format never answers past a multiple of this many
   * bytes (qcow2: the guest span of one L2 table); qimg's may, to cross empty terabytes
   * in one step. Only `compare -s` shows the difference (QEMU's EOF flag).
   */
  readonly statusSpan?: number;
  /** the next image down the backing chain, or null */
  readonly backing: BlockImage | null;
  readonly readOnly: boolean;

  /** Fills `buf` with guest data from `offset`, resolving through the backing chain. */
  read(offset: number, buf: Buffer): Promise<void>;
  /** Writes to disjoint ranges may run at once (raw: each is one positional write). */
  readonly concurrentWrites?: boolean;
  /** Writes guest data at `offset` (the image must be open read-write); the caller may
   * reuse `data` once this resolves, so an implementation keeps no reference to it. */
  write(offset: number, data: Buffer): Promise<void>;
  /** Makes a range read as zeros; `mayUnmap` allows releasing its storage. */
  writeZeroes(offset: number, length: number, opts?: { mayUnmap?: boolean }): Promise<void>;
  /** Drops a range's content (it may read as zeros or from the backing file afterwards). */
  discard(offset: number, length: number): Promise<void>;
  /** This layer's own status at `offset` (at most `length` bytes; offset < virtualSize). */
  layerStatus(offset: number, length: number): Promise<LayerStatus>;
  /** The unit in which the image allocates storage (zero detection never splits one). */
  readonly allocationUnit: number;
  /**
   * Formats that store compressed clusters: the algorithm ('deflate' raw with a 12-bit
   * window as qcow2, 'zlib' = RFC 1950 stream at the default level, 'zstd' frame) and
   * the unit. `alwaysCompressed`: every cluster is stored compressed, even one that
   * does not shrink (a stream-optimized VMDK has no other kind).
   */
  readonly compression?: { algorithm: CompressionAlgorithm; clusterSize: number; alwaysCompressed?: boolean };
  /**
   * Writes are recorded by range (persistent dirty bitmaps): a copy onto this image writes
   * exactly the ranges qemu-img would, nothing widened to allocation units.
   */
  readonly tracksWrites?: boolean;
  /** Every write is stored compressed: convert hands it whole compressed units even without -c. */
  readonly compressesAllWrites?: boolean;
  /** Stores one unit (cluster) already compressed with `compression.algorithm`. */
  writeCompressed?(offset: number, compressed: Buffer): Promise<void>;
  /** A read-only view of an internal snapshot, by id and/or name (formats that have them). */
  snapshot?(spec: { id?: string; name?: string }): Promise<BlockImage>;
  /** Changes the virtual size (formats that can); new space reads as zeros. */
  resize?(size: number, opts?: { preallocation?: 'off' | 'metadata' | 'falloc' | 'full' }): Promise<void>;
  /** Rewrites the recorded backing file name and format (rebase); undefined removes it. */
  setBacking?(name: string | undefined, format: string | undefined): Promise<void>;
  /** Drops all of this layer's data (commit); reads then fall through to the backing file. */
  makeEmpty?(): Promise<void>;
  /**
   * Where a guest range is stored as plain bytes in a local file (raw images): the file
   * descriptor, the host offset and how many bytes from there (0 past the end of the
   * file). For in-kernel copies (convert -C); absent or undefined: read and write.
   */
  plainRange?(offset: number, length: number): { fd: number; hostOffset: number; length: number } | undefined;
  /**
   * An image read from a stream (standard input): reads must come in increasing
   * offsets. With `sizeKnown` false (a raw pipe) the size is only known at the end:
   * `readNext` then takes the bytes in order and returns fewer than asked at the end.
   */
  readonly stream?: { readonly sizeKnown: boolean; readNext?(buf: Buffer): Promise<number> };
  /**
   * Zeroing is recorded in metadata (qcow2 v3 zero clusters): cheap whatever the range
   * held, so an NBD client's FAST_ZERO request may be honoured.
   */
  readonly zeroesInMetadata?: boolean;
  /**
   * The dirty bits of persistent bitmap `name` (formats that have them), for export
   * over NBD: refused as QEMU refuses a missing or inconsistent bitmap. `bits` is the
   * bitmap itself (bit n = byte n/8, bit n%8 covers [n*granularity, (n+1)*granularity)),
   * kept current while the image is open; `enabled`: writes set bits.
   */
  dirtyBitmap?(name: string): Promise<{ granularity: number; enabled: boolean; bits: Buffer }>;
  /** Persistent dirty bitmaps stored in the image (formats that have them). */
  persistentBitmaps?(): Promise<Array<{ name: string; granularity: number }>>;
  /** Data the `info` command prints. */
  info(): Promise<ImageInfo>;
  flush(): Promise<void>;
  /** Closes this image and its whole backing chain. */
  close(): Promise<void>;
}
