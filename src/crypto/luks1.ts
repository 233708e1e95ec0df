/**
 * A LUKS1 volume (cryptsetup's LUKS1 on-disk format, as QEMU 7.2 creates, opens and
 * amends it), independent of where it lives: all I/O goes through callbacks with
 * offsets relative to the start of the LUKS header (byte 0 of a standalone luks image,
 * the crypto header area of a qcow2 image).
 *
 * Layout QEMU writes (and cryptsetup's LUKS1 with 4 KiB alignment):
 *   0        592-byte phdr, zeros up to 4096
 *   4096     8 key slots, each keyBytes * 4000 bytes of AF material rounded up to whole
 *            4096-byte units; slot i at sector 8 + i * slotSectors
 *   payload  sector 8 + 8 * slotSectors (2068480 bytes for aes-256-xts)
 * Only slot 0 is written at creation; the others stay as the caller's init left them.
 *
 * Passphrases are Buffers, used up to their first NUL byte as QEMU does (it passes the
 * secret to PBKDF2 with strlen). Keys this module derives are zeroed after use; the
 * master key it returns belongs to the caller.
 */
import { randomBytes, randomFillSync, randomUUID, timingSafeEqual } from 'node:crypto';
import { CorruptImageError, QimgError } from '../core/errors.js';
import {
  LUKS_HEADER_SIZE,
  LUKS_KEY_SLOT_DISABLED,
  LUKS_KEY_SLOT_ENABLED,
  LUKS_KEY_SLOT_OFFSET,
  LUKS_MAGIC,
  LUKS_MAX_PBKDF_ITERATIONS,
  LUKS_NUM_KEY_SLOTS,
  LUKS_SECTOR_SIZE,
  LUKS_STRIPES,
  LUKS_VERSION,
  luksAlgorithms,
  parseLuksHeader,
  type LuksAlgorithms,
  type LuksHeader,
} from '../formats/qcow2/luks.js';
import { afMerge, afSplit } from './af-splitter.js';
import {
  defaultCalibrator,
  LUKS_DEFAULT_ITER_TIME_MS,
  luksMasterKeyIterations,
  luksSlotIterations,
  pbkdf2,
  type PbkdfCalibrator,
} from './pbkdf.js';
import { createSectorCipher, essivCipherAlg, sectorCipherKeyLength, type SectorCipher } from './sector-cipher.js';

export type LuksReadFn = (offset: number, length: number) => Promise<Buffer>;
export type LuksWriteFn = (offset: number, buf: Buffer) => Promise<void>;

const DIGEST_LEN = 20;
const SALT_LEN = 32;
const NAME_LEN = 32;
const UUID_LEN = 40;
const HEADER_SECTORS = LUKS_KEY_SLOT_OFFSET / LUKS_SECTOR_SIZE;
/** QEMU overwrites an erased slot's material this many times with random data. */
const ERASE_PASSES = 40;
/** The LUKS cipher names QEMU 7.2 maps (crypto/block-luks.c), by QEMU algorithm. */
const LUKS_CIPHER_NAMES: Readonly<Record<string, string>> = {
  'aes-128': 'aes', 'aes-192': 'aes', 'aes-256': 'aes',
  'cast5-128': 'cast5',
  'serpent-128': 'serpent', 'serpent-192': 'serpent', 'serpent-256': 'serpent',
  'twofish-128': 'twofish', 'twofish-192': 'twofish', 'twofish-256': 'twofish',
};

export interface Luks1CreateOptions {
  /** slot 0's passphrase (QEMU's key-secret) */
  passphrase: Buffer;
  /** QEMU names and defaults: aes-256, xts, plain64, (essiv: sha256), sha256, 2000 ms */
  cipherAlg?: string;
  cipherMode?: string;
  ivgenAlg?: string;
  /** recorded in the header ("xts-plain64:sha256") even when the ivgen ignores it, as QEMU does */
  ivgenHashAlg?: string;
  hashAlg?: string;
  iterTime?: number;
  /** defaults to a random one */
  uuid?: string;
  /**
   * Called with the payload offset before anything is written, like QEMU's initfunc:
   * reserve (and zero) the header area there. Nothing else of it is written but the
   * phdr and slot 0's material.
   */
  init?: (payloadOffset: number) => Promise<void>;
  /** PBKDF2 speed measurement; QEMU's by default */
  calibrate?: PbkdfCalibrator;
  /** prefix of option names in messages ("encrypt." for qcow2) */
  optPrefix?: string;
}

