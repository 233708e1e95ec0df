/**
 * Creating qcow2 images: options validated with qemu-img's messages, the initial
 * layout (header, refcount table, refcount blocks, L1 table) written in one go, then
 * preallocation through the regular write path.
 */
import { unlink } from 'node:fs/promises';
import { openNewImageFile } from '../../io/new-file.js';
import { QimgError } from '../../core/errors.js';
import type { OptionValue } from '../../core/options.js';
import { openImage, resolveRelative } from '../../core/open.js';
import { writeU64 } from '../../core/units.js';
import * as C from './constants.js';
import type { Qcow2Header } from './header.js';
import { serializeHeader } from './header-serialize.js';
import { writeRefcountEntry } from './refcount.js';
import type { Qcow2Image } from './driver.js';
import { requireSecret, type SecretStore } from '../../core/secrets.js';
import type { Luks1CreateOptions } from '../../crypto/luks1.js';
import { LUKS_CREATE_KEYS } from './options.js';

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

export interface Qcow2CreateSpec {
  size: number;
  clusterSize: number;
  version: 2 | 3;
  lazyRefcounts: boolean;
  refcountBits: number;
  compressionType: number;
  extendedL2: boolean;
  preallocation: Preallocation;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  dataFileRaw: boolean;
  /** encrypt the data clusters (the passphrase is the caller's to zero) */
  encryption?: Qcow2EncryptionSpec;
}

/** aes: the passphrase alone; luks: the LUKS parameters too (QEMU's names, absent = its defaults). */
export type Qcow2EncryptionSpec = { format: 'aes' | 'luks' } & Pick<
  Luks1CreateOptions,
  'passphrase' | 'cipherAlg' | 'cipherMode' | 'ivgenAlg' | 'ivgenHashAlg' | 'hashAlg' | 'iterTime'
>;

const V3_REQUIRED = '(use version=v3 or greater)';

/**
 * The encrypt.* options (and the old `encryption=on`), with qemu-img 7.2's refusals;
 * the passphrase comes from the secret `encrypt.key-secret` names.
 */
function encryptionFromOptions(o: Map<string, OptionValue>, secrets: SecretStore | undefined): Qcow2EncryptionSpec | undefined {
  let format = o.get('encrypt.format') as string | undefined;
  const legacy = o.get('encryption') as boolean | undefined;
  if (legacy === true) {
    if (format !== undefined) throw new QimgError("'encrypt.format' and its alias 'encryption' can't be used at the same time");
    format = 'aes';
  }
  const luksKeys = LUKS_CREATE_KEYS.filter((k) => o.has(k));
  if (format === undefined) {
    if (o.has('encrypt.key-secret') || luksKeys.length > 0) throw new QimgError("Parameter 'encrypt.format' is missing");
    return undefined;
  }
  if (format !== 'aes' && format !== 'luks') throw new QimgError(`Parameter 'format' does not accept value '${format}'`);
  if (format === 'aes' && luksKeys.length > 0) throw new QimgError(`Parameter '${luksKeys[0]}' is unexpected`);
  const passphrase = requireSecret(secrets, o.get('encrypt.key-secret') as string | undefined, 'encrypt.key-secret');
  const spec: Qcow2EncryptionSpec = { format, passphrase };
  if (format === 'luks') {
    spec.cipherAlg = o.get('encrypt.cipher-alg') as string | undefined;
    spec.cipherMode = o.get('encrypt.cipher-mode') as string | undefined;
    spec.ivgenAlg = o.get('encrypt.ivgen-alg') as string | undefined;
    spec.ivgenHashAlg = o.get('encrypt.ivgen-hash-alg') as string | undefined;
    spec.hashAlg = o.get('encrypt.hash-alg') as string | undefined;
    spec.iterTime = o.get('encrypt.iter-time') as number | undefined;
  }
  return spec;
}

