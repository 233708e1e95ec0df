/**
 * `create -f vdi`: the options qemu-img 7.2 lists (size, static; with a file name
 * also the file protocol's), its Formatting line and its refusals. A dynamic image is
 * the header and a block map of unallocated entries; a static one maps every block
 * in order and reserves the data area (sparse, as QEMU's plain truncate).
 */
import { QimgError } from '../../core/errors.js';
import type { OptionSpec, OptionValue, ParsedOptions } from '../../core/options.js';
import { newHeader, VDI_BLOCK_SIZE, VDI_DISK_SIZE_MAX, VDI_HEADER_SIZE, VDI_UNALLOCATED } from './header.js';
import { writeNewFile } from '../../io/new-file.js';

export const vdiCreateOptions: readonly OptionSpec[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'static', type: 'bool', help: 'VDI static (pre-allocated) image', default: 'off' },
  // The file protocol's options (qemu-img accepts them for vdi; they do not change the image).
  { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, falloc, full)', protocol: true },
  { name: 'nocow', type: 'bool', help: 'Turn off copy-on-write (valid only on btrfs)', protocol: true },
  { name: 'extent_size_hint', type: 'size', help: 'Extent size hint for the image file, 0 to disable', protocol: true },
];

/** "size=N static=off", then the protocol options given, in qemu's order. */
export function describeVdiCreate(size: bigint, o: ParsedOptions): string {
  const parts = [`size=${size}`, `static=${o.raw.get('static') ?? 'off'}`];
  if (o.raw.has('preallocation')) parts.push(`preallocation=${o.raw.get('preallocation')}`);
  if (o.raw.has('nocow')) parts.push(`nocow=${o.raw.get('nocow')}`);
  if (o.values.has('extent_size_hint')) parts.push(`extent_size_hint=${o.values.get('extent_size_hint')}`);
  return parts.join(' ');
}

const hex = (v: number) => v.toString(16);

export async function createVdi(path: string, size: number, options: Map<string, OptionValue>): Promise<void> {
  // The file protocol is created first in qemu-img, so its refusals come first.
  const prealloc = options.get('preallocation') as string | undefined;
  if (prealloc !== undefined && !['off', 'falloc', 'full', 'metadata'].includes(prealloc)) {
    throw new QimgError(`invalid parameter value: ${prealloc}`);
  }
  if (prealloc === 'metadata') throw new QimgError('Unsupported preallocation mode: metadata');
  if (size > VDI_DISK_SIZE_MAX) {
    // the exact size (options' bigint) where a double cannot hold it
    const exact = options.get('size');
    const shown = typeof exact === 'bigint' && Number(exact) === size ? exact.toString(16) : hex(size);
    throw new QimgError(`Unsupported VDI image size (size is 0x${shown}, max supported is 0x${hex(VDI_DISK_SIZE_MAX)})`);
  }
  const isStatic = options.get('static') === true;
  const { header, blocks, bmapBytes } = newHeader(size, isStatic);

  await writeNewFile(path, async (handle) => {
    // The block map, written in slices so that a huge one never sits in memory whole.
    const slice = 1024 * 1024;
    for (let first = 0; first * 4 < bmapBytes; first += slice / 4) {
      const n = Math.min(slice, bmapBytes - first * 4);
      const buf = Buffer.alloc(n);
      const count = Math.min(n / 4, Math.max(0, blocks - first));
      for (let i = 0; i < count; i++) buf.writeUInt32LE(isStatic ? first + i : VDI_UNALLOCATED, i * 4);
      await handle.write(buf, 0, n, VDI_HEADER_SIZE + first * 4);
    }
    if (isStatic) await handle.truncate(VDI_HEADER_SIZE + bmapBytes + blocks * VDI_BLOCK_SIZE);
    await handle.datasync();
    // The header last: a crash leaves no file that looks like a finished image.
    await handle.write(header, 0, header.length, 0);
    await handle.datasync();
  });
}
