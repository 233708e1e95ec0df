/**
 * An open standalone luks image (qemu's "luks" block driver): a LUKS1 header at byte
 * 0, the guest disk encrypted from the payload offset on, 512-byte sectors whose IV is
 * the guest sector number.
 *
 * As in QEMU there is no allocation map: every range is data (no host offset: the bytes
 * are not readable raw), zero writes store encrypted zeros, discard keeps the data, and
 * unwritten payload (holes, space added by resize) decrypts to noise, not zeros.
 */
import { assertWritableRange, type BlockImage, type ImageInfo, type LayerStatus } from '../../core/block-image.js';
import { QimgError } from '../../core/errors.js';
import { Mutex } from '../../core/mutex.js';
import { alignDown, alignUp } from '../../core/units.js';
import type { Luks1Volume } from '../../crypto/luks1.js';
import type { SectorCipher } from '../../crypto/sector-cipher.js';
import { allocateFile } from '../../io/allocate.js';
import type { HostFile } from '../../io/host.js';

export type LuksHeader = Luks1Volume['header'];
export type LuksAlgorithms = Luks1Volume['algorithms'];

export const LUKS_SECTOR = 512;
/** Bytes encrypted or decrypted per step: bounds the copies a large request makes. */
const CHUNK = 1024 * 1024;

export class LuksImage implements BlockImage {
  readonly format = 'luks';
  readonly backing = null;
  readonly allocationUnit = LUKS_SECTOR;
  readonly payloadOffset: number;
  private size: number;
  /** serialises read-modify-write of partial sectors (two may share a sector) */
  private readonly rmw = new Mutex();

  constructor(
    readonly file: HostFile,
    readonly filename: string,
    readonly header: LuksHeader,
    readonly algorithms: LuksAlgorithms,
    /** the payload cipher; null when opened for metadata only (no key) */
    private cipher: SectorCipher | null,
  ) {
    this.payloadOffset = header.payloadOffsetSector * LUKS_SECTOR;
    // QEMU: the file's length after the payload offset, in whole sectors
    this.size = alignUp(file.size - this.payloadOffset, LUKS_SECTOR);
  }

  get virtualSize(): number {
    return this.size;
  }

  get readOnly(): boolean {
    return !this.file.writable;
  }

  private key(): SectorCipher {
    if (!this.cipher) throw new QimgError('the image was opened without its key (metadata only)', { file: this.filename });
    return this.cipher;
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    if (offset < 0 || offset + buf.length > this.size) {
      throw new QimgError(`read beyond the end of the image (offset ${offset}, length ${buf.length})`, { file: this.filename });
    }
    const cipher = this.key();
    for (let done = 0; done < buf.length; ) {
      const pos = offset + done;
      const start = alignDown(pos, LUKS_SECTOR);
      const end = Math.min(alignUp(offset + buf.length, LUKS_SECTOR), start + CHUNK);
      const part = buf.subarray(done, done + Math.min(end, offset + buf.length) - pos);
      // whole sectors decrypt in the caller's buffer; partial ones through a copy
      const whole = start === pos && part.length === end - start;
      const sectors = whole ? part : Buffer.allocUnsafe(end - start);
      await this.file.read(sectors, this.payloadOffset + start);
      cipher.decrypt(sectors, start / LUKS_SECTOR);
      if (!whole) sectors.copy(part, 0, pos - start, pos - start + part.length);
      done += part.length;
    }
  }

  async write(offset: number, data: Buffer): Promise<void> {
    assertWritableRange(this, this.file.writable, offset, data.length);
    const cipher = this.key();
    if (data.length === 0) return;
    const end = offset + data.length;
    if (offset % LUKS_SECTOR === 0 && end % LUKS_SECTOR === 0) {
      await this.writeSectors(cipher, offset, data);
      return;
    }
    // A partial sector: read, merge and rewrite it whole (QEMU's block layer pads the same way).
    await this.rmw.run(async () => {
      const start = alignDown(offset, LUKS_SECTOR);
      const stop = alignUp(end, LUKS_SECTOR);
      const buf = Buffer.alloc(stop - start);
      await this.read(start, buf.subarray(0, LUKS_SECTOR));
      if (stop - LUKS_SECTOR > start) await this.read(stop - LUKS_SECTOR, buf.subarray(buf.length - LUKS_SECTOR));
      data.copy(buf, offset - start);
      await this.writeSectors(cipher, start, buf);
      buf.fill(0);
    });
  }

