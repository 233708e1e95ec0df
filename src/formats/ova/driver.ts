/**
 * OVA (beyond qemu-img): a tar archive holding an OVF descriptor first and the
 * appliance's disks (usually streamOptimized VMDKs). Opening an OVA opens one of its
 * disks in place, through a window of the archive (no unpacking): the first disk, or
 * the one named as `appliance.ova/DISK` (DISK is the member's file name or the OVF
 * disk id). `info` lists every disk of the appliance.
 */
import type { BlockImage, ImageInfo, LayerStatus } from '../../core/block-image.js';
import type { FormatDriver } from '../../core/driver.js';
import { CorruptImageError, QimgError } from '../../core/errors.js';
import type { OpenContext } from '../../core/open.js';
import type { HostFile } from '../../io/host.js';
import { SliceFile } from '../../io/slice.js';
import { parseOvf, type OvfDisk, type OvfFile } from './ovf.js';
import { isTarHeader, listTar, type TarMember } from './tar.js';
import { NeverWritable } from '../../core/read-only-image.js';

/** Largest OVF descriptor read (real ones are a few KiB). */
const MAX_DESCRIPTOR = 16 * 1024 * 1024;

export interface OvaDisk {
  diskId: string;
  /** the member's name in the archive (undefined for a disk the OVF declares empty) */
  file?: string;
  member?: TarMember;
  ovf: OvfDisk;
  ref?: OvfFile;
}

/** The tar starts with the OVF descriptor (the OVA rule), or at least contains one. */
function probeOva(head: Buffer): number {
  if (!isTarHeader(head)) return 0;
  const nul = head.indexOf(0);
  const name = head.toString('utf8', 0, nul < 0 || nul > 100 ? 100 : nul);
  return /\.ovf$/i.test(name) ? 100 : 0;
}

function normaliseHref(href: string): string {
  return href.replace(/^(\.\/)+/, '');
}

/** The disk's format as the OVF names it: "vmdk" and "streamOptimized" from VMware's URL. */
function ovfFormat(url: string | undefined): { format?: string; subformat?: string } {
  if (!url) return {};
  const hash = url.lastIndexOf('#');
  const sub = hash >= 0 ? url.slice(hash + 1) : undefined;
  if (/vmdk/i.test(url)) return { format: 'vmdk', subformat: sub };
  if (/qcow2/i.test(url)) return { format: 'qcow2', subformat: sub };
  if (/vhdx/i.test(url)) return { format: 'vhdx', subformat: sub };
  if (/vhd|virtualpc/i.test(url)) return { format: 'vpc', subformat: sub };
  return { format: url };
}

export async function readOvaDisks(file: HostFile): Promise<{ descriptor: TarMember; disks: OvaDisk[] }> {
  const members = await listTar(file);
  const descriptor = members.find((m) => m.type === '0' && /\.ovf$/i.test(m.name));
  if (!descriptor) throw new CorruptImageError(file.path, 'the archive holds no OVF descriptor');
  if (descriptor.size > MAX_DESCRIPTOR) throw new CorruptImageError(file.path, 'the OVF descriptor is too large');
  const text = (await file.readBytes(descriptor.offset, descriptor.size)).toString('utf8');
  const ovf = parseOvf(text, file.path);
  const disks = ovf.disks.map((d): OvaDisk => {
    const ref = d.fileRef !== undefined ? ovf.files.find((f) => f.id === d.fileRef) : undefined;
    if (d.fileRef !== undefined && !ref) throw new CorruptImageError(file.path, `OVF disk '${d.diskId}' refers to an unknown file '${d.fileRef}'`);
    const name = ref ? normaliseHref(ref.href) : undefined;
    const member = name !== undefined ? members.find((m) => m.type === '0' && normaliseHref(m.name) === name) : undefined;
    return { diskId: d.diskId, file: name, member, ovf: d, ref };
  });
  return { descriptor, disks };
}

/** Picks the disk `spec` names (member file name or disk id), or the first with a file. */
function selectDisk(disks: OvaDisk[], spec: string | undefined, path: string): OvaDisk {
  if (spec === undefined) {
    const first = disks.find((d) => d.file !== undefined);
    if (!first) throw new QimgError('the OVA has no disk with data', { file: path });
    return first;
  }
  const found = disks.find((d) => d.file === normaliseHref(spec)) ?? disks.find((d) => d.diskId === spec);
  if (!found) {
    const names = disks.map((d) => d.file ?? d.diskId).join(', ');
    throw new QimgError(`the OVA has no disk '${spec}' (its disks: ${names || 'none'})`, { file: path });
  }
  return found;
}

