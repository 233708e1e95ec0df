/**
 * Creating VHDX images with qemu's layout and option rules: header section (file
 * identifier, two headers, two region tables), log, BAT, metadata, then data 5 MiB
 * after the BAT's start region (qemu's data offset). Dynamic images start with every
 * payload block ZERO (block_state_zero=on, qemu's default) or NOT_PRESENT; fixed
 * images get the whole file and, without block_state_zero, FULLY_PRESENT blocks.
 */
import type { OptionSpec, OptionValue } from '../../core/options.js';
import { QimgError } from '../../core/errors.js';
import {
  BAT_GUID,
  BLOCK_SIZE_MAX,
  DEFAULT_LOG_SIZE,
  FILE_PARAMETERS_GUID,
  FILE_PARAMS_LEAVE_BLOCKS_ALLOCATED,
  FILE_SIGNATURE,
  HEADER1_OFFSET,
  HEADER2_OFFSET,
  HEADER_SECTION_END,
  LOGICAL_SECTOR_SIZE_GUID,
  MAX_IMAGE_SIZE,
  METADATA_GUID,
  METADATA_IS_REQUIRED,
  METADATA_IS_VIRTUAL_DISK,
  METADATA_TABLE_SIZE,
  MiB,
  PAGE83_DATA_GUID,
  PAYLOAD_BLOCK_FULLY_PRESENT,
  PAYLOAD_BLOCK_ZERO,
  PHYSICAL_SECTOR_SIZE_GUID,
  REGION_TABLE1_OFFSET,
  REGION_TABLE2_OFFSET,
  VIRTUAL_DISK_SIZE_GUID,
  ZERO_GUID,
  geometry,
  newGuid,
  payloadBatIndex,
  serializeHeader,
  serializeMetadataTable,
  serializeRegionTable,
  setBatEntry,
} from './format.js';
import { writeNewFile } from '../../io/new-file.js';

export const vhdxCreateOptions: readonly OptionSpec[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size; max of 64TB.' },
  { name: 'log_size', type: 'size', help: 'Log size; min 1MB.', default: '1048576' },
  { name: 'block_size', type: 'size', help: 'Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.', default: '0' },
  { name: 'subformat', type: 'string', help: "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'." },
  {
    name: 'block_state_zero',
    type: 'bool',
    help: "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic.",
  },
];

/** The options part of qemu-img's "Formatting" line for vhdx. */
export function describeVhdxCreate(size: bigint, o: { values: Map<string, OptionValue>; raw: Map<string, string> }): string {
  const parts = [`size=${size}`];
  parts.push(`log_size=${o.values.get('log_size') ?? DEFAULT_LOG_SIZE}`);
  parts.push(`block_size=${o.values.get('block_size') ?? 0}`);
  if (o.raw.has('subformat')) parts.push(`subformat=${o.raw.get('subformat')}`);
  if (o.raw.has('block_state_zero')) parts.push(`block_state_zero=${o.raw.get('block_state_zero')}`);
  return parts.join(' ');
}

export interface VhdxCreateSpec {
  size: number;
  logSize: number;
  blockSize: number;
  fixed: boolean;
  zeroBlocks: boolean;
}

const roundUp = (v: bigint, to: bigint) => ((v + to - 1n) / to) * to;

/** qemu's option handling: rounding, auto block size, and its refusals in its order. */
export function vhdxSpecFromOptions(size: number, options: Map<string, OptionValue>): VhdxCreateSpec {
  const subformat = (options.get('subformat') as string | undefined) ?? 'dynamic';
  if (subformat !== 'dynamic' && subformat !== 'fixed') throw new QimgError(`Parameter 'subformat' does not accept value '${subformat}'`);
  if (size > MAX_IMAGE_SIZE) throw new QimgError('Image size too large; max of 64TB');
  const big = BigInt(MiB);
  let logSize = DEFAULT_LOG_SIZE;
  const givenLog = options.get('log_size') as bigint | undefined;
  if (givenLog !== undefined) {
    const rounded = roundUp(givenLog, big);
    if (rounded > 0xffffffffn) throw new QimgError('Log size must be smaller than 4 GB');
    logSize = Number(rounded);
  }
  if (logSize < MiB || logSize % MiB !== 0) throw new QimgError('Log size must be a multiple of 1 MB');
  let blockSize = 0;
  const givenBlock = options.get('block_size') as bigint | undefined;
  if (givenBlock !== undefined) {
    const rounded = roundUp(givenBlock, big);
    blockSize = rounded > BigInt(BLOCK_SIZE_MAX) ? BLOCK_SIZE_MAX : Number(rounded);
  }
  if (blockSize === 0) {
    // qemu's rule: keeps the BAT small enough to hold in memory
    if (size > 32 * 1024 * 1024 * MiB) blockSize = 64 * MiB;
    else if (size > 100 * 1024 * MiB) blockSize = 32 * MiB;
    else if (size > 1024 * MiB) blockSize = 16 * MiB;
    else blockSize = 8 * MiB;
  }
  if (blockSize < MiB || blockSize % MiB !== 0) throw new QimgError('Block size must be a multiple of 1 MB');
  if ((blockSize & (blockSize - 1)) !== 0) throw new QimgError('Block size must be a power of two');
  if (blockSize > BLOCK_SIZE_MAX) throw new QimgError(`Block size must not exceed ${BLOCK_SIZE_MAX}`);
  const zero = options.get('block_state_zero');
  return { size, logSize, blockSize, fixed: subformat === 'fixed', zeroBlocks: zero === undefined ? true : !!zero };
}