export interface Luks1Volume {
  header: LuksHeader;
  algorithms: LuksAlgorithms;
  /** the caller owns it: fill(0) it when done */
  masterKey: Buffer;
  /** byte offset of the payload from the start of the header */
  payloadOffset: number;
  /** the slot that was written (create) or unlocked (open) */
  keyslot: number;
}

export interface Luks1OpenOptions {
  /** the image name for error messages */
  fileName?: string;
  /**
   * Refuse key slots (and master key digests) with more PBKDF2 iterations than this
   * (default LUKS_MAX_PBKDF_ITERATIONS; node's pbkdf2 cannot be cancelled).
   */
  maxIterations?: number;
}

export interface Luks1AmendOptions extends Luks1OpenOptions {
  /** new state of the selected slots (QEMU's encrypt.state) */
  state: 'active' | 'inactive';
  keyslot?: number;
  /** passphrase for the new slot (new-secret) */
  newSecret?: Buffer;
  /** erase the slots this passphrase unlocks (old-secret) */
  oldSecret?: Buffer;
  /** QEMU's amend 'secret': the passphrase that unlocks the master key to add a slot */
  secret?: Buffer;
  /** the passphrase the image was opened with (key-secret), used when secret is absent */
  keySecret?: Buffer;
  iterTime?: number;
  /** qemu-img amend --force: allow overwriting active and erasing the last slots */
  force?: boolean;
  calibrate?: PbkdfCalibrator;
  optPrefix?: string;
}

/** The byte layout QEMU gives a new LUKS1 header with keyBytes-long master keys. */
export function luks1Layout(keyBytes: number): { slotOffsets: number[]; slotSectors: number; payloadOffset: number } {
  const sectors = Math.ceil((keyBytes * LUKS_STRIPES) / LUKS_SECTOR_SIZE);
  const slotSectors = Math.ceil(sectors / HEADER_SECTORS) * HEADER_SECTORS;
  const slotOffsets: number[] = [];
  for (let i = 0; i < LUKS_NUM_KEY_SLOTS; i++) slotOffsets.push((HEADER_SECTORS + i * slotSectors) * LUKS_SECTOR_SIZE);
  return { slotOffsets, slotSectors, payloadOffset: (HEADER_SECTORS + LUKS_NUM_KEY_SLOTS * slotSectors) * LUKS_SECTOR_SIZE };
}

/** The 592-byte phdr of h (big endian; strings NUL padded). */
export function encodeLuksHeader(h: LuksHeader): Buffer {
  const buf = Buffer.alloc(LUKS_HEADER_SIZE);
  LUKS_MAGIC.copy(buf, 0);
  buf.writeUInt16BE(h.version, 6);
  putString(buf, 8, NAME_LEN, h.cipherName);
  putString(buf, 40, NAME_LEN, h.cipherMode);
  putString(buf, 72, NAME_LEN, h.hashSpec);
  buf.writeUInt32BE(h.payloadOffsetSector, 104);
  buf.writeUInt32BE(h.keyBytes, 108);
  h.masterKeyDigest.copy(buf, 112, 0, DIGEST_LEN);
  h.masterKeySalt.copy(buf, 132, 0, SALT_LEN);
  buf.writeUInt32BE(h.masterKeyIterations, 164);
  putString(buf, 168, UUID_LEN, h.uuid);
  h.slots.forEach((s, i) => {
    const at = 208 + i * 48;
    buf.writeUInt32BE(s.state, at);
    buf.writeUInt32BE(s.iterations, at + 4);
    s.salt.copy(buf, at + 8, 0, SALT_LEN);
    buf.writeUInt32BE(s.keyOffsetSector, at + 40);
    buf.writeUInt32BE(s.stripes, at + 44);
  });
  return buf;
}

