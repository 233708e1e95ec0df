/**
 * Creating VMDK images as qemu-img does: the options, their refusals (same texts), the
 * extent files of each subformat and the descriptor qemu writes. streamOptimized is
 * written in VMware's layout (header with gdOffset = GD_AT_END, then tables, directory
 * and footer after the grains), which qemu reads as well.
 */
import { unlink } from 'node:fs/promises';
import { openNewImageFile } from '../../io/new-file.js';
import { basename } from 'node:path';
import { QimgError } from '../../core/errors.js';
import { openImage, resolveRelative } from '../../core/open.js';
import type { OptionSpec, OptionValue, ParsedOptions } from '../../core/options.js';
import { DEFAULT_GRAIN_SECTORS, DEFAULT_GT_ENTRIES, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN, SECTOR, SPLIT_SIZE } from './constants.js';
import { buildDescriptor } from './descriptor.js';
import { serializeVmdk4Header } from './header.js';
import { buildStreamTail, streamHeader } from './stream.js';
import { crypto } from '../../core/lazy-builtins.js';

export const SUBFORMATS = ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'streamOptimized'] as const;
export type Subformat = (typeof SUBFORMATS)[number];
export const ADAPTER_TYPES = ['ide', 'buslogic', 'lsilogic', 'legacyESX'] as const;

/** qemu's vmdk_create_opts, in its order. */
export const vmdkCreateOptions: readonly OptionSpec[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'adapter_type', type: 'string', help: 'Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX' },
  { name: 'backing_file', type: 'string', help: 'File name of a base image' },
  { name: 'backing_fmt', type: 'string', help: "Must be 'vmdk' if present" },
  { name: 'compat6', type: 'bool', help: 'VMDK version 6 image', default: 'off' },
  { name: 'hwversion', type: 'string', help: 'VMDK hardware version', default: 'undefined' },
  { name: 'toolsversion', type: 'string', help: 'VMware guest tools version' },
  {
    name: 'subformat',
    type: 'string',
    help: 'VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ',
  },
  { name: 'zeroed_grain', type: 'bool', help: 'Enable efficient zero writes using the zeroed-grain GTE feature' },
];

/** The options part of "Formatting '...'": set options in qemu's order, defaults included. */
export function describeVmdkCreate(size: bigint, o: ParsedOptions): string {
  const parts = [`size=${size}`];
  for (const spec of vmdkCreateOptions) {
    if (spec.name === 'size') continue;
    const v = o.raw.get(spec.name) ?? spec.default;
    if (v !== undefined) parts.push(`${spec.name}=${v}`);
  }
  return parts.join(' ');
}

export interface VmdkCreateSpec {
  size: number;
  subformat: Subformat;
  adapterType: string;
  backingFile?: string;
  hwVersion: string;
  toolsVersion: string;
  zeroedGrain: boolean;
}

/** Options → spec, with qemu's checks and messages (in qemu's order). */
export function vmdkSpecFromOptions(size: number, o: Map<string, OptionValue>): VmdkCreateSpec {
  const backingFmt = o.get('backing_fmt') as string | undefined;
  if (backingFmt !== undefined && backingFmt !== 'vmdk') throw new QimgError('backing_file must be a vmdk image');
  const adapter = (o.get('adapter_type') as string | undefined) ?? 'ide';
  if (!(ADAPTER_TYPES as readonly string[]).includes(adapter)) throw new QimgError(`invalid parameter value: ${adapter}`);
  const sub = (o.get('subformat') as string | undefined) ?? 'monolithicSparse';
  if (!(SUBFORMATS as readonly string[]).includes(sub)) throw new QimgError(`invalid parameter value: ${sub}`);
  const subformat = sub as Subformat;
  let hw = o.get('hwversion') as string | undefined;
  if (hw === 'undefined') hw = undefined;
  if (o.get('compat6') === true) {
    if (hw !== undefined) throw new QimgError('compat6 cannot be enabled with hwversion set');
    hw = '6';
  }
  const flat = subformat === 'monolithicFlat' || subformat === 'twoGbMaxExtentFlat';
  const backingFile = o.get('backing_file') as string | undefined;
  const zeroedGrain = o.get('zeroed_grain') === true;
  if (flat && backingFile !== undefined) throw new QimgError("Flat image can't have backing file");
  if (flat && zeroedGrain) throw new QimgError("Flat image can't enable zeroed grain");
  return {
    size,
    subformat,
    adapterType: adapter,
    backingFile,
    hwVersion: hw ?? '4',
    toolsVersion: (o.get('toolsversion') as string | undefined) ?? '2147483647',
    zeroedGrain,
  };
}

