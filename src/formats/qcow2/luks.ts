/**
 * The LUKS1 header inside a qcow2 image (crypt_method 2; the full disk encryption
 * header extension 0x0537be77 points at it). Parsed and validated the way QEMU 7.2
 * does when it opens an image without a key (as `qemu-img info` does), and turned
 * into the "encrypt" member of `qemu-img info`'s format-specific data.
 *
 * LUKS1 phdr (cryptsetup's on-disk format, big endian, 592 bytes):
 *     0  magic[6]             "LUKS\xba\xbe"
 *     6  version u16          1
 *     8  cipher_name[32]      "aes", "serpent", ...          (NUL terminated)
 *    40  cipher_mode[32]      "xts-plain64", "cbc-essiv:sha256" (NUL terminated)
 *    72  hash_spec[32]        "sha256", ...                   (NUL terminated)
 *   104  payload_offset u32   in 512-byte sectors
 *   108  key_bytes u32        master key length
 *   112  mk_digest[20]
 *   132  mk_digest_salt[32]
 *   164  mk_digest_iter u32
 *   168  uuid[40]
 *   208  8 key slots x 48:  active u32 (0x00AC71F3 / 0x0000DEAD), iterations u32,
 *                            salt[32], key_material_offset u32 (sectors), stripes u32
 *
 * Error messages are QEMU's own, so `qimg` fails with the same words as qemu-img.
 */
import { CorruptImageError } from '../../core/errors.js';
import type { HostFile } from '../../io/host.js';
import type { CryptoExtension } from './header.js';
import { printable } from '../../core/printable.js';

export const LUKS_MAGIC = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
export const LUKS_VERSION = 1;
export const LUKS_HEADER_SIZE = 592;
export const LUKS_NUM_KEY_SLOTS = 8;
export const LUKS_STRIPES = 4000;
export const LUKS_SECTOR_SIZE = 512;
/** Key material starts at or after this byte offset (the header area). */
export const LUKS_KEY_SLOT_OFFSET = 4096;
export const LUKS_KEY_SLOT_ENABLED = 0x00ac71f3;
export const LUKS_KEY_SLOT_DISABLED = 0x0000dead;
/**
 * PBKDF2 iterations qimg runs for one key slot or master key digest at most. QEMU has
 * no limit, so a hostile header asking for 2^32-1 makes every try take CPU-hours; a
 * real one (QEMU's and cryptsetup's 2 s calibration) stays far below.
 */
export const LUKS_MAX_PBKDF_ITERATIONS = 100_000_000;

const NAME_LEN = 32;
const DIGEST_LEN = 20;
const SALT_LEN = 32;
const UUID_LEN = 40;
const SLOT_SIZE = 48;
const SLOTS_AT = 208;
const HEADER_SECTORS = LUKS_KEY_SLOT_OFFSET / LUKS_SECTOR_SIZE;

export interface LuksKeySlot {
  /** the raw state word */
  state: number;
  active: boolean;
  iterations: number;
  salt: Buffer;
  /** start of the key material, in 512-byte sectors */
  keyOffsetSector: number;
  stripes: number;
}

export interface LuksHeader {
  version: number;
  cipherName: string;
  cipherMode: string;
  hashSpec: string;
  /** start of the payload, in 512-byte sectors */
  payloadOffsetSector: number;
  /** master key length in bytes */
  keyBytes: number;
  masterKeyDigest: Buffer;
  masterKeySalt: Buffer;
  masterKeyIterations: number;
  uuid: string;
  slots: LuksKeySlot[];
}

/** The header's algorithm strings resolved to QEMU's (QAPI) names. */
export interface LuksAlgorithms {
  /** e.g. "aes-256" (QCryptoCipherAlgorithm) */
  cipherAlg: string;
  /** "ecb" | "cbc" | "xts" | "ctr" */
  cipherMode: string;
  /** "plain" | "plain64" | "essiv" */
  ivgenAlg: string;
  /** hash of the IV generator; only meaningful (and only reported) for essiv */
  ivgenHashAlg?: string;
  /** the cipher ESSIV uses (key length = digest length); equals cipherAlg otherwise */
  ivgenCipherAlg: string;
  /** PBKDF2 / AF-split hash */
  hashAlg: string;
}