/** Reads and validates the header without a key (QEMU's open with NO_IO, as `info` does). */
export async function readLuks1Header(read: LuksReadFn, fileName?: string): Promise<{ header: LuksHeader; algorithms: LuksAlgorithms }> {
  const buf = await read(0, LUKS_HEADER_SIZE);
  if (buf.length < LUKS_HEADER_SIZE) throw new CorruptImageError(fileName, 'Volume is not in LUKS format');
  const header = parseLuksHeader(buf, fileName);
  const algorithms = luksAlgorithms(header, fileName);
  return { header, algorithms };
}

/** Creates a LUKS1 header with slot 0 unlocked by opts.passphrase, as qemu-img create does. */
export async function createLuks1(write: LuksWriteFn, opts: Luks1CreateOptions): Promise<Luks1Volume> {
  const cipherAlg = opts.cipherAlg ?? 'aes-256';
  const cipherMode = opts.cipherMode ?? 'xts';
  const ivgenAlg = opts.ivgenAlg ?? 'plain64';
  const ivgenHashAlg = opts.ivgenHashAlg ?? (ivgenAlg === 'essiv' ? 'sha256' : undefined);
  const hashAlg = opts.hashAlg ?? 'sha256';
  const iterTime = opts.iterTime ?? LUKS_DEFAULT_ITER_TIME_MS;
  const calibrate = opts.calibrate ?? defaultCalibrator;

  if (!opts.passphrase) throw new QimgError(`Parameter '${opts.optPrefix ?? ''}key-secret' is required for cipher`);
  const cipherName = Object.hasOwn(LUKS_CIPHER_NAMES, cipherAlg) ? LUKS_CIPHER_NAMES[cipherAlg] : undefined;
  if (!cipherName) throw new QimgError(`Algorithm '${cipherAlg}' not supported`);
  const modeSpec = ivgenHashAlg !== undefined ? `${cipherMode}-${ivgenAlg}:${ivgenHashAlg}` : `${cipherMode}-${ivgenAlg}`;
  if (cipherName.length >= NAME_LEN) throw new QimgError(`Cipher name '${cipherName}' is too long for LUKS header`);
  if (modeSpec.length >= NAME_LEN) throw new QimgError(`Cipher mode '${modeSpec}' is too long for LUKS header`);
  if (hashAlg.length >= NAME_LEN) throw new QimgError(`Hash name '${hashAlg}' is too long for LUKS header`);
  const ivgenCipherAlg = ivgenAlg === 'essiv' ? essivCipherAlg(cipherAlg, ivgenHashAlg as string) : cipherAlg;

  const keyBytes = sectorCipherKeyLength(cipherAlg, cipherMode);
  if ((keyBytes * LUKS_STRIPES) % LUKS_SECTOR_SIZE !== 0) {
    // qemu-img 7.2 aborts on an assertion here (aes-192 in cbc/ecb/ctr): refuse instead
    throw new QimgError(
      `Cipher ${cipherAlg} in mode ${cipherMode} needs ${keyBytes * LUKS_STRIPES}-byte key slots, which are not whole 512-byte sectors; QEMU cannot use such a LUKS header`,
    );
  }
  const layout = luks1Layout(keyBytes);
  const header: LuksHeader = {
    version: LUKS_VERSION,
    cipherName,
    cipherMode: modeSpec,
    hashSpec: hashAlg,
    payloadOffsetSector: layout.payloadOffset / LUKS_SECTOR_SIZE,
    keyBytes,
    masterKeyDigest: Buffer.alloc(DIGEST_LEN),
    masterKeySalt: randomBytes(SALT_LEN),
    masterKeyIterations: 0,
    uuid: opts.uuid ?? randomUUID(),
    slots: layout.slotOffsets.map((off) => ({
      state: LUKS_KEY_SLOT_DISABLED,
      active: false,
      iterations: 0,
      salt: Buffer.alloc(SALT_LEN),
      keyOffsetSector: off / LUKS_SECTOR_SIZE,
      stripes: LUKS_STRIPES,
    })),
  };
  const algorithms: LuksAlgorithms = { cipherAlg, cipherMode, ivgenAlg, ivgenCipherAlg, hashAlg };
  if (ivgenAlg === 'essiv') algorithms.ivgenHashAlg = ivgenHashAlg;

  const masterKey = randomBytes(keyBytes);
  try {
    // Fails here, before any write, on ciphers OpenSSL lacks (serpent, twofish).
    slotCipher(algorithms, masterKey).destroy();
    const perSec = await calibrate(hashAlg, masterKey, header.masterKeySalt, DIGEST_LEN);
    header.masterKeyIterations = luksMasterKeyIterations(perSec, iterTime);
    const digest = await pbkdf2(hashAlg, masterKey, header.masterKeySalt, header.masterKeyIterations, DIGEST_LEN);
    digest.copy(header.masterKeyDigest);
    if (opts.init) await opts.init(layout.payloadOffset);
    await storeKey({ header, algorithms, write, calibrate }, 0, passwordBytes(opts.passphrase), masterKey, iterTime);
  } catch (err) {
    masterKey.fill(0);
    throw err;
  }
  return { header, algorithms, masterKey, payloadOffset: layout.payloadOffset, keyslot: 0 };
}