/** The file layout qemu uses for a spec. */
export function vhdxLayout(spec: VhdxCreateSpec) {
  const sectorSize = 512;
  const g = geometry(spec.size, spec.blockSize, sectorSize, false);
  const batOffset = Math.ceil((HEADER_SECTION_END + spec.logSize) / MiB) * MiB;
  const batLength = Math.ceil((g.batEntries * 8) / MiB) * MiB;
  const metadataOffset = Math.ceil((batOffset + batLength) / MiB) * MiB;
  const dataOffset = batOffset + batLength + 5 * MiB;
  return { g, sectorSize, batOffset, batLength, metadataOffset, metadataLength: MiB, dataOffset };
}

/** Writes a new image to `path`. */
export async function createVhdx(path: string, spec: VhdxCreateSpec): Promise<void> {
  const L = vhdxLayout(spec);
  await writeNewFile(path, async (handle) => {
    const write = async (buf: Buffer, pos: number) => {
      for (let done = 0; done < buf.length; ) done += (await handle.write(buf, done, buf.length - done, pos + done)).bytesWritten;
    };
    await handle.truncate(spec.fixed ? L.dataOffset + spec.size : L.dataOffset);

    const id = Buffer.alloc(8 + 512);
    id.write(FILE_SIGNATURE, 0, 'latin1');
    id.write('qimg', 8, 'utf16le');
    await write(id, 0);

    const regions = serializeRegionTable([
      { guid: BAT_GUID, fileOffset: L.batOffset, length: L.batLength, required: true },
      { guid: METADATA_GUID, fileOffset: L.metadataOffset, length: L.metadataLength, required: true },
    ]);
    await write(regions, REGION_TABLE1_OFFSET);
    await write(regions, REGION_TABLE2_OFFSET);

    // A dynamic image without ZERO blocks has an all-zero BAT: the new file already is.
    if (spec.fixed || spec.zeroBlocks) {
      const g = L.g;
      const state = spec.zeroBlocks ? PAYLOAD_BLOCK_ZERO : PAYLOAD_BLOCK_FULLY_PRESENT;
      const CHUNK = 4 * MiB;
      for (let start = 0; start < L.batLength; start += CHUNK) {
        const part = Buffer.alloc(Math.min(CHUNK, L.batLength - start));
        const firstEntry = start / 8;
        const lastEntry = firstEntry + part.length / 8;
        // payload blocks whose entries fall in this part of the BAT
        for (let b = Math.floor(firstEntry / (g.chunkRatio + 1)) * g.chunkRatio; b < g.payloadBlocks; b++) {
          const i = payloadBatIndex(g, b);
          if (i < firstEntry) continue;
          if (i >= lastEntry) break;
          // ZERO entries keep FileOffsetMB 0 (Hyper-V refuses others)
          const offset = state === PAYLOAD_BLOCK_ZERO ? 0 : Math.ceil((L.dataOffset + b * g.blockSize) / MiB) * MiB;
          setBatEntry(part, i - firstEntry, state, offset);
        }
        if (part.some((v) => v !== 0)) await write(part, L.batOffset + start);
      }
    }

    const items: Array<[Buffer, Buffer, number]> = [];
    const params = Buffer.alloc(8);
    params.writeUInt32LE(spec.blockSize, 0);
    params.writeUInt32LE(spec.fixed ? FILE_PARAMS_LEAVE_BLOCKS_ALLOCATED : 0, 4);
    items.push([FILE_PARAMETERS_GUID, params, METADATA_IS_REQUIRED]);
    const vsize = Buffer.alloc(8);
    vsize.writeBigUInt64LE(BigInt(spec.size), 0);
    const disk = METADATA_IS_REQUIRED | METADATA_IS_VIRTUAL_DISK;
    items.push([VIRTUAL_DISK_SIZE_GUID, vsize, disk]);
    items.push([PAGE83_DATA_GUID, newGuid(), disk]);
    const sector = Buffer.alloc(4);
    sector.writeUInt32LE(L.sectorSize, 0);
    items.push([LOGICAL_SECTOR_SIZE_GUID, sector, disk]);
    items.push([PHYSICAL_SECTOR_SIZE_GUID, sector, disk]);
    let off = METADATA_TABLE_SIZE;
    const table = serializeMetadataTable(
      items.map(([itemId, data, flags]) => {
        const e = { itemId, offset: off, length: data.length, flags };
        off += data.length;
        return e;
      }),
    );
    await write(table, L.metadataOffset);
    await write(Buffer.concat(items.map(([, d]) => d)), L.metadataOffset + METADATA_TABLE_SIZE);

    // headers last: until they are written the file is not a VHDX image
    await handle.datasync();
    const seq = BigInt(Math.floor(Math.random() * 0x100000000));
    const header = {
      sequenceNumber: seq,
      fileWriteGuid: newGuid(),
      dataWriteGuid: newGuid(),
      logGuid: ZERO_GUID,
      logVersion: 0,
      version: 1,
      logLength: spec.logSize,
      logOffset: HEADER_SECTION_END,
    };
    await write(serializeHeader(header), HEADER1_OFFSET);
    await write(serializeHeader({ ...header, sequenceNumber: seq + 1n }), HEADER2_OFFSET);
    await handle.datasync();
  });
}
