/**
 * The qcow (version 1) driver: probing, open with QEMU's validation (AES-encrypted
 * images are refused for reading as QEMU refuses them without a key; `info` works),
 * create with qemu-img's options and messages, convert -c. QEMU has no check for it.
 */
import type { BlockImage } from '../../core/block-image.js';
import type { FormatDriver } from '../../core/driver.js';
import { QimgError, describeSystemError } from '../../core/errors.js';
import type { OpenContext } from '../../core/open.js';
import type { OptionSpec, OptionValue, ParsedOptions } from '../../core/options.js';
import type { HostFile } from '../../io/host.js';
import { parseQcowHeader, probeQcow, QCOW_CRYPT_AES, QCOW_CRYPT_NONE, QCOW_HEADER_BYTES, serializeQcowHeader, type QcowHeader } from './header.js';
import { QcowImage } from './image.js';
import { writeNewFile } from '../../io/new-file.js';

/** `qemu-img create -f qcow -o help`, in its order. */
export const qcowCreateOptions: readonly OptionSpec[] = [
  { name: 'backing_file', type: 'string', help: 'File name of a base image' },
  { name: 'backing_fmt', type: 'string', help: 'Format of the backing image' },
  { name: 'encrypt.format', type: 'string', help: "Encrypt the image, format choices: 'aes'" },
  { name: 'encrypt.key-secret', type: 'string', help: 'ID of the secret that provides the AES encryption key' },
  { name: 'encryption', type: 'bool', help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)" },
  { name: 'size', type: 'size', help: 'Virtual disk size' },
];

/** Formats QEMU 7.2 knows (`qemu-img --help`): backing_fmt must name one. */
const QEMU_FORMATS = new Set(
  ('blkdebug blklogwrites blkverify bochs cloop compress copy-before-write copy-on-read dmg file ftp ftps gluster host_cdrom ' +
    'host_device http https iscsi iser luks nbd nfs null-aio null-co nvme parallels preallocate qcow qcow2 qed quorum raw rbd ' +
    'replication snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat').split(' '),
);

async function openQcow(file: HostFile, ctx: OpenContext): Promise<BlockImage> {
  const name = file.path;
  const h = parseQcowHeader(await file.readBytes(0, QCOW_HEADER_BYTES), name, { metadataOnly: !!ctx.options.metadataOnly });
  // Only the part of the L1 table inside the file is read: the rest reads as zeros anyway.
  const l1Bytes = Math.max(0, Math.min(h.l1Size * 8, file.size - h.l1TableOffset));
  const l1 = await file.readBytes(h.l1TableOffset, l1Bytes - (l1Bytes % 8));
  let backingName: string | undefined;
  if (h.backingFileOffset !== 0) {
    const raw = await file.readBytes(h.backingFileOffset, h.backingFileSize);
    const nul = raw.indexOf(0);
    backingName = (nul < 0 ? raw : raw.subarray(0, nul)).toString('utf8');
  }
  let backing: BlockImage | null = null;
  if (backingName !== undefined && !ctx.options.metadataOnly && !ctx.options.noBacking) {
    // qcow records no backing format: it is probed unless given
    backing = await ctx.openBacking(backingName, ctx.chain.length === 1 ? ctx.options.backingFormat : undefined, name);
  }
  const img = new QcowImage(file, name, h, backingName, l1, backing);
  if (h.cryptMethod === QCOW_CRYPT_AES && !ctx.options.metadataOnly) {
    // the legacy cipher is qcow2's AES one (guest-sector IVs); loaded only for such images
    const { keySecretFor, legacyAesEncryption } = await import('../qcow2/encryption.js');
    let passphrase: Buffer;
    try {
      passphrase = keySecretFor(ctx.options);
    } catch (err) {
      await backing?.close();
      throw err instanceof QimgError ? new QimgError(err.message, { file: name }) : err;
    }
    try {
      img.cipher = legacyAesEncryption(passphrase);
    } finally {
      passphrase.fill(0);
    }
  }
  return img;
}