/** Unlocks the master key with the first active slot the passphrase opens. */
export async function openLuks1(read: LuksReadFn, passphrase: Buffer, opts: Luks1OpenOptions = {}): Promise<Luks1Volume> {
  const { header, algorithms } = await readLuks1Header(read, opts.fileName);
  // a cipher OpenSSL lacks (serpent, twofish) fails here, before any PBKDF2 work
  slotCipher(algorithms, Buffer.alloc(header.keyBytes)).destroy();
  const ctx = { header, algorithms, read, opts };
  const pw = passwordBytes(passphrase);
  for (let i = 0; i < LUKS_NUM_KEY_SLOTS; i++) {
    const masterKey = await loadKey(ctx, i, pw);
    if (masterKey) {
      return { header, algorithms, masterKey, payloadOffset: header.payloadOffsetSector * LUKS_SECTOR_SIZE, keyslot: i };
    }
  }
  throw new QimgError('Invalid password, cannot unlock any keyslot', { file: opts.fileName });
}

/** The payload cipher of an unlocked volume (sector 0 = first payload sector). */
export function createPayloadCipher(vol: Pick<Luks1Volume, 'algorithms' | 'masterKey'>): SectorCipher {
  return slotCipher(vol.algorithms, vol.masterKey);
}

/**
 * qemu-img amend of the LUKS options: state=active adds a key slot (the given or the
 * first free one), state=inactive erases the given slot or every slot old-secret opens.
 * Refusals carry QEMU 7.2's messages. Returns the header as written.
 */
export async function amendLuks1(read: LuksReadFn, write: LuksWriteFn, opts: Luks1AmendOptions): Promise<LuksHeader> {
  const { header, algorithms } = await readLuks1Header(read, opts.fileName);
  const ctx = { header, algorithms, read, write, opts, calibrate: opts.calibrate ?? defaultCalibrator };
  if (opts.state === 'active') await addKeyslot(ctx, opts);
  else if (opts.state === 'inactive') await eraseKeyslots(ctx, opts);
  else throw new QimgError(`Invalid parameter '${String(opts.state)}'`);
  return header;
}

interface Ctx {
  header: LuksHeader;
  algorithms: LuksAlgorithms;
}
interface ReadCtx extends Ctx {
  read: LuksReadFn;
  opts: Luks1OpenOptions;
}
interface WriteCtx extends Ctx {
  write: LuksWriteFn;
  calibrate: PbkdfCalibrator;
}

async function addKeyslot(ctx: ReadCtx & WriteCtx, o: Luks1AmendOptions): Promise<void> {
  const { header } = ctx;
  if (!o.newSecret) throw new QimgError("'new-secret' is required to activate a keyslot");
  if (o.oldSecret) throw new QimgError("'old-secret' must not be given when activating keyslots");
  let keyslot: number;
  if (o.keyslot !== undefined) {
    keyslot = o.keyslot;
    if (!inRange(keyslot)) {
      // QEMU prints this one with %u
      throw new QimgError(`Invalid keyslot ${keyslot >>> 0} specified, must be between 0 and ${LUKS_NUM_KEY_SLOTS - 1}`);
    }
  } else {
    keyslot = header.slots.findIndex((s) => !s.active);
    if (keyslot < 0) throw new QimgError("Can't add a keyslot - all keyslots are in use");
  }
  if (!o.force && header.slots[keyslot].active) {
    throw new QimgError(`Refusing to overwrite active keyslot ${keyslot} - please erase it first`);
  }
  const unlock = o.secret ?? o.keySecret;
  if (!unlock) throw new QimgError(`Parameter '${o.optPrefix ?? ''}key-secret' is required for cipher`);
  const pw = passwordBytes(unlock);
  let masterKey: Buffer | undefined;
  for (let i = 0; i < LUKS_NUM_KEY_SLOTS && !masterKey; i++) masterKey = await loadKey(ctx, i, pw);
  if (!masterKey) throw new QimgError('Invalid password, cannot unlock any keyslot');
  try {
    await storeKey(ctx, keyslot, passwordBytes(o.newSecret), masterKey, o.iterTime ?? LUKS_DEFAULT_ITER_TIME_MS);
  } finally {
    masterKey.fill(0);
  }
}

