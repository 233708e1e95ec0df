/**
 * An opened VMDK: a list of extents laid end to end in guest order, the descriptor's
 * CIDs and parent hint, and the backing image (a VMware snapshot parent). Reads,
 * writes and block status are split at extent boundaries and handed to each extent.
 */
import { assertWritableRange, type BlockImage, type ImageInfo, type LayerStatus } from '../../core/block-image.js';
import { CorruptImageError, QimgError } from '../../core/errors.js';
import { Mutex } from '../../core/mutex.js';
import { fullBackingName } from '../../core/open.js';
import type { HostFile } from '../../io/host.js';
import { SECTOR } from './constants.js';
import { replaceCid } from './descriptor.js';
import type { OpenedLayout, SparseExtentRef, VmdkExtent } from './open.js';
import { StreamWriter } from './stream.js';
import { crypto, zlib } from '../../core/lazy-builtins.js';

export interface VmdkState {
  cid: number;
  parentCid: number;
  parentHint: string | undefined;
}

export class VmdkImage implements BlockImage {
  readonly format = 'vmdk';
  readonly virtualSize: number;
  readonly allocationUnit: number;
  readonly compression?: { algorithm: 'zlib'; clusterSize: number; alwaysCompressed: true };
  readonly compressesAllWrites?: boolean;
  /** skip the fsync between grain data and grain table updates (convert's target) */
  unsafeCache = false;
  private readonly lock = new Mutex();
  private cidUpdated = false;
  private cidChecked = false;
  private readonly streams = new Map<VmdkExtent, StreamWriter>();

  constructor(
    readonly file: HostFile,
    readonly filename: string,
    readonly layout: OpenedLayout,
    readonly state: VmdkState,
    readonly backing: BlockImage | null,
  ) {
    const last = layout.extents[layout.extents.length - 1];
    this.virtualSize = last.start + last.size;
    const sparse = layout.extents.find((e): e is SparseExtentRef => e.kind === 'sparse');
    this.allocationUnit = sparse ? Math.max(...layout.extents.map((e) => (e.kind === 'sparse' ? e.sparse.grainSize : SECTOR))) : SECTOR;
    // A stream-optimized extent stores every grain as a zlib stream: convert hands it
    // grains compressed on worker threads. convert -c is accepted for every vmdk
    // (qemu: uncompressed extents store the data as is), without compressing.
    const stream = layout.extents.find((e): e is SparseExtentRef => e.kind === 'sparse' && e.sparse.layout.compressed && e.sparse.layout.variant !== 'sesparse');
    if (stream) {
      this.compression = { algorithm: 'zlib', clusterSize: stream.sparse.grainSize, alwaysCompressed: true };
      this.compressesAllWrites = true;
    }
  }

  get readOnly(): boolean {
    return !this.file.writable;
  }