export class OvaImage extends NeverWritable implements BlockImage {
  readonly format = 'ova';
  constructor(
    private readonly file: HostFile,
    readonly filename: string,
    readonly disks: OvaDisk[],
    readonly selected: OvaDisk,
    /** the selected disk, opened in place */
    readonly disk: BlockImage,
  ) {
    super();
  }

  get virtualSize(): number {
    return this.disk.virtualSize;
  }

  get backing(): BlockImage | null {
    return this.disk.backing;
  }

  get allocationUnit(): number {
    return this.disk.allocationUnit;
  }

  read(offset: number, buf: Buffer): Promise<void> {
    return this.disk.read(offset, buf);
  }

  async layerStatus(offset: number, length: number): Promise<LayerStatus> {
    const st = await this.disk.layerStatus(offset, length);
    // host offsets inside the member are offsets into the archive
    if (st.hostOffset === undefined || st.file !== this.disk.filename) return st;
    return { ...st, hostOffset: st.hostOffset + (this.selected.member?.offset ?? 0), file: this.filename };
  }

  protected override readOnlyReason(): string {
    return 'an OVA is read-only: convert its disk to write it';
  }

  async info(): Promise<ImageInfo> {
    const inner = await this.disk.info();
    const disks = this.disks.map((d) => {
      const { format, subformat } = ovfFormat(d.ovf.format);
      const entry: Record<string, unknown> = { 'disk-id': d.diskId };
      if (d.file !== undefined) entry.file = d.file;
      if (format !== undefined) entry.format = format;
      if (subformat !== undefined) entry.subformat = subformat;
      if (d.ovf.capacity !== undefined) entry['virtual-size'] = d.ovf.capacity;
      if (d.member) entry['file-size'] = d.member.size;
      if (d.ref?.compression) entry.compression = d.ref.compression;
      entry.selected = d === this.selected;
      return entry;
    });
    return {
      filename: this.filename,
      format: 'ova',
      virtualSize: this.virtualSize,
      actualSize: await this.file.allocatedSize(),
      clusterSize: inner.clusterSize,
      formatSpecific: { type: 'ova', data: { 'disk-format': inner.format, disks } },
    };
  }

  async close(): Promise<void> {
    try {
      await this.disk.close();
    } finally {
      await this.file.close();
    }
  }
}

async function openOva(file: HostFile, ctx: OpenContext): Promise<BlockImage> {
  if (ctx.options.writable) throw new QimgError('an OVA is read-only: convert its disk to write it', { file: file.path });
  const { disks } = await readOvaDisks(file);
  if (disks.length === 0) throw new CorruptImageError(file.path, 'the OVF descriptor lists no disks');
  const chosen = selectDisk(disks, ctx.member, file.path);
  if (chosen.file === undefined) throw new QimgError(`OVF disk '${chosen.diskId}' has no data (an empty disk)`, { file: file.path });
  if (!chosen.member) throw new CorruptImageError(file.path, `the archive has no member '${chosen.file}' for OVF disk '${chosen.diskId}'`);
  if (chosen.ref?.compression && chosen.ref.compression !== 'identity') {
    throw new QimgError(`disk '${chosen.file}' is stored ${chosen.ref.compression}-compressed in the OVA and cannot be read in place: unpack it first`, { file: file.path });
  }
  if (chosen.ref?.chunkSize) throw new QimgError(`disk '${chosen.file}' is split into chunks in the OVA and cannot be read in place`, { file: file.path });
  const slice = new SliceFile(file, chosen.member.offset, chosen.member.size, `${file.path}/${chosen.file}`);
  // probed (as qemu-img would probe the unpacked file) unless -f names the disk's format
  const disk = await ctx.openNested(slice, ctx.options.memberFormat);
  return new OvaImage(file, file.path, disks, chosen, disk);
}

export const ovaDriver: FormatDriver = {
  name: 'ova',
  probe: probeOva,
  archive: true,
  createOptions: [],
  describeCreate: () => '',
  open: openOva,
};