async function eraseKeyslots(ctx: ReadCtx & WriteCtx, o: Luks1AmendOptions): Promise<void> {
  const { header } = ctx;
  if (o.newSecret) throw new QimgError("'new-secret' must not be given when erasing keyslots");
  if (o.iterTime !== undefined) throw new QimgError("'iter-time' must not be given when erasing keyslots");
  if (o.secret) throw new QimgError("'secret' must not be given when erasing keyslots");
  const old = o.oldSecret ? passwordBytes(o.oldSecret) : undefined;
  const activeCount = () => header.slots.filter((s) => s.active).length;
  /** whether old opens slot i (the key found is dropped at once) */
  const opens = async (i: number): Promise<boolean> => {
    const key = await loadKey(ctx, i, old as Buffer);
    key?.fill(0);
    return key !== undefined;
  };

  if (o.keyslot !== undefined) {
    const keyslot = o.keyslot;
    if (!inRange(keyslot)) {
      throw new QimgError(`Invalid keyslot ${keyslot} specified, must be between 0 and ${LUKS_NUM_KEY_SLOTS - 1}`);
    }
    if (old && !(await opens(keyslot))) {
      throw new QimgError(`Given keyslot ${keyslot} doesn't contain the given old password for erase operation`);
    }
    // (sic: QEMU's message ends in a space)
    if (!o.force && !header.slots[keyslot].active) throw new QimgError(`Given keyslot ${keyslot} is already erased (inactive) `);
    if (!o.force && activeCount() === 1) {
      throw new QimgError(
        `Attempt to erase the only active keyslot ${keyslot} which will erase all the data in the image irreversibly - refusing operation`,
      );
    }
    await eraseKey(ctx, keyslot);
  } else if (old) {
    const matching: number[] = [];
    for (let i = 0; i < LUKS_NUM_KEY_SLOTS; i++) if (await opens(i)) matching.push(i);
    if (matching.length === 0) throw new QimgError('No keyslots match given (old) password for erase operation');
    if (!o.force && matching.length === activeCount()) {
      throw new QimgError(
        'All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation',
      );
    }
    for (const i of matching) await eraseKey(ctx, i);
  } else {
    throw new QimgError(
      'To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given',
    );
  }
}

/**
 * Tries slot i with pw: the master key when it unlocks the slot, undefined when the slot
 * is inactive or the digest does not match.
 */
async function loadKey(ctx: ReadCtx, i: number, pw: Buffer): Promise<Buffer | undefined> {
  const { header, algorithms } = ctx;
  const slot = header.slots[i];
  if (!slot.active) return undefined;
  const max = ctx.opts.maxIterations ?? LUKS_MAX_PBKDF_ITERATIONS;
  if (slot.iterations > max || header.masterKeyIterations > max) {
    throw new CorruptImageError(
      ctx.opts.fileName,
      `Keyslot ${i} needs ${Math.max(slot.iterations, header.masterKeyIterations)} PBKDF2 iterations, more than the limit of ${max}`,
    );
  }
  const len = header.keyBytes * slot.stripes;
  const material = await ctx.read(slot.keyOffsetSector * LUKS_SECTOR_SIZE, len);
  if (material.length < len) {
    throw new CorruptImageError(ctx.opts.fileName, `Keyslot ${i} key material is truncated (${material.length} of ${len} bytes)`);
  }
  const split = Buffer.from(material.subarray(0, len));
  const slotKey = await pbkdf2(algorithms.hashAlg, pw, slot.salt, slot.iterations, header.keyBytes);
  let candidate: Buffer | undefined;
  let digest: Buffer | undefined;
  try {
    const cipher = slotCipher(algorithms, slotKey);
    cipher.decrypt(split, 0);
    cipher.destroy();
    candidate = afMerge(algorithms.hashAlg, split, header.keyBytes, slot.stripes);
    digest = await pbkdf2(algorithms.hashAlg, candidate, header.masterKeySalt, header.masterKeyIterations, DIGEST_LEN);
    if (timingSafeEqual(digest, header.masterKeyDigest)) {
      const key = candidate;
      candidate = undefined;
      return key;
    }
    return undefined;
  } finally {
    slotKey.fill(0);
    split.fill(0);
    candidate?.fill(0);
    digest?.fill(0);
  }
}

