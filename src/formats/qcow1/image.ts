/**
 * An open qcow (v1) image: one L1 table, L2 tables of 2^l2_bits big-endian entries,
 * data clusters (bit 63 set: compressed, raw deflate, size in the bits below it).
 * Writes allocate at the end of the file; data reaches the disk before the L2 entry
 * that points at it, and a new L2 table before its L1 entry.
 */
import { assertWritableRange, type BlockImage, type ImageInfo, type LayerStatus } from '../../core/block-image.js';
import { CorruptImageError, QimgError } from '../../core/errors.js';
import { fullBackingName } from '../../core/open.js';
import { Mutex } from '../../core/mutex.js';
import type { HostFile } from '../../io/host.js';
import { QCOW_CRYPT_NONE, type QcowHeader } from './header.js';
import { zlib } from '../../core/lazy-builtins.js';
import type { Qcow2Encryption } from '../qcow2/encryption.js';

const COMPRESSED_HI = 0x80000000;
/** cached L2 tables (at most 64 KiB each) */
const L2_CACHE_TABLES = 256;
const ZERO_CHUNK = 4 * 1024 * 1024;

interface Run {
  kind: 'unallocated' | 'data' | 'compressed';
  length: number;
  host?: number;
  /** compressed clusters: the stored bytes */
  csize?: number;
}

export class QcowImage implements BlockImage {
  /** the legacy AES cipher of an encrypted image opened with its key */
  cipher: Qcow2Encryption | null = null;
  readonly format = 'qcow';
  readonly clusterSize: number;
  readonly l2Entries: number;
  readonly l2Span: number;
  private readonly l2Cache = new Map<number, { table: Buffer; dirty: boolean }>();
  private readonly l1Dirty = new Set<number>();
  private readonly lock = new Mutex();
  private compressedCache: { host: number; data: Buffer } | null = null;
  /** the end of the file as allocation sees it (QEMU asks the file's length) */
  private fileEnd: number;
  unsafeCache = false;

  constructor(
    readonly file: HostFile,
    readonly filename: string,
    readonly header: QcowHeader,
    readonly backingName: string | undefined,
    /** the loaded part of the L1 table: entries past it (past the end of the file) are 0 */
    private l1: Buffer,
    readonly backing: BlockImage | null,
  ) {
    this.clusterSize = 2 ** header.clusterBits;
    this.l2Entries = 2 ** header.l2Bits;
    this.l2Span = this.clusterSize * this.l2Entries;
    this.fileEnd = file.size;
  }

  get virtualSize(): number {
    // QEMU counts whole sectors of the recorded size
    return Math.floor(this.header.size / 512) * 512;
  }
  get readOnly(): boolean {
    return !this.file.writable;
  }
  get allocationUnit(): number {
    return this.clusterSize;
  }
  get compression(): { algorithm: 'deflate'; clusterSize: number } {
    return { algorithm: 'deflate', clusterSize: this.clusterSize };
  }

  private l2OffsetAt(l1Index: number): number {
    if ((l1Index + 1) * 8 > this.l1.length) return 0;
    const hi = this.l1.readUInt32BE(l1Index * 8);
    if (hi >= 0x200000) throw new CorruptImageError(this.filename, `L2 table offset 0x${this.l1.readBigUInt64BE(l1Index * 8).toString(16)} in L1 entry ${l1Index} is too large`);
    return hi * 0x100000000 + this.l1.readUInt32BE(l1Index * 8 + 4);
  }

  private async loadL2(offset: number): Promise<Buffer> {
    const hit = this.l2Cache.get(offset);
    if (hit) {
      this.l2Cache.delete(offset);
      this.l2Cache.set(offset, hit);
      return hit.table;
    }
    const table = await this.file.readBytes(offset, this.l2Entries * 8);
    await this.cacheL2(offset, table, false);
    return table;
  }

  private async cacheL2(offset: number, table: Buffer, dirty: boolean): Promise<void> {
    while (this.l2Cache.size >= L2_CACHE_TABLES) {
      const [old, slot] = this.l2Cache.entries().next().value as [number, { table: Buffer; dirty: boolean }];
      if (slot.dirty) {
        await this.sync();
        await this.file.write(slot.table, old);
      }
      this.l2Cache.delete(old);
    }
    this.l2Cache.set(offset, { table, dirty });
  }

