/**
 * `amend -o encrypt.*` on a LUKS-encrypted qcow2: adding, replacing and erasing key
 * slots in the LUKS header inside the image (QEMU 7.2's qcow2 amend of its crypto
 * block), with QEMU's refusals. The image is open for writing with its key.
 */
import { QimgError } from '../../core/errors.js';
import type { OptionValue } from '../../core/options.js';
import { requireSecret, type SecretStore } from '../../core/secrets.js';
import * as C from './constants.js';
import type { Qcow2Image } from './driver.js';

/** The amend options that act on the LUKS header. */
export const ENCRYPT_AMEND_KEYS = ['encrypt.state', 'encrypt.keyslot', 'encrypt.new-secret', 'encrypt.old-secret', 'encrypt.iter-time'] as const;

export function hasEncryptionAmend(values: Map<string, OptionValue>): boolean {
  return ENCRYPT_AMEND_KEYS.some((k) => values.has(k));
}

/** Checks what can be checked before the image is opened for writing. */
export function checkEncryptionAmend(cryptMethod: number, values: Map<string, OptionValue>): void {
  if (!hasEncryptionAmend(values)) return;
  if (cryptMethod === C.CRYPT_NONE) throw new QimgError("Can't amend encryption options - encryption not present");
  if (cryptMethod !== C.CRYPT_LUKS) throw new QimgError('Only LUKS encryption options can be amended');
  const state = values.get('encrypt.state') as string | undefined;
  if (state === undefined) throw new QimgError("Parameter 'state' is missing");
  if (state !== 'active' && state !== 'inactive') throw new QimgError(`Parameter 'state' does not accept value '${state}'`);
}

export async function amendQcow2Encryption(
  img: Qcow2Image,
  values: Map<string, OptionValue>,
  opts: { secrets?: SecretStore; imageOptions?: Readonly<Record<string, string>>; force?: boolean },
): Promise<void> {
  checkEncryptionAmend(img.header.cryptMethod, values);
  const { amendLuks1 } = await import('../../crypto/luks1.js');
  const { cryptoAreaReader, cryptoAreaWriter, keySecretFor } = await import('./encryption.js');
  const crypto = img.header.crypto;
  if (!crypto) throw new QimgError('Missing CRYPTO header for crypt method 2', { file: img.filename });
  const secret = (key: string): Buffer | undefined => (values.has(key) ? requireSecret(opts.secrets, values.get(key) as string, key) : undefined);
  const keySecret = keySecretFor(opts);
  const newSecret = secret('encrypt.new-secret');
  const oldSecret = secret('encrypt.old-secret');
  try {
    await amendLuks1(cryptoAreaReader(img.file, crypto), cryptoAreaWriter(img.file, crypto), {
      state: values.get('encrypt.state') as 'active' | 'inactive',
      keyslot: values.get('encrypt.keyslot') as number | undefined,
      newSecret,
      oldSecret,
      keySecret,
      iterTime: values.get('encrypt.iter-time') as number | undefined,
      force: opts.force,
      fileName: img.filename,
      optPrefix: 'encrypt.',
    });
    await img.file.flush();
  } finally {
    keySecret.fill(0);
    newSecret?.fill(0);
    oldSecret?.fill(0);
  }
}