/**
 * Writes masterKey into slot i under pw: new salt, calibrated iterations, AF split,
 * encrypted with the pw-derived key, then the header with the slot active.
 */
async function storeKey(ctx: WriteCtx, i: number, pw: Buffer, masterKey: Buffer, iterTime: number): Promise<void> {
  const { header, algorithms } = ctx;
  const slot = header.slots[i];
  const salt = randomBytes(SALT_LEN);
  const perSec = await ctx.calibrate(algorithms.hashAlg, pw, salt, header.keyBytes);
  const iterations = luksSlotIterations(perSec, iterTime);
  const slotKey = await pbkdf2(algorithms.hashAlg, pw, salt, iterations, header.keyBytes);
  let split: Buffer | undefined;
  try {
    split = afSplit(algorithms.hashAlg, masterKey, slot.stripes);
    const cipher = slotCipher(algorithms, slotKey);
    cipher.encrypt(split, 0);
    cipher.destroy();
    await ctx.write(slot.keyOffsetSector * LUKS_SECTOR_SIZE, split);
  } finally {
    slotKey.fill(0);
    split?.fill(0);
  }
  slot.salt = salt;
  slot.iterations = iterations;
  slot.state = LUKS_KEY_SLOT_ENABLED;
  slot.active = true;
  await ctx.write(0, encodeLuksHeader(header));
}

/** Marks slot i inactive in the header, then overwrites its material with random data. */
async function eraseKey(ctx: WriteCtx, i: number): Promise<void> {
  const { header } = ctx;
  const slot = header.slots[i];
  slot.salt = Buffer.alloc(SALT_LEN);
  slot.iterations = 0;
  slot.state = LUKS_KEY_SLOT_DISABLED;
  slot.active = false;
  let headerError: unknown;
  try {
    await ctx.write(0, encodeLuksHeader(header));
  } catch (err) {
    // QEMU still destroys the material when the header update failed
    headerError = err;
  }
  const garbage = Buffer.alloc(header.keyBytes * slot.stripes);
  for (let pass = 0; pass < ERASE_PASSES; pass++) {
    randomFillSync(garbage);
    await ctx.write(slot.keyOffsetSector * LUKS_SECTOR_SIZE, garbage);
  }
  if (headerError !== undefined) throw headerError;
}

function slotCipher(algs: LuksAlgorithms, key: Buffer): SectorCipher {
  return createSectorCipher({
    alg: algs.cipherAlg,
    mode: algs.cipherMode,
    ivgen: algs.ivgenAlg,
    ivgenHash: algs.ivgenHashAlg,
    ivgenAlg: algs.ivgenCipherAlg,
    key,
  });
}

/** QEMU hands PBKDF2 the secret as a C string: it ends at the first NUL. */
function passwordBytes(pw: Buffer): Buffer {
  const nul = pw.indexOf(0);
  return nul < 0 ? pw : pw.subarray(0, nul);
}

function inRange(slot: number): boolean {
  return Number.isInteger(slot) && slot >= 0 && slot < LUKS_NUM_KEY_SLOTS;
}

function putString(buf: Buffer, at: number, len: number, s: string): void {
  const bytes = Buffer.from(s, 'utf8');
  if (bytes.length >= len) throw new Error(`LUKS header field '${s}' is too long`);
  bytes.copy(buf, at);
}