  /** Entry `i` of an L2 table, classified. */
  private entry(table: Buffer, i: number, guest: number): { kind: Run['kind']; host: number; csize: number } {
    const hi = table.readUInt32BE(i * 8);
    const lo = table.readUInt32BE(i * 8 + 4);
    if (hi === 0 && lo === 0) return { kind: 'unallocated', host: 0, csize: 0 };
    if (hi & COMPRESSED_HI) {
      const e = (BigInt(hi) << 32n) | BigInt(lo);
      const shift = BigInt(63 - this.header.clusterBits);
      const host = e & ((1n << shift) - 1n);
      const csize = Number((e >> shift) & BigInt(this.clusterSize - 1));
      if (host > BigInt(Number.MAX_SAFE_INTEGER)) throw new CorruptImageError(this.filename, `compressed cluster offset 0x${host.toString(16)} at guest offset ${guest} is too large`);
      return { kind: 'compressed', host: Number(host), csize };
    }
    if (hi >= 0x200000) throw new CorruptImageError(this.filename, `cluster offset 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} at guest offset ${guest} is too large`);
    const host = hi * 0x100000000 + lo;
    // QEMU fails such reads with EIO
    if (host % 512 !== 0) throw new CorruptImageError(this.filename, `unaligned cluster offset 0x${host.toString(16)} at guest offset ${guest}`);
    return { kind: 'data', host, csize: 0 };
  }

