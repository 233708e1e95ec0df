/**
 * A new qcow2 image written in one forward pass (convert -O qcow2 SRC -): the plan of
 * which clusters hold data (or read as zeros) comes first, so the whole layout is
 * known before the first byte: header, refcount table, refcount blocks, L1 table, the
 * L2 tables in guest order, then the data clusters in guest order. Every cluster
 * written is referenced exactly once, so the image has no leaks; nothing is ever
 * sought back to.
 */
import type { StreamImageWriter, UnitRun } from '../../core/driver.js';
import { QimgError } from '../../core/errors.js';
import type { OptionValue } from '../../core/options.js';
import { writeU64 } from '../../core/units.js';
import type { SequentialOutput } from '../../io/stdio.js';
import * as C from './constants.js';
import { qcow2SpecFromOptions, type Qcow2CreateSpec } from './create.js';
import type { Qcow2Header } from './header.js';
import { serializeHeader } from './header-serialize.js';
import { writeRefcountEntry } from './refcount.js';

/** Why an option cannot be streamed, or undefined. */
function streamRefusal(spec: Qcow2CreateSpec): string | undefined {
  if (spec.encryption) return 'encryption cannot be written to standard output';
  if (spec.dataFile !== undefined) return 'an external data file cannot be written to standard output';
  if (spec.preallocation !== 'off') return `preallocation=${spec.preallocation} cannot be written to standard output`;
  return undefined;
}

interface Layout {
  reftableClusters: number;
  refblocks: number;
  l1Clusters: number;
  l2Tables: number;
  dataClusters: number;
  total: number;
}

/** Clusters of each structure, refcount structures sized to cover themselves too. */
function computeLayout(spec: Qcow2CreateSpec, l1Size: number, l2Tables: number, dataClusters: number): Layout {
  const cs = spec.clusterSize;
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  const blockEntries = (cs * 8) / spec.refcountBits;
  let reftableClusters = 1;
  let refblocks = 1;
  for (;;) {
    const total = 1 + reftableClusters + refblocks + l1Clusters + l2Tables + dataClusters;
    const needBlocks = Math.ceil(total / blockEntries);
    const needTable = Math.max(1, Math.ceil((needBlocks * 8) / cs));
    if (needBlocks <= refblocks && needTable <= reftableClusters) {
      return { reftableClusters, refblocks, l1Clusters, l2Tables, dataClusters, total };
    }
    refblocks = Math.max(refblocks, needBlocks);
    reftableClusters = Math.max(reftableClusters, needTable);
  }
}

export class Qcow2StreamWriter implements StreamImageWriter {
  readonly mode = 'plan';
  readonly unit: number;
  readonly zeroUnits: 'flag' | 'data';
  readonly backingFile?: string;
  readonly backingFormat?: string;
  private readonly spec: Qcow2CreateSpec;
  private readonly l2Entries: number;
  private readonly entryBytes: number;
  /** host offset of the next data cluster, and the guest offset the copy must write next */
  private dataHost = 0;
  private expected: UnitRun[] = [];
  private runIndex = 0;
  private runPos = 0;
  private end = 0;

  constructor(
    private readonly out: SequentialOutput,
    size: number,
    options: Map<string, OptionValue>,
  ) {
    if (options.has('encrypt.format') || options.get('encryption') === true) throw new QimgError('encryption cannot be written to standard output');
    this.spec = qcow2SpecFromOptions(size, options);
    const refusal = streamRefusal(this.spec);
    if (refusal) throw new QimgError(refusal);
    this.unit = this.spec.clusterSize;
    this.entryBytes = this.spec.extendedL2 ? 16 : 8;
    this.l2Entries = this.spec.clusterSize / this.entryBytes;
    // v2 has no zero flag: zero clusters over a backing file are stored as data
    this.zeroUnits = this.spec.version >= 3 ? 'flag' : 'data';
    this.backingFile = this.spec.backingFile;
    this.backingFormat = this.spec.backingFormat;
  }

