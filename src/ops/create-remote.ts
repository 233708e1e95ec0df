/**
 * Creating an image on remote storage (an NBD export). The export is already there
 * with its size; as qemu, the new image must fit in it ("Cannot grow NBD nodes").
 * raw: the first sector is zeroed, so an old header there is no longer probed.
 * qcow2: the format's own create path writes a local scratch file, whose bytes (data
 * and holes alike) are then copied onto the export; a qcow2 image never depends on the
 * length of its file, so the export's size beyond them does not matter. Formats whose
 * layout is tied to the end of the file (vpc, vhdx...) are refused.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QimgError } from '../core/errors.js';
import type { CreateContext, FormatDriver } from '../core/driver.js';
import type { OptionValue } from '../core/options.js';
import { ImageFile } from '../io/file.js';
import type { HostFile } from '../io/host.js';
import { openRemote } from '../io/remote.js';

/** Formats created on an export through a local scratch file. */
const VIA_SCRATCH = new Set(['qcow2']);
/** Bytes copied per request. */
const COPY_CHUNK = 4 * 1024 * 1024;

/** Whether a freshly created image of `format` on storage `name` reads as zeros. */
export function remoteZeroInit(format: string): boolean {
  // raw is the export's own bytes, which the create leaves as they were
  return format !== 'raw';
}

export async function createOnRemote(driver: FormatDriver, name: string, size: number, options: Map<string, OptionValue>, ctx?: CreateContext): Promise<void> {
  if (driver.name !== 'raw' && !VIA_SCRATCH.has(driver.name)) {
    throw new QimgError(`Creating a ${driver.name} image on an NBD export is not supported (qimg creates raw and qcow2 images there)`, { file: name });
  }
  const prealloc = options.get('preallocation');
  if (prealloc !== undefined && prealloc !== 'off') throw new QimgError(`Unsupported preallocation mode '${String(prealloc)}' on an NBD export`, { file: name });
  const dataFile = options.get('data_file');
  if (typeof dataFile === 'string' && dataFile !== '') throw new QimgError('An external data file cannot be created for an image on an NBD export', { file: name });
  if (driver.name === 'raw') return withExport(name, size, async (host) => {
    const head = Math.min(512, host.size);
    if (head > 0) await host.write(Buffer.alloc(head), 0);
  });
  const dir = await mkdtemp(join(tmpdir(), 'qimg-create-'));
  try {
    const scratch = join(dir, 'image');
    await driver.create!(scratch, size, options, ctx);
    const local = await ImageFile.open(scratch);
    try {
      await withExport(name, local.size, (host) => copyFile(local, host));
    } finally {
      await local.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Opens the export for writing, checks that `need` bytes fit, runs `fill`, flushes. */
async function withExport(name: string, need: number, fill: (host: HostFile) => Promise<void>): Promise<void> {
  const host = await openRemote(name, { writable: true });
  try {
    if (need > host.size) throw new QimgError('Cannot grow NBD nodes', { file: name });
    await fill(host);
    await host.flush();
  } finally {
    await host.close();
  }
}

/** Copies every byte of `src` (its holes as zeros) to the start of `dst`. */
async function copyFile(src: ImageFile, dst: HostFile): Promise<void> {
  for (let pos = 0; pos < src.size; ) {
    const run = src.runAt(pos, COPY_CHUNK);
    const length = run.length > 0 ? run.length : Math.min(COPY_CHUNK, src.size - pos);
    if (run.data && run.length > 0) await dst.write(await src.readBytes(pos, length), pos);
    else if (dst.writeZeroes) await dst.writeZeroes(pos, length, { mayUnmap: true });
    else await dst.write(Buffer.alloc(length), pos);
    pos += length;
  }
}