  private async lookup(offset: number, maxLen: number): Promise<Run> {
    const cs = this.clusterSize;
    const l1Index = Math.floor(offset / this.l2Span);
    const len = Math.min(maxLen, (l1Index + 1) * this.l2Span - offset);
    const l2Offset = this.l2OffsetAt(l1Index);
    if (l2Offset === 0) return { kind: 'unallocated', length: len };
    const table = await this.loadL2(l2Offset);
    const first = Math.floor((offset % this.l2Span) / cs);
    const inCluster = offset % cs;
    const n = Math.ceil((inCluster + len) / cs);
    const e0 = this.entry(table, first, offset - inCluster);
    if (e0.kind === 'compressed') return { kind: 'compressed', length: Math.min(len, cs - inCluster), host: e0.host, csize: e0.csize };
    let i = first + 1;
    for (; i < first + n; i++) {
      const e = this.entry(table, i, offset - inCluster + (i - first) * cs);
      if (e.kind !== e0.kind || (e.kind === 'data' && e.host !== e0.host + (i - first) * cs)) break;
    }
    const length = Math.min(len, (i - first) * cs - inCluster);
    return e0.kind === 'data' ? { kind: 'data', length, host: e0.host + inCluster } : { kind: 'unallocated', length };
  }

  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    const run = await this.lookup(offset, Math.min(length, this.virtualSize - offset));
    // QEMU's qcow reports encrypted data as it does compressed data: no host offset
    if (run.kind === 'data' && this.header.cryptMethod !== QCOW_CRYPT_NONE) return { length: run.length, data: true, zero: false, compressed: true };
    if (run.kind === 'data') return { length: run.length, data: true, zero: false, hostOffset: run.host, file: this.filename };
    if (run.kind === 'compressed') return { length: run.length, data: true, zero: false, compressed: true };
    return { length: run.length, data: false, zero: false };
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    if (offset < 0 || offset + buf.length > this.virtualSize) {
      throw new QimgError(`read beyond the end of the image (offset ${offset}, length ${buf.length})`, { file: this.filename });
    }
    for (let done = 0; done < buf.length; ) {
      const pos = offset + done;
      const run = await this.lookup(pos, buf.length - done);
      const part = buf.subarray(done, done + run.length);
      if (run.kind === 'data' && this.cipher) await this.cipher.read(this.file, part, run.host!, pos);
      else if (run.kind === 'data') await this.file.read(part, run.host!);
      else if (run.kind === 'compressed') (await this.decompress(run, pos)).copy(part, 0, pos % this.clusterSize);
      else await this.readBacking(pos, part);
      done += run.length;
    }
  }

  private async decompress(run: Run, guest: number): Promise<Buffer> {
    const cached = this.compressedCache;
    if (cached && cached.host === run.host) return cached.data;
    const raw = await this.file.readBytes(run.host!, run.csize!);
    let data: Buffer;
    try {
      data = zlib().inflateRawSync(raw, { windowBits: 12, maxOutputLength: this.clusterSize, finishFlush: 2 /* Z_SYNC_FLUSH */ });
    } catch {
      throw new CorruptImageError(this.filename, `error while reading at byte ${guest - (guest % this.clusterSize)}: compressed cluster at 0x${run.host!.toString(16)} is damaged`);
    }
    if (data.length !== this.clusterSize) {
      throw new CorruptImageError(this.filename, `error while reading at byte ${guest - (guest % this.clusterSize)}: compressed cluster at 0x${run.host!.toString(16)} is damaged`);
    }
    this.compressedCache = { host: run.host!, data };
    return data;
  }

  private async readBacking(offset: number, part: Buffer): Promise<void> {
    const b = this.backing;
    const n = b ? Math.max(0, Math.min(part.length, b.virtualSize - offset)) : 0;
    if (n > 0) await b!.read(offset, part.subarray(0, n));
    part.fill(0, n);
  }

  private assertWritable(offset: number, length: number): void {
    assertWritableRange(this, this.file.writable, offset, length);
    // qimg reads AES qcow images (to convert them out); it writes none
    if (this.header.cryptMethod !== QCOW_CRYPT_NONE) throw new QimgError('qimg does not write to AES-encrypted qcow (v1) images; convert them to another format', { file: this.filename });
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.assertWritable(offset, data.length);
    if (data.length === 0) return;
    await this.lock.run(async () => {
      this.compressedCache = null;
      for (let done = 0; done < data.length; ) {
        const pos = offset + done;
        const run = await this.lookup(pos, data.length - done);
        const piece = data.subarray(done, done + run.length);
        if (run.kind === 'data') await this.file.write(piece, run.host!);
        else await this.allocate(pos, run, piece);
        done += run.length;
      }
    });
  }

  /** The L2 table for `l1Index`; a new one is placed at the end of the file. */
  private async l2ForWrite(l1Index: number): Promise<{ offset: number; table: Buffer }> {
    const existing = this.l2OffsetAt(l1Index);
    if (existing !== 0) return { offset: existing, table: await this.loadL2(existing) };
    const offset = Math.ceil(this.fileEnd / this.clusterSize) * this.clusterSize;
    const table = Buffer.alloc(this.l2Entries * 8);
    await this.file.write(table, offset);
    this.fileEnd = offset + table.length;
    await this.cacheL2(offset, table, true);
    if (this.l1.length < (l1Index + 1) * 8) {
      const grown = Buffer.alloc((l1Index + 1) * 8);
      this.l1.copy(grown);
      this.l1 = grown;
    }
    this.l1.writeUInt32BE(Math.floor(offset / 0x100000000), l1Index * 8);
    this.l1.writeUInt32BE(offset % 0x100000000, l1Index * 8 + 4);
    this.l1Dirty.add(l1Index);
    return { offset, table };
  }

  private setL2(slot: { offset: number; table: Buffer }, index: number, hi: number, lo: number): void {
    slot.table.writeUInt32BE(hi >>> 0, index * 8);
    slot.table.writeUInt32BE(lo >>> 0, index * 8 + 4);
    const c = this.l2Cache.get(slot.offset);
    if (c) c.dirty = true;
  }

  /**
   * New clusters for `data` at guest `pos`: the rest of the first and last cluster
   * comes from the compressed cluster being replaced, or from the backing file.
   */
  private async allocate(pos: number, run: Run, data: Buffer): Promise<void> {
    const cs = this.clusterSize;
    const start = pos - (pos % cs);
    const end = Math.ceil((pos + run.length) / cs) * cs;
    const slot = await this.l2ForWrite(Math.floor(pos / this.l2Span));
    const buf = Buffer.alloc(end - start);
    if (run.kind === 'compressed') {
      (await this.decompress(run, pos)).copy(buf);
    } else {
      if (pos > start) await this.readBacking(start, buf.subarray(0, pos - start));
      const tail = pos + data.length;
      if (tail < end) await this.readBacking(tail, buf.subarray(tail - start, Math.min(end, this.virtualSize) - start));
    }
    data.copy(buf, pos - start);
    const host = Math.ceil(this.fileEnd / cs) * cs;
    await this.file.write(buf, host);
    this.fileEnd = host + buf.length;
    const first = Math.floor((start % this.l2Span) / cs);
    for (let i = 0; i < buf.length / cs; i++) {
      const h = host + i * cs;
      this.setL2(slot, first + i, Math.floor(h / 0x100000000), h % 0x100000000);
    }
    this.compressedCache = null;
  }

  async writeCompressed(offset: number, compressed: Buffer): Promise<void> {
    const cs = this.clusterSize;
    this.assertWritable(offset, Math.min(cs, this.virtualSize - offset));
    if (offset % cs !== 0 || compressed.length >= cs) throw new QimgError('invalid compressed cluster write', { file: this.filename });
    await this.lock.run(async () => {
      this.compressedCache = null;
      const run = await this.lookup(offset, cs);
      if (run.kind === 'data') {
        // Already allocated: store it plainly where it is.
        const plain = zlib().inflateRawSync(compressed, { windowBits: 12 });
        await this.file.write(plain.subarray(0, Math.min(cs, this.virtualSize - offset)), run.host!);
        return;
      }
      const slot = await this.l2ForWrite(Math.floor(offset / this.l2Span));
      const host = this.fileEnd;
      await this.file.write(compressed, host);
      this.fileEnd = host + compressed.length;
      const e = (1n << 63n) | (BigInt(compressed.length) << BigInt(63 - this.header.clusterBits)) | BigInt(host);
      this.setL2(slot, Math.floor((offset % this.l2Span) / cs), Number(e >> 32n), Number(e & 0xffffffffn));
    });
  }

  /** No zero clusters in qcow: zeros are written, except where the range reads as zeros already. */
  async writeZeroes(offset: number, length: number, _opts: { mayUnmap?: boolean } = {}): Promise<void> {
    this.assertWritable(offset, length);
    for (let pos = offset; pos < offset + length; ) {
      const run = await this.lock.run(() => this.lookup(pos, offset + length - pos));
      const backed = this.backing !== null && pos < this.backing.virtualSize;
      if (run.kind !== 'unallocated' || backed) {
        for (let p = pos; p < pos + run.length; p += ZERO_CHUNK) await this.write(p, Buffer.alloc(Math.min(ZERO_CHUNK, pos + run.length - p)));
      }
      pos += run.length;
    }
  }

  /** QEMU's qcow has no discard: the data stays. */
  async discard(offset: number, length: number): Promise<void> {
    this.assertWritable(offset, length);
  }

  /** commit: an empty L1 table, the file cut after it (as QEMU). */
  async makeEmpty(): Promise<void> {
    if (!this.file.writable) throw new QimgError('image is opened read-only', { file: this.filename });
    await this.lock.run(async () => {
      const bytes = this.header.l1Size * 8;
      this.l2Cache.clear();
      this.l1Dirty.clear();
      this.compressedCache = null;
      this.l1 = Buffer.alloc(Math.min(this.l1.length, bytes));
      for (let p = 0; p < bytes; p += ZERO_CHUNK) await this.file.write(Buffer.alloc(Math.min(ZERO_CHUNK, bytes - p)), this.header.l1TableOffset + p);
      await this.file.flush();
      await this.file.truncate(this.header.l1TableOffset + bytes);
      this.fileEnd = this.header.l1TableOffset + bytes;
      await this.file.flush();
    });
  }

  /** QEMU's qcow driver cannot change the backing file (rebase fails there too). */
  async setBacking(name: string | undefined, _format: string | undefined): Promise<void> {
    throw new QimgError(`Could not change the backing file to '${name ?? ''}': Operation not supported`, { file: this.filename });
  }

  async info(): Promise<ImageInfo> {
    const info: ImageInfo = {
      filename: this.filename,
      format: 'qcow',
      virtualSize: this.virtualSize,
      actualSize: await this.file.allocatedSize(),
      clusterSize: this.clusterSize,
      dirtyFlag: false,
    };
    if (this.header.cryptMethod !== QCOW_CRYPT_NONE) info.encrypted = true;
    if (this.backingName !== undefined) {
      info.backingFilename = this.backingName;
      info.fullBackingFilename = fullBackingName(this.backingName, this.filename);
    }
    return info;
  }

  async sync(): Promise<void> {
    if (!this.unsafeCache && this.file.writable) await this.file.flush();
  }

  /** Data, then L2 tables, then L1 entries. */
  private async flushMetadata(): Promise<void> {
    const dirty = [...this.l2Cache.entries()].filter(([, s]) => s.dirty).sort((a, b) => a[0] - b[0]);
    if (dirty.length > 0) {
      await this.sync();
      for (const [off, s] of dirty) {
        await this.file.write(s.table, off);
        s.dirty = false;
      }
    }
    if (this.l1Dirty.size > 0) {
      await this.sync();
      for (const i of [...this.l1Dirty].sort((a, b) => a - b)) await this.file.write(this.l1.subarray(i * 8, i * 8 + 8), this.header.l1TableOffset + i * 8);
      this.l1Dirty.clear();
    }
  }

  async flush(): Promise<void> {
    if (!this.file.writable) return;
    await this.lock.run(async () => {
      await this.flushMetadata();
      await this.sync();
    });
  }

  async close(): Promise<void> {
    this.cipher?.destroy();
    this.cipher = null;
    let failure: unknown;
    if (this.file.writable) {
      try {
        await this.lock.run(async () => {
          await this.flushMetadata();
          await this.file.flush();
        });
      } catch (err) {
        failure = err;
      }
    }
    await this.file.close().catch(() => undefined);
    if (this.backing) await this.backing.close();
    if (failure) throw failure;
  }
}