// QEMU 7.2's name tables (QCryptoCipherMode, QCryptoIVGenAlgorithm, QCryptoHashAlgorithm).
const CIPHER_MODES = ['ecb', 'cbc', 'xts', 'ctr'];
const IVGEN_ALGS = ['plain', 'plain64', 'essiv'];
/** QEMU's QCryptoHashAlgorithm names with their digest lengths. */
export const HASH_DIGEST_LENGTHS: Readonly<Record<string, number>> = {
  md5: 16,
  sha1: 20,
  sha224: 28,
  sha256: 32,
  sha384: 48,
  sha512: 64,
  ripemd160: 20,
};
/** LUKS cipher names QEMU 7.2 maps, with the key sizes (bytes) each supports. */
const CIPHER_FAMILIES: Record<string, { label: string; keySizes: number[] }> = {
  aes: { label: 'AES', keySizes: [16, 24, 32] },
  cast5: { label: 'CAST5', keySizes: [16] },
  serpent: { label: 'Serpent', keySizes: [16, 24, 32] },
  twofish: { label: 'Twofish', keySizes: [16, 24, 32] },
};

/** Reads the LUKS header the crypto extension points at and returns qemu-img info's "encrypt" object. */
export async function readLuksInfo(file: HostFile, crypto: CryptoExtension): Promise<Record<string, unknown>> {
  const header = await readLuksHeader(file, crypto);
  const algs = luksAlgorithms(header, file.path);
  checkWithinCryptoArea(header, crypto, file.path);
  return luksInfoForQemu(header, algs);
}

/** Reads and structurally validates the LUKS header of a qcow2 image (QEMU's checks, in QEMU's order). */
export async function readLuksHeader(file: HostFile, crypto: CryptoExtension): Promise<LuksHeader> {
  if (crypto.length < LUKS_HEADER_SIZE) {
    throw new CorruptImageError(
      file.path,
      `Request for data outside of extension header (LUKS header needs ${LUKS_HEADER_SIZE} bytes, the encryption header is ${crypto.length} bytes long)`,
    );
  }
  const buf = await file.readBytes(crypto.offset, LUKS_HEADER_SIZE);
  return parseLuksHeader(buf, file.path);
}