/** The hosted sparse extent qemu creates: header, redundant and primary GD each followed by all their GTs, grains from a 64 KiB boundary. */
export function sparseExtentImage(size: number, zeroedGrain: boolean): { head: Buffer; fileSize: number; pieces: Array<[number, Buffer]> } {
  const capacity = size / SECTOR;
  const grains = Math.ceil(capacity / DEFAULT_GRAIN_SECTORS);
  const gtSectors = Math.ceil((DEFAULT_GT_ENTRIES * 4) / SECTOR);
  const gtCount = Math.ceil(grains / DEFAULT_GT_ENTRIES);
  const gdSectors = Math.ceil((gtCount * 4) / SECTOR);
  const rgdOffset = 21;
  const gdOffset = rgdOffset + gdSectors + gtSectors * gtCount;
  const grainOffset = Math.ceil((gdOffset + gdSectors + gtSectors * gtCount) / DEFAULT_GRAIN_SECTORS) * DEFAULT_GRAIN_SECTORS;
  const head = serializeVmdk4Header({
    version: zeroedGrain ? 2 : 1,
    flags: FLAG_RGD | FLAG_NL_DETECT | (zeroedGrain ? FLAG_ZERO_GRAIN : 0),
    capacity: BigInt(capacity),
    granularity: BigInt(DEFAULT_GRAIN_SECTORS),
    descOffset: 1n,
    descSize: 20n,
    numGTEsPerGT: DEFAULT_GT_ENTRIES,
    rgdOffset: BigInt(rgdOffset),
    gdOffset: BigInt(gdOffset),
    grainOffset: BigInt(grainOffset),
    uncleanShutdown: 0,
    compressAlgorithm: 0,
  });
  const dir = (at: number) => {
    const b = Buffer.alloc(gdSectors * SECTOR);
    for (let i = 0; i < gtCount; i++) b.writeUInt32LE(at + gdSectors + i * gtSectors, i * 4);
    return b;
  };
  if (gdOffset + gdSectors + gtSectors * gtCount > 2 ** 32) throw new QimgError('The image size is too large for file format \'vmdk\'');
  return { head, fileSize: grainOffset * SECTOR, pieces: [[rgdOffset * SECTOR, dir(rgdOffset)], [gdOffset * SECTOR, dir(gdOffset)]] };
}

/** An empty stream: header, descriptor, then (from the first grain sector) empty tables, directory, footer and end marker. */
function emptyStream(size: number, descriptor: string): Buffer {
  const capacity = size / SECTOR;
  const gtCount = Math.ceil(Math.ceil(capacity / DEFAULT_GRAIN_SECTORS) / DEFAULT_GT_ENTRIES);
  const base = DEFAULT_GRAIN_SECTORS; // grainOffset
  const header = streamHeader(capacity, 0n);
  const { tail, gdSector } = buildStreamTail(new Array<Buffer | null>(gtCount).fill(null), DEFAULT_GT_ENTRIES * 4, base * SECTOR, header);
  return Buffer.concat([serializeVmdk4Header({ ...header, gdOffset: BigInt(gdSector) }), padTo(Buffer.from(descriptor, 'latin1'), (base - 1) * SECTOR), tail]);
}

function padTo(b: Buffer, n: number): Buffer {
  if (b.length > n) throw new QimgError('descriptor too long');
  const out = Buffer.alloc(n);
  b.copy(out);
  return out;
}

/** qemu's filename_decompose: directory part, name before the last dot, the rest. */
function decompose(path: string): { dir: string; prefix: string; postfix: string } {
  const slash = path.lastIndexOf('/');
  const dir = slash >= 0 ? path.slice(0, slash + 1) : '';
  const name = path.slice(slash + 1);
  const dot = name.lastIndexOf('.');
  return dot < 0 ? { dir, prefix: name, postfix: '' } : { dir, prefix: name.slice(0, dot), postfix: name.slice(dot) };
}

