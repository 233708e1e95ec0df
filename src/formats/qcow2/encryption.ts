/**
 * Encrypted qcow2 data clusters (metadata is never encrypted), as QEMU 7.2 does them:
 *
 * - crypt_method 2, LUKS: a LUKS1 header in clusters the "full disk encryption"
 *   header extension points at; its payload cipher encrypts each data cluster with
 *   the 512-byte sector number of the *host* offset as IV (QEMU's crypt_physical_offset).
 * - crypt_method 1, legacy AES: AES-128-CBC, key = the passphrase's first 16 bytes
 *   (zero padded), plain64 IV from the *guest* sector number. Kept for reading old
 *   images (and created as qemu-img 7.2 still creates it).
 *
 * The key comes from the secret `encrypt.key-secret` names (`--image-opts`, or the
 * `-o` of the create that made the target). Passphrases and keys are Buffers, zeroed
 * once the cipher holds its own copy.
 */
import { QimgError } from '../../core/errors.js';
import { requireSecret, type ImageOptions, type SecretStore } from '../../core/secrets.js';
import type { HostFile } from '../../io/host.js';
import { createPayloadCipher, openLuks1, type LuksReadFn, type LuksWriteFn } from '../../crypto/luks1.js';
import { createSectorCipher, type SectorCipher } from '../../crypto/sector-cipher.js';
import * as C from './constants.js';
import type { CryptoExtension } from './header.js';

const ENCRYPTION_SECTOR = C.ENCRYPTION_SECTOR;

/** The data cipher of an open encrypted qcow2 image. */
export class Qcow2Encryption {
  constructor(
    private readonly cipher: SectorCipher,
    /** IVs from host offsets (LUKS) rather than guest offsets (AES) */
    private readonly physical: boolean,
  ) {}

  /** Decrypts in place data read from host offset `host` (guest offset `guest`); both sector aligned. */
  decrypt(buf: Buffer, host: number, guest: number): void {
    this.cipher.decrypt(buf, this.sector(host, guest));
  }

  /** An encrypted copy of `data` to be written at host offset `host` (guest offset `guest`). */
  encrypt(data: Buffer, host: number, guest: number): Buffer {
    const out = Buffer.from(data);
    this.cipher.encrypt(out, this.sector(host, guest));
    return out;
  }

  /** Reads `part` (guest offset `guest`, host offset `host`) decrypted, through the whole sectors around it. */
  async read(file: HostFile, part: Buffer, host: number, guest: number): Promise<void> {
    const head = guest % ENCRYPTION_SECTOR;
    const total = Math.ceil((head + part.length) / ENCRYPTION_SECTOR) * ENCRYPTION_SECTOR;
    const whole = head === 0 && total === part.length;
    const buf = whole ? part : Buffer.allocUnsafe(total);
    await file.read(buf, host - head);
    this.decrypt(buf, host - head, guest - head);
    if (!whole) buf.copy(part, 0, head, head + part.length);
  }

  destroy(): void {
    this.cipher.destroy();
  }

  private sector(host: number, guest: number): number {
    const at = this.physical ? host : guest;
    if (at % ENCRYPTION_SECTOR !== 0) throw new QimgError(`internal error: unaligned encrypted I/O at ${at}`);
    return at / ENCRYPTION_SECTOR;
  }
}

/** The option name the key secret goes by, for messages ("encrypt.key-secret"). */
export const KEY_SECRET_OPTION = 'encrypt.key-secret';

/** The passphrase for this image from --image-opts / --object, or QEMU's refusal. */
export function keySecretFor(opts: { secrets?: SecretStore; imageOptions?: ImageOptions }): Buffer {
  return requireSecret(opts.secrets, opts.imageOptions?.[KEY_SECRET_OPTION], KEY_SECRET_OPTION);
}

/** Reads within the LUKS header area of a qcow2 image, refusing anything outside it as QEMU does. */
export function cryptoAreaReader(file: HostFile, crypto: CryptoExtension): LuksReadFn {
  return async (offset, length) => {
    if (offset < 0 || offset + length > crypto.length) {
      throw new QimgError(`Request for data outside of extension header`, { file: file.path });
    }
    return file.readBytes(crypto.offset + offset, length);
  };
}

/** Writes within the LUKS header area (amend's key slot changes). */
export function cryptoAreaWriter(file: HostFile, crypto: CryptoExtension): LuksWriteFn {
  return async (offset, buf) => {
    if (offset < 0 || offset + buf.length > crypto.length) {
      throw new QimgError(`Request for data outside of extension header`, { file: file.path });
    }
    await file.write(buf, crypto.offset + offset);
  };
}

/** The data cipher of a legacy AES image (qcow2 crypt_method 1, qcow v1): guest-sector IVs. */
export function legacyAesEncryption(passphrase: Buffer): Qcow2Encryption {
  return new Qcow2Encryption(legacyAesCipher(passphrase), false);
}

/** The legacy qcow AES cipher for a passphrase (its first 16 bytes; QEMU stops at a NUL). */
function legacyAesCipher(passphrase: Buffer): SectorCipher {
  const key = Buffer.alloc(16);
  const nul = passphrase.indexOf(0);
  passphrase.copy(key, 0, 0, Math.min(16, nul < 0 ? passphrase.length : nul));
  try {
    return createSectorCipher({ alg: 'aes-128', mode: 'cbc', ivgen: 'plain64', key });
  } finally {
    key.fill(0);
  }
}

/** Unlocks the data cipher of an encrypted image (cryptMethod 1 or 2). */
export async function openQcow2Encryption(
  file: HostFile,
  cryptMethod: number,
  crypto: CryptoExtension | undefined,
  opts: { secrets?: SecretStore; imageOptions?: ImageOptions },
): Promise<Qcow2Encryption> {
  const passphrase = keySecretFor(opts);
  try {
    if (cryptMethod === C.CRYPT_AES) return legacyAesEncryption(passphrase);
    if (!crypto) throw new QimgError('Missing CRYPTO header for crypt method 2', { file: file.path });
    const vol = await openLuks1(cryptoAreaReader(file, crypto), passphrase, { fileName: file.path });
    try {
      return new Qcow2Encryption(createPayloadCipher(vol), true);
    } finally {
      vol.masterKey.fill(0);
    }
  } finally {
    passphrase.fill(0);
  }
}