  /** Encrypts a copy of whole sectors (never the caller's buffer) and writes it. */
  private async writeSectors(cipher: SectorCipher, offset: number, data: Buffer): Promise<void> {
    const out = Buffer.allocUnsafe(Math.min(CHUNK, data.length));
    for (let done = 0; done < data.length; done += out.length) {
      const n = Math.min(out.length, data.length - done);
      const piece = out.subarray(0, n);
      data.copy(piece, 0, done, done + n);
      cipher.encrypt(piece, (offset + done) / LUKS_SECTOR);
      await this.file.write(piece, this.payloadOffset + offset + done);
    }
  }

  /** No zero flag in LUKS: zeros are written encrypted, as QEMU's fallback does. */
  async writeZeroes(offset: number, length: number): Promise<void> {
    assertWritableRange(this, this.file.writable, offset, length);
    const zeros = Buffer.alloc(Math.min(CHUNK, length));
    for (let done = 0; done < length; done += zeros.length) {
      await this.write(offset + done, zeros.subarray(0, Math.min(zeros.length, length - done)));
    }
  }

  /** Advisory, and QEMU's luks keeps the data: a hole would decrypt to noise. */
  async discard(offset: number, length: number): Promise<void> {
    assertWritableRange(this, this.file.writable, offset, length);
  }

  /** QEMU's status for a driver without block status: all data, no host offset. */
  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    return { length: Math.min(length, this.size - offset), data: true, zero: false };
  }

  /**
   * The payload ends where the file does: resize truncates the file to payload offset +
   * size (QEMU keeps the unrounded size in the file), preallocating the host file.
   */
  async resize(size: number, opts: { preallocation?: 'off' | 'metadata' | 'falloc' | 'full' } = {}): Promise<void> {
    if (!this.file.writable) throw new QimgError('image is opened read-only', { file: this.filename });
    const mode = opts.preallocation ?? 'off';
    if (mode === 'metadata') throw new QimgError('Unsupported preallocation mode: metadata', { file: '' });
    const old = this.file.size;
    const target = this.payloadOffset + size;
    await this.file.truncate(target);
    if (target > old && mode === 'falloc') await allocateFile(this.file.fd, target, old);
    if (target > old && mode === 'full') {
      const zeros = Buffer.alloc(Math.min(target - old, CHUNK));
      for (let p = old; p < target; p += zeros.length) await this.file.write(zeros.subarray(0, Math.min(zeros.length, target - p)), p);
    }
    await this.file.flush();
    this.size = alignUp(size, LUKS_SECTOR);
  }

  async info(): Promise<ImageInfo> {
    return {
      filename: this.filename,
      format: 'luks',
      virtualSize: this.size,
      actualSize: await this.file.allocatedSize(),
      encrypted: true,
      dirtyFlag: false,
      formatSpecific: { type: 'luks', data: luksInfo(this.header, this.algorithms) },
    };
  }

  async flush(): Promise<void> {
    if (this.file.writable) await this.file.flush();
  }

  /** Closes the file; the cipher's key copies are zeroed first. */
  async close(): Promise<void> {
    this.cipher?.destroy();
    this.cipher = null;
    await this.file.close();
  }
}

/**
 * qemu-img info's format-specific data of a luks image (QCryptoBlockInfoLUKS), members
 * in schema order; the output layer puts them in qemu's QDict order.
 */
export function luksInfo(h: LuksHeader, a: LuksAlgorithms): Record<string, unknown> {
  const info: Record<string, unknown> = {
    'cipher-alg': a.cipherAlg,
    'cipher-mode': a.cipherMode,
    'ivgen-alg': a.ivgenAlg,
  };
  if (a.ivgenAlg === 'essiv' && a.ivgenHashAlg !== undefined) info['ivgen-hash-alg'] = a.ivgenHashAlg;
  info['hash-alg'] = a.hashAlg;
  info['payload-offset'] = h.payloadOffsetSector * LUKS_SECTOR;
  info['master-key-iters'] = h.masterKeyIterations;
  info.uuid = h.uuid;
  info.slots = h.slots.map((s) => {
    const slot: Record<string, unknown> = { active: s.active };
    if (s.active) {
      slot.iters = s.iterations;
      slot.stripes = s.stripes;
    }
    slot['key-offset'] = s.keyOffsetSector * LUKS_SECTOR;
    return slot;
  });
  return info;
}
