/**
 * dmg (read-only): Apple UDIF disk images as qemu 7.2 reads them: zero, raw, ignore
 * and zlib chunks. bzip2 and lzfse chunks need qemu's optional dmg-bz2/dmg-lzfse
 * modules, which Debian's qemu-utils 7.2 does not ship: qemu opens such images with a
 * warning and fails reads of those chunks with an I/O error; so does qimg. Probing
 * is by name only (qemu: a file name ending in ".dmg" scores 2).
 */
import type { BlockImage } from '../../core/block-image.js';
import type { FormatDriver } from '../../core/driver.js';
import { ReadOnlyImage } from '../../core/read-only-image.js';
import type { HostFile } from '../../io/host.js';
import { QimgError } from '../../core/errors.js';
import { UDBZ, UDIG, UDRW, UDZE, UDZO, ULFO, readUdif, searchChunk, type Chunks } from './udif.js';
import { zlib } from '../../core/lazy-builtins.js';
import { emitWarning } from '../../core/warnings.js';

const SECTOR = 512;
const warned = new Set<number>();

function warnOnce(type: number): void {
  if (warned.has(type)) return;
  warned.add(type);
  const what =
    type === UDBZ
      ? 'bzip2 compressed chunks are not supported, accessing them'
      : type === ULFO
        ? 'lzfse compressed chunks are not supported, accessing them'
        : `Image contains chunks of unknown type ${type.toString(16)}, accessing them`;
  emitWarning(`${what} will result in I/O errors`);
}

class DmgImage extends ReadOnlyImage {
  readonly format = 'dmg';
  readonly allocationUnit = SECTOR;
  readonly virtualSize: number;
  /** the last chunk decoded (qemu keeps one): sequential reads decode once */
  private cached: { chunk: number; data: Promise<Buffer> } | null = null;

  constructor(
    file: HostFile,
    filename: string,
    totalSectors: number,
    private readonly c: Chunks,
  ) {
    super(file, filename);
    this.virtualSize = totalSectors * SECTOR;
  }

  private eio(at: number): QimgError {
    return new QimgError(`error while reading at byte ${at}: Input/output error`, { file: '' });
  }

  /** A raw or zlib chunk's content (sectorCount * 512 bytes). */
  private decode(chunk: number, at: number): Promise<Buffer> {
    if (this.cached?.chunk === chunk) return this.cached.data;
    const data = (async () => {
      const size = this.c.sectorCounts[chunk] * SECTOR;
      const stored = await this.file.readBytes(this.c.offsets[chunk], this.c.lengths[chunk]);
      if (this.c.types[chunk] === UDRW) {
        // qemu leaves sectors past the stored length undefined; zeros here
        const out = Buffer.alloc(size);
        stored.copy(out, 0, 0, Math.min(size, stored.length));
        return out;
      }
      let out: Buffer;
      try {
        out = zlib().inflateSync(stored, { maxOutputLength: Math.max(size, 1) });
      } catch {
        throw this.eio(at);
      }
      if (out.length !== size) throw this.eio(at);
      return out;
    })();
    this.cached = { chunk, data };
    data.catch(() => {
      if (this.cached?.data === data) this.cached = null;
    });
    return data;
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    for (let done = 0; done < buf.length; ) {
      const pos = offset + done;
      const sector = Math.floor(pos / SECTOR);
      const chunk = searchChunk(this.c, sector);
      if (chunk < 0) throw this.eio(pos);
      const chunkStart = this.c.sectors[chunk] * SECTOR;
      const chunkEnd = chunkStart + this.c.sectorCounts[chunk] * SECTOR;
      const n = Math.min(buf.length - done, chunkEnd - pos);
      const type = this.c.types[chunk];
      if (type === UDZE || type === UDIG) {
        buf.fill(0, done, done + n);
      } else if (type === UDRW || type === UDZO) {
        const data = await this.decode(chunk, pos);
        data.copy(buf, done, pos - chunkStart, pos - chunkStart + n);
      } else {
        throw this.eio(pos);
      }
      done += n;
    }
  }





}

async function openDmg(file: HostFile, writable: boolean): Promise<BlockImage> {
  const name = file.path;
  if (writable) throw new QimgError(`Could not open '${name}': Image is read-only`, { file: name });
  const u = await readUdif(file, name);
  for (const t of u.unsupported) warnOnce(t);
  return new DmgImage(file, name, u.totalSectors, u.chunks);
}

export const dmgDriver: FormatDriver = {
  name: 'dmg',
  probe: (_head, filename) => (filename.length > 4 && filename.endsWith('.dmg') ? 2 : 0),
  createOptions: [],
  describeCreate: () => '',
  open: (file, ctx) => openDmg(file, !!ctx.options.writable && file.writable),
};
