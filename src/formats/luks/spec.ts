/**
 * The algorithm options of a new luks image, checked as QEMU 7.2 checks them for
 * create and measure: the QAPI enums in schema order (after the Formatting line, not
 * by the option parser), then, after the key secret, the LUKS name, ESSIV and mode
 * checks of qcrypto_block_luks_create.
 */
import { QimgError } from '../../core/errors.js';
import type { OptionValue } from '../../core/options.js';
import { luks1Layout } from '../../crypto/luks1.js';
import { essivCipherAlg, isCipherAlgAvailable, sectorCipherKeyLength } from '../../crypto/sector-cipher.js';
import { asQimg } from './options.js';

// QEMU 7.2's QAPI enums (QCryptoCipherAlgorithm, QCryptoCipherMode, QCryptoIVGenAlgorithm, QCryptoHashAlgorithm).
const CIPHER_ALGS = [
  'aes-128', 'aes-192', 'aes-256', 'des', '3des', 'cast5-128',
  'serpent-128', 'serpent-192', 'serpent-256', 'twofish-128', 'twofish-192', 'twofish-256',
];
const CIPHER_MODES = ['ecb', 'cbc', 'xts', 'ctr'];
const IVGEN_ALGS = ['plain', 'plain64', 'essiv'];
const HASH_ALGS = ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160'];
/** Cipher algorithms a LUKS1 header can name (QEMU's qcrypto_block_luks_cipher_name_map). */
const LUKS_CIPHER_FAMILIES = ['aes', 'cast5', 'serpent', 'twofish'];

/** What a new LUKS header is made of (QEMU's QCryptoBlockCreateOptionsLUKS, defaults applied). */
export interface LuksSpec {
  cipherAlg: string;
  cipherMode: string;
  ivgenAlg: string;
  ivgenHashAlg?: string;
  hashAlg: string;
  /** milliseconds; may exceed 2^53 (then only the overflow message can come of it) */
  iterTime: bigint;
  keyBytes: number;
  payloadOffset: number;
}

/**
 * The algorithm options checked as QEMU 7.2 checks them for create and measure: the
 * QAPI enums in schema order, then (after the key secret, see requireSecret) the LUKS
 * name and mode checks. Call checkSpecAlgorithms after the key secret.
 */
export function parseLuksSpec(o: Map<string, OptionValue>): Omit<LuksSpec, 'keyBytes' | 'payloadOffset'> {
  const pick = (name: string, allowed: string[], dflt: string | undefined): string | undefined => {
    const v = o.get(name) as string | undefined;
    if (v === undefined) return dflt;
    if (!allowed.includes(v)) throw new QimgError(`Parameter '${name}' does not accept value '${v}'`);
    return v;
  };
  const cipherAlg = pick('cipher-alg', CIPHER_ALGS, 'aes-256')!;
  const cipherMode = pick('cipher-mode', CIPHER_MODES, 'xts')!;
  const ivgenAlg = pick('ivgen-alg', IVGEN_ALGS, 'plain64')!;
  let ivgenHashAlg = pick('ivgen-hash-alg', HASH_ALGS, undefined);
  const hashAlg = pick('hash-alg', HASH_ALGS, 'sha256')!;
  if (ivgenAlg === 'essiv') ivgenHashAlg ??= 'sha256';
  // an unsigned 64-bit number (-1 is 2^64-1): its double is still an integer
  const iterTime = o.has('iter-time') ? BigInt(o.get('iter-time') as number) : 2000n;
  return { cipherAlg, cipherMode, ivgenAlg, ivgenHashAlg, hashAlg, iterTime };
}

/**
 * QEMU's checks of the algorithms before it makes the header (qcrypto_block_luks_create):
 * a cipher a LUKS header can name, the ESSIV cipher, modes the cipher has; plus the
 * key slot size qemu-img 7.2 aborts on. Returns the key length and payload offset.
 */
export function checkSpecAlgorithms(s: Omit<LuksSpec, 'keyBytes' | 'payloadOffset'>): LuksSpec {
  const family = s.cipherAlg.replace(/-\d+$/, '');
  if (!LUKS_CIPHER_FAMILIES.includes(family)) throw new QimgError(`Algorithm '${s.cipherAlg}' not supported`);
  if (s.ivgenAlg === 'essiv') cryptoCall(() => essivCipherAlg(s.cipherAlg, s.ivgenHashAlg!));
  // XTS needs a 16-byte block cipher (QEMU's cipher backends refuse cast5 in it)
  if (family === 'cast5' && s.cipherMode === 'xts') throw new QimgError('Unsupported cipher mode xts');
  const keyBytes = sectorCipherKeyLength(s.cipherAlg, s.cipherMode);
  if ((keyBytes * 4000) % 512 !== 0) {
    // qemu-img 7.2 aborts on an assertion here (aes-192 in cbc/ecb/ctr)
    throw new QimgError(
      `Cipher ${s.cipherAlg} in mode ${s.cipherMode} needs ${keyBytes * 4000}-byte key slots, which are not whole 512-byte sectors; QEMU cannot use such a LUKS header`,
    );
  }
  return { ...s, keyBytes, payloadOffset: luks1Layout(keyBytes).payloadOffset };
}

/** The one line for a cipher QEMU has but Node's OpenSSL lacks (serpent, twofish; cast5 without the legacy provider). */
export function unavailableCipher(alg: string): string | undefined {
  if (isCipherAlgAvailable(alg)) return undefined;
  const family = alg.replace(/-\d+$/, '');
  return `Cipher algorithm '${alg}' is not available: the OpenSSL of this Node.js has no ${family} (qimg reads and writes aes luks images)`;
}

/** The ESSIV cipher of a spec (the main cipher otherwise). */
export function ivgenCipherOf(s: Pick<LuksSpec, 'cipherAlg' | 'ivgenAlg' | 'ivgenHashAlg'>): string {
  return s.ivgenAlg === 'essiv' ? cryptoCall(() => essivCipherAlg(s.cipherAlg, s.ivgenHashAlg!)) : s.cipherAlg;
}

/** Runs a src/crypto call whose refusals are plain Errors with QEMU's words. */
export function cryptoCall<T>(fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw asQimg(err);
  }
}