  /** The extent holding guest offset `offset` (binary search; extents are in guest order). */
  private extentAt(offset: number): VmdkExtent {
    const list = this.layout.extents;
    let lo = 0;
    let hi = list.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (list[mid].start <= offset) lo = mid;
      else hi = mid - 1;
    }
    return list[lo];
  }

  /** Splits [offset, offset+length) at extent boundaries. */
  private *pieces(offset: number, length: number): Generator<{ ext: VmdkExtent; rel: number; pos: number; len: number }> {
    for (let pos = 0; pos < length; ) {
      const ext = this.extentAt(offset + pos);
      const rel = offset + pos - ext.start;
      const len = Math.min(length - pos, ext.size - rel);
      if (len <= 0) throw new QimgError(`access beyond the end of the image (offset ${offset + pos})`, { file: this.filename });
      yield { ext, rel, pos, len };
      pos += len;
    }
  }

  /** Parent reads check the CID chain once per open, as qemu does. */
  private async readBelow(offset: number, dst: Buffer): Promise<void> {
    const b = this.backing;
    if (!b) {
      dst.fill(0);
      return;
    }
    if (!this.cidChecked) {
      const parentCid = b instanceof VmdkImage ? b.state.cid : undefined;
      if (parentCid === undefined || parentCid !== this.state.parentCid) {
        throw new QimgError(`Invalid argument: parent CID mismatch (parentCID ${hex(this.state.parentCid)}, parent's CID ${parentCid === undefined ? 'none' : hex(parentCid)})`, {
          file: this.filename,
        });
      }
      this.cidChecked = true;
    }
    const inside = Math.max(0, Math.min(dst.length, b.virtualSize - offset));
    if (inside > 0) await b.read(offset, dst.subarray(0, inside));
    if (inside < dst.length) dst.fill(0, inside);
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    if (offset < 0 || offset + buf.length > this.virtualSize) {
      throw new QimgError(`read beyond the end of the image (offset ${offset}, length ${buf.length})`, { file: this.filename });
    }
    const jobs: Promise<void>[] = [];
    for (const { ext, rel, pos, len } of this.pieces(offset, buf.length)) {
      const dst = buf.subarray(pos, pos + len);
      if (ext.kind === 'flat') jobs.push(ext.file.read(dst, ext.flatStart + rel));
      else {
        const stream = this.streams.get(ext);
        jobs.push(ext.sparse.read(rel, dst, (r, d) => this.readBelow(ext.start + r, d), stream ? (g) => stream.held(g) : undefined));
      }
    }
    await Promise.all(jobs);
  }

  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    const ext = this.extentAt(offset);
    const rel = offset - ext.start;
    const max = Math.min(length, ext.size - rel);
    if (ext.kind === 'flat') {
      // qemu recurses into the extent file: holes there read as zeros
      const host = ext.flatStart + rel;
      const run = ext.file.runAt(host, max);
      const len = run.length > 0 ? run.length : max;
      const hole = !(run.data && run.length > 0);
      return { length: len, data: true, zero: hole, hostOffset: host, file: ext.filename };
    }
    const stream = this.streams.get(ext);
    if (stream?.held(Math.floor(rel / ext.sparse.grainSize))) {
      const g = ext.sparse.grainSize;
      return { length: Math.min(max, g - (rel % g)), data: true, zero: false, compressed: true, file: ext.filename };
    }
    const r = await ext.sparse.run(rel, max);
    switch (r.kind) {
      case 'error':
        throw new CorruptImageError(this.filename, `invalid grain directory or grain table entry for offset ${offset}`);
      case 'unalloc':
        return { length: r.length, data: false, zero: false };
      case 'zero':
        return { length: r.length, data: false, zero: true };
      case 'compressed':
        return { length: r.length, data: true, zero: false, compressed: true, file: ext.filename };
      default:
        return { length: r.length, data: true, zero: false, hostOffset: r.host, file: ext.filename };
    }
  }

  private checkWrite(offset: number, length: number): void {
    assertWritableRange(this, this.file.writable, offset, length);
  }

  private streamOf(ext: SparseExtentRef): StreamWriter {
    let s = this.streams.get(ext);
    if (!s) {
      s = new StreamWriter(ext, (r, d) => this.readBelow(ext.start + r, d));
      this.streams.set(ext, s);
    }
    return s;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkWrite(offset, data.length);
    await this.lock.run(async () => {
      for (const { ext, rel, pos, len } of this.pieces(offset, data.length)) {
        const piece = data.subarray(pos, pos + len);
        if (ext.kind === 'flat') await ext.file.write(piece, ext.flatStart + rel);
        else if (ext.sparse.layout.variant === 'sesparse') throw new QimgError('No write support for seSparse images available', { file: this.filename });
        else if (ext.sparse.layout.compressed) await this.streamOf(ext).write(rel, piece);
        else await this.writeSparse(ext, rel, piece);
      }
      await this.updateCid();
    });
  }

  /**
   * Writes into a sparse extent: allocated grains in place; new grains appended at the
   * end of the file in one request per run, with parts not written taken from the
   * backing file (or zeros), and only then the grain tables pointed at them.
   */
  private async writeSparse(ext: SparseExtentRef, rel: number, data: Buffer): Promise<void> {
    const sp = ext.sparse;
    const g = sp.grainSize;
    const inPlace: Promise<void>[] = [];
    type NewGrain = { grain: number; dataPos: number; inGrain: number; n: number; zeroed: boolean };
    const fresh: NewGrain[] = [];
    for (let pos = 0; pos < data.length; ) {
      const at = rel + pos;
      const grain = Math.floor(at / g);
      const inGrain = at - grain * g;
      const r = await sp.run(at, data.length - pos);
      if (r.kind === 'data') {
        inPlace.push(ext.file.write(data.subarray(pos, pos + r.length), r.host!));
        pos += r.length;
        continue;
      }
      if (r.kind === 'error') throw new CorruptImageError(this.filename, `invalid grain table entry for offset ${ext.start + at}`);
      const n = Math.min(data.length - pos, g - inGrain);
      fresh.push({ grain, dataPos: pos, inGrain, n, zeroed: r.kind === 'zero' });
      pos += n;
    }
    await Promise.all(inPlace);
    if (fresh.length === 0) return;
    const sectorsPerGrain = sp.layout.grainSectors;
    const first = sp.allocate(fresh.length * sectorsPerGrain);
    const whole = fresh.every((f) => f.inGrain === 0 && f.n === g);
    let buf: Buffer;
    if (whole && fresh.length * g === data.length) buf = data;
    else {
      buf = Buffer.alloc(fresh.length * g);
      await Promise.all(
        fresh.map(async (f, k) => {
          const slot = buf.subarray(k * g, (k + 1) * g);
          if (f.inGrain > 0 || f.n < g) {
            // copy-on-write: the rest of the grain from the backing file (not over a zeroed grain)
            if (!f.zeroed && this.backing) {
              const avail = Math.min(g, ext.size - f.grain * g);
              await this.readBelow(ext.start + f.grain * g, slot.subarray(0, avail));
            }
          }
          data.copy(slot, f.inGrain, f.dataPos, f.dataPos + f.n);
        }),
      );
    }
    await ext.file.write(buf, first * SECTOR);
    if (!this.unsafeCache) await ext.file.flush();
    await sp.setEntries(
      fresh.map((f, k) => [f.grain, first + k * sectorsPerGrain]),
      true,
      this.unsafeCache,
    );
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.checkWrite(offset, length);
    const zeroChunk = (n: number) => Buffer.alloc(Math.min(n, 4 * 1024 * 1024));
    for (const { ext, rel, len } of this.pieces(offset, length)) {
      if (ext.kind === 'flat' || ext.sparse.layout.compressed || ext.sparse.layout.variant === 'sesparse') {
        for (let p = 0; p < len; ) {
          const z = zeroChunk(len - p);
          const n = Math.min(z.length, len - p);
          if (ext.kind === 'sparse' && ext.sparse.layout.compressed) {
            // nothing to store where a grain is unallocated and nothing shows through
            const st = await ext.sparse.run(rel + p, n);
            if (st.kind === 'unalloc' && !this.backing && !this.streams.get(ext)?.held(Math.floor((rel + p) / ext.sparse.grainSize))) {
              p += st.length;
              continue;
            }
          }
          await this.write(ext.start + rel + p, z.subarray(0, n));
          p += n;
        }
        continue;
      }
      await this.lock.run(() => this.zeroSparse(ext, rel, len));
    }
  }

  /** Zeroed-grain entries for whole grains where the extent has the feature; zeros written elsewhere. */
  private async zeroSparse(ext: SparseExtentRef, rel: number, len: number): Promise<void> {
    const sp = ext.sparse;
    const g = sp.grainSize;
    const marks: Array<[number, number]> = [];
    const writes: Array<[number, number]> = [];
    for (let pos = 0; pos < len; ) {
      const at = rel + pos;
      const grain = Math.floor(at / g);
      const inGrain = at - grain * g;
      const n = Math.min(len - pos, g - inGrain);
      const st = await sp.lookup(grain);
      if (sp.layout.zeroGrain && inGrain === 0 && (n === g || at + n === ext.size)) {
        if (st.kind !== 'zero') marks.push([grain, 1]);
      } else if (!(st.kind === 'zero' || (st.kind === 'unalloc' && !this.backing))) {
        writes.push([at, n]);
      }
      pos += n;
    }
    if (marks.length > 0) {
      await sp.setEntries(marks, true, this.unsafeCache);
      await this.updateCid();
    }
    for (const [at, n] of writes) {
      await this.writeSparse(ext, at, Buffer.alloc(n));
      await this.updateCid();
    }
  }

  /** qemu's vmdk has no discard: the data stays. */
  async discard(offset: number, length: number): Promise<void> {
    this.checkWrite(offset, length);
  }

  /**
   * A grain compressed as a zlib stream (`compression`): appended as it is to a
   * stream-optimized extent; any other extent stores it inflated.
   */
  async writeCompressed(offset: number, compressed: Buffer): Promise<void> {
    const ext = this.extentAt(offset);
    const rel = offset - ext.start;
    if (ext.kind === 'sparse' && ext.sparse.layout.compressed && ext.sparse.layout.variant !== 'sesparse' && rel % ext.sparse.grainSize === 0) {
      this.checkWrite(offset, Math.min(ext.sparse.grainSize, ext.size - rel));
      await this.lock.run(async () => {
        await this.streamOf(ext).writeCompressed(rel, compressed);
        await this.updateCid();
      });
      return;
    }
    const unit = this.compression?.clusterSize ?? this.allocationUnit;
    let plain: Buffer;
    try {
      plain = zlib().inflateSync(compressed, { maxOutputLength: unit });
    } catch {
      throw new QimgError('compressed unit is not a zlib stream', { file: this.filename });
    }
    await this.write(offset, plain.subarray(0, Math.min(plain.length, this.virtualSize - offset)));
  }

  /** A new CID in the descriptor on the first write after open (invalidates snapshots of this image). */
  private async updateCid(): Promise<void> {
    if (this.cidUpdated) return;
    this.cidUpdated = true;
    const { descOffset, descRoom } = this.layout;
    const raw = await this.file.readBytes(descOffset, Math.min(descRoom, Math.max(0, this.file.size - descOffset)));
    const nul = raw.indexOf(0);
    const text = raw.subarray(0, nul < 0 ? raw.length : nul).toString('latin1');
    const cid = crypto().randomInt(0, 2 ** 32);
    const next = replaceCid(text, cid);
    if (next === null || next.length > descRoom) return;
    const out = Buffer.alloc(Math.max(next.length, text.length));
    out.write(next, 'latin1');
    await this.file.write(out, descOffset);
    this.state.cid = cid;
  }

  async info(): Promise<ImageInfo> {
    const exts = this.layout.extents;
    let actual = await this.file.allocatedSize();
    for (const f of this.layout.ownFiles) {
      if (f === this.file || actual === undefined) continue;
      const more = await f.allocatedSize();
      actual = more === undefined ? undefined : actual + more;
    }
    const first = exts[0];
    const same = exts.every(
      (e) =>
        (e.kind === 'flat') === (first.kind === 'flat') &&
        compressedOf(e) === compressedOf(first) &&
        (e.kind === 'flat' || first.kind === 'flat' || e.sparse.grainSize === first.sparse.grainSize),
    );
    const info: ImageInfo = {
      filename: this.filename,
      format: 'vmdk',
      virtualSize: this.virtualSize,
      actualSize: actual,
      dirtyFlag: false,
      formatSpecific: {
        type: 'vmdk',
        data: {
          'create-type': this.layout.createType ?? '',
          cid: this.state.cid,
          'parent-cid': this.state.parentCid,
          extents: exts.map((e) => ({
            filename: e.filename,
            format: e.type ?? '',
            'virtual-size': e.size,
            'cluster-size': e.kind === 'sparse' ? e.sparse.grainSize : undefined,
            compressed: compressedOf(e) ? true : undefined,
          })),
        },
      },
    };
    if (same && first.kind === 'sparse') info.clusterSize = first.sparse.grainSize;
    const hint = this.state.parentHint;
    if (hint !== undefined) {
      info.backingFilename = hint;
      info.fullBackingFilename = fullBackingName(hint, this.filename);
      info.backingFilenameFormat = 'vmdk';
    }
    return info;
  }

  /** qemu's vmdk cannot change a backing file (no bdrv_change_backing_file). */
  async setBacking(name: string | undefined): Promise<void> {
    throw new QimgError(`Could not change the backing file to '${name ?? ''}': Operation not supported`, { file: '' });
  }

  /** Grain tables a conversion kept in memory, written once each. */
  private async writeTables(): Promise<void> {
    for (const e of this.layout.extents) if (e.kind === 'sparse' && !e.sparse.layout.compressed) await e.sparse.writeDirty();
  }

  async flush(): Promise<void> {
    if (!this.file.writable) return;
    await this.lock.run(async () => {
      for (const s of this.streams.values()) await s.flush();
      await this.writeTables();
      const files = new Set([this.file, ...this.layout.ownFiles]);
      for (const f of files) await f.flush();
    });
  }

  async close(): Promise<void> {
    let failure: unknown = null;
    try {
      if (this.file.writable) {
        await this.lock.run(async () => {
          for (const s of this.streams.values()) await s.finish();
          await this.writeTables();
        });
        if (!this.unsafeCache) for (const f of new Set([this.file, ...this.layout.ownFiles])) await f.flush();
      }
    } catch (err) {
      failure = err;
    }
    for (const f of this.layout.ownFiles) if (f !== this.file) await f.close().catch(() => undefined);
    await this.file.close().catch(() => undefined);
    if (this.backing) await this.backing.close().catch(() => undefined);
    if (failure) throw failure;
  }
}

function compressedOf(e: VmdkExtent): boolean {
  return e.kind === 'sparse' && e.sparse.layout.compressed;
}

const hex = (n: number) => (n >>> 0).toString(16);