/**
 * QEMU's handling of the encryption options, in its order: `encryption` is the old
 * alias of `encrypt.format` ("on" means aes), "aes" is the qcow format. qimg cannot
 * create encrypted images (no secrets yet), so every valid request ends in the
 * message qemu-img gives when the key is missing or unknown.
 */
function encryptionError(o: Map<string, OptionValue>, size: number): QimgError | null {
  const alias = o.get('encryption');
  let format = o.get('encrypt.format') as string | undefined;
  if (format === 'aes') format = 'qcow';
  if (alias === true && format !== undefined) return new QimgError("'encrypt.format' and its alias 'encryption' can't be used at the same time");
  if (alias === true) format = 'qcow';
  if (format !== undefined && format !== 'qcow' && format !== 'luks') return new QimgError(`Parameter 'format' does not accept value '${format}'`);
  if (size === 0) return new QimgError('Image size is too small, cannot be zero length');
  if (format === 'luks') return new QimgError('Unsupported encryption format');
  if (format === 'qcow') {
    const secret = o.get('encrypt.key-secret') as string | undefined;
    return new QimgError(secret === undefined ? "Parameter 'encrypt.key-secret' is required for cipher" : `No secret with id '${secret}'`);
  }
  return null;
}

async function createQcow(path: string, size: number, o: Map<string, OptionValue>): Promise<void> {
  const backingFmt = o.get('backing_fmt') as string | undefined;
  if (backingFmt !== undefined && !QEMU_FORMATS.has(backingFmt)) throw new QimgError(`unrecognized backing format '${backingFmt}'`);
  const refusal = encryptionError(o, size);
  if (refusal) throw refusal;
  const backingFile = o.get('backing_file') as string | undefined;
  const nameBytes = Buffer.from(backingFile ?? '', 'utf8');
  // With a backing file QEMU uses 512-byte clusters, so that no write needs copy-on-write.
  const clusterBits = backingFile !== undefined ? 9 : 12;
  const l2Bits = backingFile !== undefined ? 12 : 9;
  const headerSize = Math.ceil((QCOW_HEADER_BYTES + nameBytes.length) / 8) * 8;
  const shift = clusterBits + l2Bits;
  const l1Size = Math.ceil(size / 2 ** shift);
  const h: QcowHeader = {
    backingFileOffset: backingFile !== undefined ? QCOW_HEADER_BYTES : 0,
    backingFileSize: nameBytes.length,
    mtime: 0,
    size,
    clusterBits,
    l2Bits,
    cryptMethod: QCOW_CRYPT_NONE,
    l1TableOffset: headerSize,
    l1Size,
  };
  await writeNewFile(path, async (handle) => {
    // The L1 table in whole sectors of zeros, as QEMU writes it; the header last.
    const l1Bytes = Math.ceil((l1Size * 8) / 512) * 512;
    const chunk = Buffer.alloc(Math.min(l1Bytes, 4 * 1024 * 1024));
    for (let p = 0; p < l1Bytes; p += chunk.length) {
      const n = Math.min(chunk.length, l1Bytes - p);
      await handle.write(chunk, 0, n, headerSize + p);
    }
    const head = Buffer.concat([serializeQcowHeader(h), nameBytes]);
    await handle.write(head, 0, head.length, 0);
    await handle.datasync();
  }, (err) => new QimgError(describeSystemError(err), { cause: err }));
}

function describeQcowCreate(size: bigint, o: ParsedOptions): string {
  const parts = [`size=${size}`];
  for (const k of ['backing_file', 'backing_fmt', 'encryption', 'encrypt.format', 'encrypt.key-secret']) {
    if (o.raw.has(k)) parts.push(`${k}=${o.raw.get(k)}`);
  }
  return parts.join(' ');
}

export const qcow1Driver: FormatDriver = {
  name: 'qcow',
  probe: (head) => probeQcow(head),
  open: openQcow,
  createOptions: qcowCreateOptions,
  describeCreate: describeQcowCreate,
  create: createQcow,
  supportsCompression: true,
};