/** Turns `-o` values into a create spec, with qemu-img's refusals. */
export function qcow2SpecFromOptions(size: number, o: Map<string, OptionValue>, secrets?: SecretStore): Qcow2CreateSpec {
  const compat = (o.get('compat') as string | undefined) ?? '1.1';
  let version: 2 | 3;
  if (compat === '0.10' || compat === 'v2') version = 2;
  else if (compat === '1.1' || compat === 'v3') version = 3;
  else throw new QimgError(`Parameter 'version' does not accept value '${compat}'`);

  const clusterSize = Number((o.get('cluster_size') as bigint | undefined) ?? 65536n);
  if (!Number.isInteger(Math.log2(clusterSize)) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024) {
    throw new QimgError('Cluster size must be a power of two between 512 and 2048k');
  }
  const preallocation = ((o.get('preallocation') as string | undefined) ?? 'off') as Preallocation;
  if (!['off', 'metadata', 'falloc', 'full'].includes(preallocation)) {
    throw new QimgError(`Parameter 'preallocation' does not accept value '${preallocation}'`);
  }
  const compression = (o.get('compression_type') as string | undefined) ?? 'zlib';
  if (compression !== 'zlib' && compression !== 'zstd') {
    throw new QimgError(`Parameter 'compression-type' does not accept value '${compression}'`);
  }
  const backingFile = o.get('backing_file') as string | undefined;
  const backingFormat = o.get('backing_fmt') as string | undefined;
  const dataFile = o.get('data_file') as string | undefined;
  const dataFileRaw = (o.get('data_file_raw') as boolean | undefined) ?? false;
  const lazyRefcounts = (o.get('lazy_refcounts') as boolean | undefined) ?? false;
  const extendedL2 = (o.get('extended_l2') as boolean | undefined) ?? false;
  const refcountBits = (o.get('refcount_bits') as number | undefined) ?? 16;

  if (backingFile !== undefined && dataFileRaw) throw new QimgError('Backing file and data-file-raw cannot be used at the same time');
  if (version < 3 && dataFile !== undefined) {
    throw new QimgError(`External data files are only supported with compatibility level 1.1 and above ${V3_REQUIRED}`);
  }
  if (dataFileRaw && dataFile === undefined) throw new QimgError('data-file-raw requires data-file');
  if (version < 3 && lazyRefcounts) {
    throw new QimgError(`Lazy refcounts only supported with compatibility level 1.1 and above ${V3_REQUIRED}`);
  }
  if (!Number.isInteger(Math.log2(refcountBits)) || refcountBits > 64 || refcountBits < 1) {
    throw new QimgError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  // qemu-img 7.2's wording (not "compat=0.10 requires refcount_bits=16")
  if (version < 3 && refcountBits !== 16) {
    throw new QimgError(`Different refcount widths than 16 bits require compatibility level 1.1 or above ${V3_REQUIRED}`);
  }
  if (version < 3 && compression !== 'zlib') {
    throw new QimgError(`Non-zlib compression type is only supported with compatibility level 1.1 and above ${V3_REQUIRED}`);
  }
  if (extendedL2) {
    if (version < 3) throw new QimgError(`Extended L2 entries are only supported with compatibility level 1.1 and above ${V3_REQUIRED}`);
    if (clusterSize < 16384) throw new QimgError('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  if (backingFile !== undefined && preallocation !== 'off' && !extendedL2) {
    throw new QimgError('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  // qemu-img refuses a backing format without a backing file (-F alone, -o backing_fmt alone)
  if (backingFormat !== undefined && backingFile === undefined) {
    throw new QimgError('Backing format cannot be used without backing file');
  }
  const l2Entries = clusterSize / (extendedL2 ? 16 : 8);
  if (Math.ceil(size / (clusterSize * l2Entries)) * 8 > C.MAX_L1_BYTES) {
    throw new QimgError('The image size is too large for file format \'qcow2\' (try using a larger cluster size)');
  }
  return {
    size,
    clusterSize,
    version,
    lazyRefcounts,
    refcountBits,
    compressionType: compression === 'zstd' ? C.COMPRESSION_ZSTD : C.COMPRESSION_ZLIB,
    extendedL2,
    preallocation,
    backingFile,
    backingFormat,
    dataFile,
    dataFileRaw,
    encryption: encryptionFromOptions(o, secrets),
  };
}

/** The initial layout: how many clusters each structure needs. */
function layout(spec: Qcow2CreateSpec): { reftableClusters: number; refblocks: number; l1Size: number; l1Clusters: number } {
  const cs = spec.clusterSize;
  const l2Entries = cs / (spec.extendedL2 ? 16 : 8);
  const l1Size = Math.ceil(spec.size / (cs * l2Entries));
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  const blockEntries = (cs * 8) / spec.refcountBits;
  let reftableClusters = 1;
  let refblocks = 1;
  for (;;) {
    const total = 1 + reftableClusters + refblocks + l1Clusters;
    const needBlocks = Math.ceil(total / blockEntries);
    const needTable = Math.max(1, Math.ceil((needBlocks * 8) / cs));
    if (needBlocks === refblocks && needTable === reftableClusters) break;
    refblocks = Math.max(refblocks, needBlocks);
    reftableClusters = Math.max(reftableClusters, needTable);
  }
  return { reftableClusters, refblocks, l1Size, l1Clusters };
}

/**
 * Writes a new qcow2 image at `path` (an existing file is replaced). A failure once
 * the files were created removes them.
 */
export async function createQcow2(path: string, spec: Qcow2CreateSpec): Promise<void> {
  const created: string[] = [];
  try {
    await writeQcow2(path, spec, created);
  } catch (err) {
    for (const f of created) await unlink(f).catch(() => undefined);
    throw err;
  } finally {
    spec.encryption?.passphrase.fill(0);
  }
}

async function writeQcow2(path: string, spec: Qcow2CreateSpec, created: string[]): Promise<void> {
  const cs = spec.clusterSize;
  const { reftableClusters, refblocks, l1Size, l1Clusters } = layout(spec);
  const reftableOffset = cs;
  const refblockOffset = reftableOffset + reftableClusters * cs;
  const l1Offset = refblockOffset + refblocks * cs;
  const used = 1 + reftableClusters + refblocks + l1Clusters;

  let incompat = 0n;
  let autoclear = 0n;
  if (spec.compressionType !== C.COMPRESSION_ZLIB) incompat |= C.INCOMPAT_COMPRESSION;
  if (spec.extendedL2) incompat |= C.INCOMPAT_EXTL2;
  if (spec.dataFile !== undefined) incompat |= C.INCOMPAT_DATA_FILE;
  if (spec.dataFileRaw) autoclear |= C.AUTOCLEAR_DATA_FILE_RAW;
  const header: Qcow2Header = {
    version: spec.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: Math.log2(cs),
    size: spec.size,
    // LUKS is set up (and the method switched to it) once the image exists
    cryptMethod: spec.encryption?.format === 'aes' ? C.CRYPT_AES : C.CRYPT_NONE,
    l1Size,
    l1TableOffset: l1Offset,
    refcountTableOffset: reftableOffset,
    refcountTableClusters: reftableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: incompat,
    compatibleFeatures: spec.lazyRefcounts ? C.COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: autoclear,
    refcountOrder: Math.log2(spec.refcountBits),
    headerLength: spec.version >= 3 ? C.HEADER_V3_LENGTH : C.HEADER_V2_LENGTH,
    compressionType: spec.compressionType,
    unknownHeaderFields: Buffer.alloc(spec.version >= 3 ? C.HEADER_V3_LENGTH - C.HEADER_V3_MIN_LENGTH - 1 : 0),
    backingFile: spec.backingFile,
    backingFormat: spec.backingFormat,
    dataFile: spec.dataFile,
    featureTable: [],
    unknownExtensions: [],
  };
  // Whole clusters, as QEMU writes them (the host file's allocation feeds heuristics
  // such as metadata-preallocation detection).
  const head = Buffer.alloc(cs);
  let headerBytes: Buffer;
  try {
    headerBytes = serializeHeader(header);
  } catch (err) {
    // qemu-img's wording when the backing file name does not fit into the header cluster
    if (spec.backingFile !== undefined && err instanceof QimgError && /do not fit/.test(err.message)) {
      throw new QimgError(`Could not assign backing file '${spec.backingFile}' with format '${spec.backingFormat ?? ''}': No space left on device`, { cause: err });
    }
    throw err;
  }
  headerBytes.copy(head);

  const reftable = Buffer.alloc(reftableClusters * cs);
  for (let i = 0; i < refblocks; i++) writeU64(reftable, i * 8, refblockOffset + i * cs);
  const blocks = Buffer.alloc(refblocks * cs);
  const blockEntries = (cs * 8) / spec.refcountBits;
  for (let c = 0; c < used; c++) {
    const b = Math.floor(c / blockEntries);
    writeRefcountEntry(blocks.subarray(b * cs, (b + 1) * cs), c % blockEntries, spec.refcountBits, 1);
  }

  const handle = await openNewImageFile(path);
  if ((await handle.stat()).isFile()) created.push(path);
  try {
    // The header goes last: until it is written the file is no qcow2 image at all, so a
    // crash in between never leaves a header pointing at missing refcount structures.
    await handle.write(reftable, 0, reftable.length, reftableOffset);
    await handle.write(blocks, 0, blocks.length, refblockOffset);
    // The L1 table is not padded to a cluster, as in QEMU's images.
    await handle.truncate(l1Offset + l1Size * 8);
    await handle.write(head, 0, head.length, 0);
    await handle.datasync();
  } finally {
    await handle.close();
  }

  if (spec.dataFile !== undefined) {
    const dataPath = resolveRelative(spec.dataFile, path);
    const dh = await openNewImageFile(dataPath);
    if ((await dh.stat()).isFile()) created.push(dataPath);
    try {
      await dh.truncate(spec.size);
    } finally {
      await dh.close();
    }
  }

  if (spec.encryption?.format === 'luks') await setUpLuks(path, spec.encryption);

  // A raw data file must stay a valid raw image: QEMU maps all of it up front.
  const mode = spec.preallocation === 'off' && spec.dataFileRaw ? 'metadata' : spec.preallocation;
  if (mode !== 'off') {
    const img = (await openImage(path, { format: 'qcow2', writable: true, noBacking: true })) as Qcow2Image;
    try {
      await img.preallocate(mode);
    } finally {
      await img.close();
    }
  }
}

/**
 * Puts a LUKS header into a new image as QEMU does: clusters allocated after the
 * initial structures for the whole header area (the payload offset LUKS computes),
 * zeroed, the header and key slot 0 written there, then the crypto header extension
 * and crypt_method 2 switched on in the qcow2 header.
 */
async function setUpLuks(path: string, enc: Qcow2EncryptionSpec): Promise<void> {
  const { createLuks1 } = await import('../../crypto/luks1.js');
  const img = (await openImage(path, { format: 'qcow2', writable: true, noBacking: true })) as Qcow2Image;
  try {
    let area: { offset: number; length: number } | null = null;
    const vol = await createLuks1(
      async (offset, buf) => {
        if (!area || offset + buf.length > area.length) throw new QimgError('Request for data outside of extension header');
        await img.file.write(buf, area.offset + offset);
      },
      {
        ...enc,
        optPrefix: 'encrypt.',
        init: async (payloadOffset) => {
          area = await img.reserveCryptoArea(payloadOffset);
        },
      },
    );
    vol.masterKey.fill(0);
    await img.enableLuks(area!);
  } finally {
    await img.close();
  }
}

/** "cluster_size=65536 extended_l2=off ... refcount_bits=16", qemu-img's fixed order. */
export function describeQcow2Create(size: bigint, o: { values: Map<string, OptionValue>; raw: Map<string, string> }): string {
  const parts: string[] = [];
  const num = (k: string, def?: string) => {
    const v = o.values.get(k);
    if (v !== undefined) parts.push(`${k}=${v}`);
    else if (def !== undefined) parts.push(`${k}=${def}`);
  };
  const str = (k: string, def?: string) => {
    const v = o.raw.get(k);
    if (v !== undefined) parts.push(`${k}=${v}`);
    else if (def !== undefined) parts.push(`${k}=${def}`);
  };
  // qemu-img prints the encryption options first, in this order
  for (const k of ['encryption', 'encrypt.format', 'encrypt.key-secret', ...LUKS_CREATE_KEYS]) str(k);
  num('cluster_size', '65536');
  str('extended_l2', 'off');
  str('preallocation');
  str('compression_type', 'zlib');
  parts.push(`size=${size}`);
  // qemu-img prints compat before the backing file, whatever the -o order
  str('compat');
  str('backing_file');
  str('backing_fmt');
  str('data_file');
  str('data_file_raw');
  str('lazy_refcounts', 'off');
  num('refcount_bits', '16');
  return parts.join(' ');
}