/** Parses a 592-byte LUKS1 header and applies QEMU's sanity checks. */
export function parseLuksHeader(buf: Buffer, fileName?: string): LuksHeader {
  const fail = (msg: string): never => {
    throw new CorruptImageError(fileName, msg);
  };
  if (buf.length < LUKS_HEADER_SIZE) fail('Volume is not in LUKS format');
  if (!buf.subarray(0, 6).equals(LUKS_MAGIC)) fail('Volume is not in LUKS format');
  const version = buf.readUInt16BE(6);
  if (version !== LUKS_VERSION) fail(`LUKS version ${version} is not supported`);

  const cipherName = cString(buf, 8, NAME_LEN);
  if (cipherName === undefined) fail('LUKS header cipher name is not NUL terminated');
  const cipherMode = cString(buf, 40, NAME_LEN);
  if (cipherMode === undefined) fail('LUKS header cipher mode is not NUL terminated');
  const hashSpec = cString(buf, 72, NAME_LEN);
  if (hashSpec === undefined) fail('LUKS header hash spec is not NUL terminated');

  const uuidRaw = buf.subarray(168, 168 + UUID_LEN);
  const uuidEnd = uuidRaw.indexOf(0);
  const h: LuksHeader = {
    version,
    cipherName: cipherName as string,
    cipherMode: cipherMode as string,
    hashSpec: hashSpec as string,
    payloadOffsetSector: buf.readUInt32BE(104),
    keyBytes: buf.readUInt32BE(108),
    masterKeyDigest: Buffer.from(buf.subarray(112, 112 + DIGEST_LEN)),
    masterKeySalt: Buffer.from(buf.subarray(132, 132 + SALT_LEN)),
    masterKeyIterations: buf.readUInt32BE(164),
    uuid: uuidRaw.subarray(0, uuidEnd < 0 ? UUID_LEN : uuidEnd).toString('utf8'),
    slots: [],
  };
  for (let i = 0; i < LUKS_NUM_KEY_SLOTS; i++) {
    const at = SLOTS_AT + i * SLOT_SIZE;
    const state = buf.readUInt32BE(at);
    h.slots.push({
      state,
      active: state === LUKS_KEY_SLOT_ENABLED,
      iterations: buf.readUInt32BE(at + 4),
      salt: Buffer.from(buf.subarray(at + 8, at + 8 + SALT_LEN)),
      keyOffsetSector: buf.readUInt32BE(at + 40),
      stripes: buf.readUInt32BE(at + 44),
    });
  }

  if (h.payloadOffsetSector < HEADER_SECTORS) fail('LUKS payload is overlapping with the header');
  if (h.masterKeyIterations === 0) fail('LUKS key iteration count is zero');

  for (let i = 0; i < LUKS_NUM_KEY_SLOTS; i++) {
    const s = h.slots[i];
    const start = s.keyOffsetSector;
    const len = keyMaterialSectors(h.keyBytes, s.stripes);
    if (s.stripes !== LUKS_STRIPES) fail(`Keyslot ${i} is corrupted (stripes ${s.stripes} != ${LUKS_STRIPES})`);
    if (s.state !== LUKS_KEY_SLOT_DISABLED && s.state !== LUKS_KEY_SLOT_ENABLED) {
      fail(`Keyslot ${i} state (active/disable) is corrupted`);
    }
    if (s.active && s.iterations === 0) fail(`Keyslot ${i} iteration count is zero`);
    if (start < HEADER_SECTORS) fail(`Keyslot ${i} is overlapping with the LUKS header`);
    if (start + len > h.payloadOffsetSector) fail(`Keyslot ${i} is overlapping with the encrypted payload`);
    for (let j = i + 1; j < LUKS_NUM_KEY_SLOTS; j++) {
      const start2 = h.slots[j].keyOffsetSector;
      const len2 = keyMaterialSectors(h.keyBytes, h.slots[j].stripes);
      if (start + len > start2 && start2 + len2 > start) {
        fail(`Keyslots ${i} and ${j} are overlapping in the header`);
      }
    }
  }
  return h;
}

/**
 * Resolves the header's cipher name, cipher mode spec ("<mode>-<ivgen>[:<hash>]") and
 * hash spec to QEMU's algorithm names, refusing what QEMU 7.2 refuses.
 */
export function luksAlgorithms(h: LuksHeader, fileName?: string): LuksAlgorithms {
  const fail = (msg: string): never => {
    throw new CorruptImageError(fileName, msg);
  };
  const dash = h.cipherMode.indexOf('-');
  if (dash < 0) fail(`Unexpected cipher mode string format '${printable(h.cipherMode)}'`);
  const modeName = h.cipherMode.slice(0, dash);
  let ivgenName = h.cipherMode.slice(dash + 1);
  let ivgenHashName: string | undefined;
  const colon = ivgenName.indexOf(':');
  if (colon >= 0) {
    ivgenHashName = ivgenName.slice(colon + 1);
    ivgenName = ivgenName.slice(0, colon);
    if (!Object.hasOwn(HASH_DIGEST_LENGTHS, ivgenHashName)) fail(`Hash algorithm '${printable(ivgenHashName)}' not supported`);
  }
  if (!CIPHER_MODES.includes(modeName)) fail(`Cipher mode '${printable(modeName)}' not supported`);

  // XTS keys are two cipher keys back to back.
  const keyLen = modeName === 'xts' ? Math.floor(h.keyBytes / 2) : h.keyBytes;
  const family = Object.hasOwn(CIPHER_FAMILIES, h.cipherName) ? CIPHER_FAMILIES[h.cipherName] : undefined;
  if (!family || !family.keySizes.includes(keyLen)) {
    fail(`Algorithm '${printable(h.cipherName)}' with key size ${keyLen} bytes not supported`);
  }
  const cipherAlg = `${h.cipherName}-${keyLen * 8}`;

  if (!Object.hasOwn(HASH_DIGEST_LENGTHS, h.hashSpec)) fail(`Hash algorithm '${printable(h.hashSpec)}' not supported`);
  if (!IVGEN_ALGS.includes(ivgenName)) fail(`IV generator '${printable(ivgenName)}' not supported`);

  const algs: LuksAlgorithms = {
    cipherAlg,
    cipherMode: modeName,
    ivgenAlg: ivgenName,
    ivgenCipherAlg: cipherAlg,
    hashAlg: h.hashSpec,
  };
  if (ivgenName === 'essiv') {
    if (ivgenHashName === undefined) fail('Missing IV generator hash specification');
    const hashName = ivgenHashName as string;
    algs.ivgenHashAlg = hashName;
    // ESSIV encrypts the sector number with a key as long as the hash digest.
    const digestLen = HASH_DIGEST_LENGTHS[hashName];
    if (digestLen !== keyLen) {
      const f = family as { label: string; keySizes: number[] };
      if (h.cipherName === 'cast5') fail(`Cipher ${cipherAlg} not supported with essiv`);
      if (!f.keySizes.includes(digestLen)) fail(`No ${f.label} cipher with key size ${digestLen} available`);
      algs.ivgenCipherAlg = `${h.cipherName}-${digestLen * 8}`;
    }
  }
  return algs;
}