export async function createVmdk(path: string, size: number, options: Map<string, OptionValue>): Promise<void> {
  const spec = vmdkSpecFromOptions(size, options);
  const { subformat } = spec;
  const flat = subformat === 'monolithicFlat' || subformat === 'twoGbMaxExtentFlat';
  const split = subformat === 'twoGbMaxExtentSparse' || subformat === 'twoGbMaxExtentFlat';
  const stream = subformat === 'streamOptimized';

  let parentCid = 0xffffffff;
  if (spec.backingFile !== undefined) {
    const full = resolveRelative(spec.backingFile, path);
    let parent;
    try {
      parent = await openImage(full, { metadataOnly: true, noBacking: true });
    } catch (err) {
      throw new QimgError(err instanceof Error ? err.message : String(err), { cause: err });
    }
    try {
      if (parent.format !== 'vmdk') throw new QimgError(`Invalid backing file format: ${parent.format}. Must be vmdk`);
      const cid = (parent as unknown as { state?: { cid: number } }).state?.cid;
      if (cid === undefined) throw new QimgError('Failed to read parent CID');
      parentCid = cid;
    } finally {
      await parent.close();
    }
  }

  const { dir, prefix, postfix } = decompose(path);
  const created: string[] = [];
  const extentLines: string[] = [];
  const files: Array<{ path: string; write: (fd: import('node:fs/promises').FileHandle) => Promise<void> }> = [];
  const line = (sectors: number, name: string) =>
    flat ? `RW ${sectors} FLAT "${basename(name)}" 0\n` : `RW ${sectors} SPARSE "${basename(name)}"\n`;

  if (!split && !flat) {
    extentLines.push(line(Math.ceil(size / SECTOR), path));
  } else {
    let done = 0;
    for (let idx = 1; done < size; idx++) {
      const cur = Math.min(size - done, split ? SPLIT_SIZE : size);
      const name = split ? `${dir}${prefix}-${flat ? 'f' : 's'}${String(idx).padStart(3, '0')}${postfix}` : `${dir}${prefix}-flat${postfix}`;
      extentLines.push(line(Math.ceil(cur / SECTOR), name));
      files.push({
        path: name,
        write: async (fd) => {
          if (flat) {
            await fd.truncate(cur);
            return;
          }
          const ext = sparseExtentImage(cur, spec.zeroedGrain);
          await fd.write(ext.head, 0, ext.head.length, 0);
          await fd.truncate(ext.fileSize);
          for (const [at, b] of ext.pieces) await fd.write(b, 0, b.length, at);
        },
      });
      done += cur;
    }
  }

  const heads = spec.adapterType === 'ide' ? 16 : 255;
  const descriptor = buildDescriptor({
    cid: crypto().randomInt(0, 2 ** 32),
    parentCid,
    createType: subformat,
    parentFileNameHint: spec.backingFile,
    extentLines,
    hwVersion: spec.hwVersion,
    cylinders: Math.floor(size / (63 * heads * SECTOR)),
    heads,
    adapterType: spec.adapterType,
    toolsVersion: spec.toolsVersion,
  });

  const writeFile = async (p: string, fn: (fd: import('node:fs/promises').FileHandle) => Promise<void>) => {
    const fd = await openNewImageFile(p);
    if ((await fd.stat()).isFile()) created.push(p);
    try {
      await fn(fd);
      await fd.datasync();
    } finally {
      await fd.close();
    }
  };

  try {
    if (split || flat) {
      for (const f of files) await writeFile(f.path, f.write);
      await writeFile(path, async (fd) => {
        const text = Buffer.from(descriptor, 'latin1');
        await fd.write(text, 0, text.length, 0);
      });
    } else if (stream) {
      await writeFile(path, async (fd) => {
        const b = emptyStream(size, descriptor);
        await fd.write(b, 0, b.length, 0);
      });
    } else {
      const ext = sparseExtentImage(size, spec.zeroedGrain);
      await writeFile(path, async (fd) => {
        await fd.write(ext.head, 0, ext.head.length, 0);
        await fd.truncate(ext.fileSize);
        for (const [at, b] of ext.pieces) await fd.write(b, 0, b.length, at);
        const text = Buffer.from(descriptor, 'latin1');
        if (text.length > 20 * SECTOR) throw new QimgError('descriptor too long');
        await fd.write(text, 0, text.length, SECTOR);
      });
    }
  } catch (err) {
    for (const p of created) await unlink(p).catch(() => undefined);
    throw err;
  }
}