  async begin(plan: readonly UnitRun[] = []): Promise<void> {
    const spec = this.spec;
    const cs = spec.clusterSize;
    const clusters = Math.ceil(spec.size / cs);
    const l1Size = Math.ceil(spec.size / (cs * this.l2Entries));
    const runs = plan.map((r) => ({ ...r, kind: r.kind === 'zero' && this.zeroUnits === 'data' ? ('data' as const) : r.kind }));
    for (const r of runs) {
      if (r.count <= 0 || r.start < 0 || r.start + r.count > clusters) throw new QimgError('internal error: cluster plan out of range');
    }
    // L2 tables: one per L1 entry that any run touches
    const tables: number[] = [];
    let dataClusters = 0;
    for (const r of runs) {
      if (r.kind === 'data') dataClusters += r.count;
      const first = Math.floor(r.start / this.l2Entries);
      const last = Math.floor((r.start + r.count - 1) / this.l2Entries);
      for (let t = Math.max(first, (tables[tables.length - 1] ?? -1) + 1); t <= last; t++) tables.push(t);
    }
    const lay = computeLayout(spec, l1Size, tables.length, dataClusters);
    const reftableOffset = cs;
    const refblockOffset = reftableOffset + lay.reftableClusters * cs;
    const l1Offset = refblockOffset + lay.refblocks * cs;
    const l2Offset = l1Offset + lay.l1Clusters * cs;
    const dataOffset = l2Offset + lay.l2Tables * cs;
    if (lay.reftableClusters * cs > C.MAX_REFTABLE_BYTES) throw new QimgError('the image is too large for one qcow2 refcount table at this cluster size');

    await this.out.write(this.headerCluster(l1Size, l1Offset, reftableOffset, lay.reftableClusters));
    // refcount table: one entry per refcount block
    const reftable = Buffer.alloc(lay.reftableClusters * cs);
    for (let i = 0; i < lay.refblocks; i++) writeU64(reftable, i * 8, refblockOffset + i * cs);
    await this.out.write(reftable);
    // refcount blocks: every cluster of the file is used exactly once
    const blockEntries = (cs * 8) / spec.refcountBits;
    for (let b = 0; b < lay.refblocks; b++) {
      const block = Buffer.alloc(cs);
      const from = b * blockEntries;
      const to = Math.min(lay.total, from + blockEntries);
      for (let c = from; c < to; c++) writeRefcountEntry(block, c - from, spec.refcountBits, 1);
      await this.out.write(block);
    }
    // L1 table, padded to whole clusters (the L2 tables follow)
    const l1 = Buffer.alloc(lay.l1Clusters * cs);
    tables.forEach((t, i) => writeEntry(l1, t * 8, l2Offset + i * cs, true));
    await this.out.write(l1);
    // L2 tables in order; data clusters take host clusters in guest order
    let nextData = dataOffset;
    let ri = 0;
    for (const t of tables) {
      const table = Buffer.alloc(cs);
      const lo = t * this.l2Entries;
      const hi = lo + this.l2Entries;
      while (ri < runs.length && runs[ri].start + runs[ri].count <= lo) ri++;
      for (let j = ri; j < runs.length && runs[j].start < hi; j++) {
        const r = runs[j];
        const from = Math.max(lo, r.start);
        const to = Math.min(hi, r.start + r.count);
        for (let g = from; g < to; g++) {
          const at = (g - lo) * this.entryBytes;
          if (r.kind === 'data') {
            writeEntry(table, at, nextData, true);
            if (spec.extendedL2) table.writeUInt32BE(0xffffffff, at + 12); // every subcluster allocated
            nextData += cs;
          } else if (spec.extendedL2) {
            table.writeUInt32BE(0xffffffff, at + 8); // every subcluster reads as zeros
          } else {
            table.writeUInt32BE(C.OFLAG_ZERO_LO, at + 4);
          }
        }
      }
      await this.out.write(table);
    }
    if (nextData !== dataOffset + dataClusters * cs) throw new QimgError('internal error: cluster plan mismatch');
    this.expected = runs.filter((r) => r.kind === 'data');
    this.dataHost = dataOffset;
    this.end = lay.total * cs;
  }

  private headerCluster(l1Size: number, l1Offset: number, reftableOffset: number, reftableClusters: number): Buffer {
    const spec = this.spec;
    let incompat = 0n;
    if (spec.compressionType !== C.COMPRESSION_ZLIB) incompat |= C.INCOMPAT_COMPRESSION;
    if (spec.extendedL2) incompat |= C.INCOMPAT_EXTL2;
    const header: Qcow2Header = {
      version: spec.version,
      backingFileOffset: 0,
      backingFileSize: 0,
      clusterBits: Math.log2(spec.clusterSize),
      size: spec.size,
      cryptMethod: C.CRYPT_NONE,
      l1Size,
      l1TableOffset: l1Offset,
      refcountTableOffset: reftableOffset,
      refcountTableClusters: reftableClusters,
      nbSnapshots: 0,
      snapshotsOffset: 0,
      incompatibleFeatures: incompat,
      compatibleFeatures: spec.lazyRefcounts ? C.COMPAT_LAZY_REFCOUNTS : 0n,
      autoclearFeatures: 0n,
      refcountOrder: Math.log2(spec.refcountBits),
      headerLength: spec.version >= 3 ? C.HEADER_V3_LENGTH : C.HEADER_V2_LENGTH,
      compressionType: spec.compressionType,
      unknownHeaderFields: Buffer.alloc(spec.version >= 3 ? C.HEADER_V3_LENGTH - C.HEADER_V3_MIN_LENGTH - 1 : 0),
      backingFile: spec.backingFile,
      backingFormat: spec.backingFormat,
      featureTable: [],
      unknownExtensions: [],
    };
    const cluster = Buffer.alloc(spec.clusterSize);
    serializeHeader(header).copy(cluster);
    return cluster;
  }

  /** Data of the planned data clusters, exactly in plan order (the last cluster is zero-padded). */
  async write(offset: number, data: Buffer): Promise<void> {
    const cs = this.unit;
    for (let pos = 0; pos < data.length; ) {
      const run = this.expected[this.runIndex];
      const at = run ? (run.start + this.runPos) * cs : -1;
      if (!run || offset + pos !== at) throw new QimgError(`internal error: stream data at ${offset + pos} out of plan`);
      const n = Math.min(data.length - pos, (run.count - this.runPos) * cs);
      await this.out.write(data.subarray(pos, pos + n));
      pos += n;
      this.dataHost += n;
      if (n % cs !== 0) {
        // only the last cluster of the disk may come short: pad it to a cluster
        const pad = cs - (n % cs);
        await this.out.write(Buffer.alloc(pad));
        this.dataHost += pad;
      }
      this.runPos += Math.ceil(n / cs);
      if (this.runPos >= run.count) {
        this.runIndex++;
        this.runPos = 0;
      }
    }
  }

  async finish(): Promise<void> {
    if (this.runIndex < this.expected.length || this.dataHost !== this.end) throw new QimgError('internal error: stream ended before its planned data');
  }
}

/** A standard L2/L1 entry: host offset with OFLAG_COPIED (refcount 1). */
function writeEntry(buf: Buffer, at: number, host: number, copied: boolean): void {
  writeU64(buf, at, host);
  if (copied) buf.writeUInt32BE((buf.readUInt32BE(at) | C.OFLAG_COPIED_HI) >>> 0, at);
}