/**
 * qimg's own bounds check (QEMU's `info` does not make it, as it never reads key
 * material): every key slot's material and the payload offset must lie inside the
 * encryption header area the qcow2 extension describes.
 */
export function checkWithinCryptoArea(h: LuksHeader, crypto: CryptoExtension, fileName?: string): void {
  for (let i = 0; i < LUKS_NUM_KEY_SLOTS; i++) {
    const s = h.slots[i];
    const end = s.keyOffsetSector * LUKS_SECTOR_SIZE + h.keyBytes * s.stripes;
    if (end > crypto.length) {
      throw new CorruptImageError(
        fileName,
        `Keyslot ${i} key material (ends at byte ${end}) lies outside the ${crypto.length}-byte encryption header`,
      );
    }
  }
  const payload = h.payloadOffsetSector * LUKS_SECTOR_SIZE;
  if (payload > crypto.length) {
    throw new CorruptImageError(
      fileName,
      `LUKS payload offset ${payload} lies outside the ${crypto.length}-byte encryption header`,
    );
  }
}

/**
 * The "encrypt" object of qemu-img 7.2's qcow2 format-specific info, with members in
 * the order qemu-img 7.2 prints them (its QDict hash order):
 *   ivgen-alg, hash-alg, cipher-alg, uuid, ivgen-hash-alg (essiv only), format,
 *   cipher-mode, slots [{active, iters (active only), key-offset, stripes (active only)}],
 *   payload-offset, master-key-iters
 */
export function luksInfoForQemu(h: LuksHeader, algs: LuksAlgorithms): Record<string, unknown> {
  const info: Record<string, unknown> = {
    'ivgen-alg': algs.ivgenAlg,
    'hash-alg': algs.hashAlg,
    'cipher-alg': algs.cipherAlg,
    uuid: h.uuid,
  };
  if (algs.ivgenAlg === 'essiv' && algs.ivgenHashAlg !== undefined) info['ivgen-hash-alg'] = algs.ivgenHashAlg;
  info.format = 'luks';
  info['cipher-mode'] = algs.cipherMode;
  info.slots = h.slots.map((s) => {
    const slot: Record<string, unknown> = { active: s.active };
    if (s.active) slot.iters = s.iterations;
    slot['key-offset'] = s.keyOffsetSector * LUKS_SECTOR_SIZE;
    if (s.active) slot.stripes = s.stripes;
    return slot;
  });
  info['payload-offset'] = h.payloadOffsetSector * LUKS_SECTOR_SIZE;
  info['master-key-iters'] = h.masterKeyIterations;
  return info;
}

/** Sectors of key material for one slot, rounded as cryptsetup (and QEMU) lay them out. */
function keyMaterialSectors(keyBytes: number, stripes: number): number {
  const sectors = Math.ceil((keyBytes * stripes) / LUKS_SECTOR_SIZE);
  return Math.ceil(sectors / HEADER_SECTORS) * HEADER_SECTORS;
}

/** A NUL-terminated string within a fixed field, or undefined when there is no NUL. */
function cString(buf: Buffer, at: number, len: number): string | undefined {
  const field = buf.subarray(at, at + len);
  const nul = field.indexOf(0);
  return nul < 0 ? undefined : field.subarray(0, nul).toString('utf8');
}

