/**
 * Opening a luks image: the key secret first (QEMU asks for it before it reads the
 * header; metadata-only opens, as qemu's NO_IO, need none), the header checked, the
 * payload inside the file, then the first key slot the passphrase unlocks, with the
 * PBKDF2 work bounded. The passphrase and master key are zeroed before this returns;
 * the payload cipher's own key copies go with close().
 */
import type { BlockImage } from '../../core/block-image.js';
import { CorruptImageError, UnsupportedError } from '../../core/errors.js';
import type { OpenContext } from '../../core/open.js';
import { createPayloadCipher, openLuks1, readLuks1Header } from '../../crypto/luks1.js';
import type { HostFile } from '../../io/host.js';
import { LUKS_SECTOR, LuksImage } from './image.js';
import { asQimg, LUKS_MAX_PBKDF_ITERATIONS } from './options.js';
import { requireSecret } from '../../core/secrets.js';
import { LUKS_HEADER_SIZE } from '../qcow2/luks.js';
import { unavailableCipher } from './spec.js';

export async function openLuks(file: HostFile, ctx: OpenContext): Promise<BlockImage> {
  const name = file.path;
  const opts = ctx.options;
  const passphrase = opts.metadataOnly ? undefined : requireSecret(opts.secrets, opts.imageOptions?.['key-secret'], 'key-secret');
  try {
    if (file.size < LUKS_HEADER_SIZE) {
      throw new CorruptImageError(name, `LUKS header is truncated (the file has ${file.size} of its ${LUKS_HEADER_SIZE} bytes)`);
    }
    const read = (offset: number, length: number) => file.readBytes(offset, length);
    const { header, algorithms } = await readLuks1Header(read, name);
    // Key material lies before the payload (the header checks see to it), the payload in the file.
    const payloadOffset = header.payloadOffsetSector * LUKS_SECTOR;
    if (payloadOffset > file.size) {
      throw new CorruptImageError(name, `LUKS payload offset ${payloadOffset} lies beyond the end of the file (${file.size} bytes)`);
    }
    if (!passphrase) return new LuksImage(file, name, header, algorithms, null);
    const missing = unavailableCipher(algorithms.cipherAlg) ?? unavailableCipher(algorithms.ivgenCipherAlg);
    if (missing) throw new UnsupportedError(name, missing);
    const vol = await openLuks1(read, passphrase, { fileName: name, maxIterations: LUKS_MAX_PBKDF_ITERATIONS }).catch((err: unknown) => {
      throw asQimg(err);
    });
    try {
      return new LuksImage(file, name, vol.header, vol.algorithms, createPayloadCipher(vol));
    } finally {
      // the cipher holds its own copies (zeroed by close)
      vol.masterKey.fill(0);
    }
  } finally {
    passphrase?.fill(0);
  }
}
