/**
 * Sector encryption as dm-crypt and QEMU's block crypto layer do it: the data is a run
 * of 512-byte sectors, each encrypted on its own with an IV derived from its sector
 * number by an IV generator:
 *   plain    sector number mod 2^32, little endian, zero padded to the IV length
 *   plain64  sector number, 64-bit little endian, zero padded
 *   essiv    E_salt(plain64 IV), salt = hash(key), with a cipher keyed by the salt
 *            (QEMU and dm-crypt pick the cipher whose key length is the digest length)
 *
 * node:crypto has no way to re-key an IV on a live cipher, so per-sector cipher objects
 * are avoided where the mode allows it: XTS runs as one long-lived ECB pass over the
 * whole buffer with the tweaks (E_k2(IV) * alpha^j, IEEE 1619) computed here, CTR is
 * ECB over the counter blocks, and CBC decryption is ECB followed by the chaining XOR.
 * Only CBC encryption (inherently serial) creates one cipher object per sector.
 *
 * A final short "sector" is allowed when it is whole cipher blocks: LUKS key material
 * of 24-byte keys ends in one (cryptsetup makes such headers; qemu-img 7.2 aborts on them).
 */
import { createCipheriv, createDecipheriv, createHash, getCiphers, type Cipher, type Decipher } from 'node:crypto';
import { HASH_DIGEST_LENGTHS } from '../formats/qcow2/luks.js';
import { printable } from '../core/printable.js';

export const SECTOR_SIZE = 512;

// one table, kept with the (crypto-free) LUKS header parsing
export { HASH_DIGEST_LENGTHS };

interface AlgInfo {
  keyLength: number;
  blockSize: number;
  /** OpenSSL cipher name prefix: `${prefix}-ecb`, `${prefix}-cbc` */
  openssl: string;
  /** modes it can run in (XTS needs 16-byte blocks) */
  modes: string[];
}

// QEMU's QCryptoCipherAlgorithm names. serpent/twofish are missing from OpenSSL.
const ALGS: Readonly<Record<string, AlgInfo>> = {
  'aes-128': { keyLength: 16, blockSize: 16, openssl: 'aes-128', modes: ['ecb', 'cbc', 'xts', 'ctr'] },
  'aes-192': { keyLength: 24, blockSize: 16, openssl: 'aes-192', modes: ['ecb', 'cbc', 'xts', 'ctr'] },
  'aes-256': { keyLength: 32, blockSize: 16, openssl: 'aes-256', modes: ['ecb', 'cbc', 'xts', 'ctr'] },
  '3des': { keyLength: 24, blockSize: 8, openssl: 'des-ede3', modes: ['ecb', 'cbc', 'ctr'] },
  'cast5-128': { keyLength: 16, blockSize: 8, openssl: 'cast5', modes: ['ecb', 'cbc', 'ctr'] },
};
const MODES = ['ecb', 'cbc', 'xts', 'ctr'];
const IVGENS = ['plain', 'plain64', 'essiv'];

let available: Set<string> | undefined;

/** Whether this Node's OpenSSL can run the algorithm (cast5 needs the legacy provider). */
export function isCipherAlgAvailable(alg: string): boolean {
  if (!Object.hasOwn(ALGS, alg)) return false;
  available ??= new Set(getCiphers());
  return available.has(`${ALGS[alg].openssl}-ecb`);
}

function algInfo(alg: string): AlgInfo {
  if (!isCipherAlgAvailable(alg)) throw new Error(`Algorithm '${printable(alg)}' not supported`);
  return ALGS[alg];
}

/** Key length (bytes) of a cipher algorithm, or undefined for names QEMU does not know. */
export function cipherAlgKeyLength(alg: string): number | undefined {
  const sizes: Record<string, number> = {
    'aes-128': 16, 'aes-192': 24, 'aes-256': 32, des: 8, '3des': 24, 'cast5-128': 16,
    'serpent-128': 16, 'serpent-192': 24, 'serpent-256': 32,
    'twofish-128': 16, 'twofish-192': 24, 'twofish-256': 32, sm4: 16,
  };
  return Object.hasOwn(sizes, alg) ? sizes[alg] : undefined;
}

/** Length of the full key for alg in mode: XTS takes two cipher keys. */
export function sectorCipherKeyLength(alg: string, mode: string): number {
  const len = cipherAlgKeyLength(alg);
  if (len === undefined) throw new Error(`Algorithm '${printable(alg)}' not supported`);
  return mode === 'xts' ? len * 2 : len;
}

/**
 * The cipher ESSIV uses: the main cipher family with a key as long as the hash digest
 * (so aes-128 with sha256 uses aes-256). Messages are QEMU's.
 */
export function essivCipherAlg(alg: string, hash: string): string {
  const digestLen = hashDigestLength(hash);
  if (cipherAlgKeyLength(alg) === digestLen) return alg;
  const family = /^(aes|serpent|twofish)-(128|192|256)$/.exec(alg);
  if (!family) throw new Error(`Cipher ${printable(alg)} not supported with essiv`);
  const label = { aes: 'AES', serpent: 'Serpent', twofish: 'Twofish' }[family[1] as 'aes' | 'serpent' | 'twofish'];
  if (digestLen !== 16 && digestLen !== 24 && digestLen !== 32) {
    throw new Error(`No ${label} cipher with key size ${digestLen} available`);
  }
  return `${family[1]}-${digestLen * 8}`;
}

export function hashDigestLength(hash: string): number {
  if (!Object.hasOwn(HASH_DIGEST_LENGTHS, hash)) throw new Error(`Hash algorithm '${printable(hash)}' not supported`);
  return HASH_DIGEST_LENGTHS[hash];
}

export interface SectorCipherOptions {
  /** QEMU cipher algorithm name: "aes-256", ... */
  alg: string;
  /** "xts" | "cbc" | "ecb" | "ctr" */
  mode: string;
  /** "plain" | "plain64" | "essiv" (ignored for ecb, which has no IV) */
  ivgen: string;
  /** hash of the essiv generator (QEMU's ivgen-hash-alg); required for essiv */
  ivgenHash?: string;
  /** cipher of the essiv generator; by default chosen from alg and ivgenHash as QEMU does */
  ivgenAlg?: string;
  /** the full key (both halves for xts); copied, the caller keeps ownership of this one */
  key: Buffer;
}

export interface SectorCipher {
  readonly alg: string;
  readonly mode: string;
  readonly ivgen: string;
  /** cipher block size; buffers must be a multiple of it */
  readonly blockSize: number;
  /** Encrypts in place; buf starts at sector firstSector (512-byte sectors). */
  encrypt(buf: Buffer, firstSector: number | bigint): void;
  /** Decrypts in place; buf starts at sector firstSector. */
  decrypt(buf: Buffer, firstSector: number | bigint): void;
  /** Zeroes the key copies this object holds; it is unusable afterwards. */
  destroy(): void;
}

export function createSectorCipher(opts: SectorCipherOptions): SectorCipher {
  const { alg, mode, ivgen } = opts;
  if (!MODES.includes(mode)) throw new Error(`Cipher mode '${printable(mode)}' not supported`);
  const info = algInfo(alg);
  if (!info.modes.includes(mode)) throw new Error(`Cipher mode '${mode}' not supported with algorithm '${alg}'`);
  const keyLength = sectorCipherKeyLength(alg, mode);
  if (opts.key.length !== keyLength) {
    throw new Error(`Cipher key length ${opts.key.length} bytes does not match ${alg}-${mode}, which needs ${keyLength}`);
  }
  if (mode !== 'ecb' && !IVGENS.includes(ivgen)) throw new Error(`IV generator '${printable(ivgen)}' not supported`);
  return new SectorCipherImpl(opts, info);
}

class SectorCipherImpl implements SectorCipher {
  readonly alg: string;
  readonly mode: string;
  readonly ivgen: string;
  readonly blockSize: number;
  private readonly info: AlgInfo;
  /** key copies, zeroed by destroy(): the data key (first xts half) and the xts tweak key */
  private readonly dataKey: Buffer;
  private readonly tweakKey: Buffer | undefined;
  private readonly essivKey: Buffer | undefined;
  // Long-lived ECB transforms: ECB keeps no state between whole blocks.
  private ecbEnc: Cipher | undefined;
  private ecbDec: Decipher | undefined;
  private tweakEnc: Cipher | undefined;
  private essivEnc: Cipher | undefined;
  private destroyed = false;

  constructor(opts: SectorCipherOptions, info: AlgInfo) {
    this.alg = opts.alg;
    this.mode = opts.mode;
    this.ivgen = opts.mode === 'ecb' ? 'plain' : opts.ivgen;
    this.blockSize = info.blockSize;
    this.info = info;
    const half = info.keyLength;
    this.dataKey = Buffer.from(opts.key.subarray(0, half));
    this.tweakKey = opts.mode === 'xts' ? Buffer.from(opts.key.subarray(half, half * 2)) : undefined;
    if (opts.mode !== 'ecb' && opts.ivgen === 'essiv') {
      if (opts.ivgenHash === undefined) throw new Error('Missing IV generator hash specification');
      const essivAlg = opts.ivgenAlg ?? essivCipherAlg(opts.alg, opts.ivgenHash);
      const essivInfo = algInfo(essivAlg);
      if (essivInfo.blockSize !== info.blockSize) {
        throw new Error(`Cipher ${essivAlg} not supported with essiv for ${opts.alg}`);
      }
      // salt = hash(full key), truncated to the essiv cipher's key length
      const salt = createHash(opts.ivgenHash).update(opts.key).digest();
      if (salt.length < essivInfo.keyLength) {
        salt.fill(0);
        throw new Error(`No ${essivAlg} key can be made from a ${opts.ivgenHash} digest`);
      }
      this.essivKey = Buffer.from(salt.subarray(0, essivInfo.keyLength));
      salt.fill(0);
      this.essivEnc = ecb(createCipheriv(`${essivInfo.openssl}-ecb`, this.essivKey, null));
    }
    this.ecbEnc = ecb(createCipheriv(`${info.openssl}-ecb`, this.dataKey, null));
    this.ecbDec = ecb(createDecipheriv(`${info.openssl}-ecb`, this.dataKey, null));
    if (this.tweakKey) this.tweakEnc = ecb(createCipheriv(`${info.openssl}-ecb`, this.tweakKey, null));
  }

  encrypt(buf: Buffer, firstSector: number | bigint): void {
    this.run(buf, firstSector, true);
  }

  decrypt(buf: Buffer, firstSector: number | bigint): void {
    this.run(buf, firstSector, false);
  }

  destroy(): void {
    this.destroyed = true;
    this.dataKey.fill(0);
    this.tweakKey?.fill(0);
    this.essivKey?.fill(0);
    this.wipeScratch();
    // OpenSSL cleanses its contexts when they are freed; drop the references.
    this.ecbEnc = this.ecbDec = this.tweakEnc = this.essivEnc = undefined;
  }

  private run(buf: Buffer, firstSector: number | bigint, enc: boolean): void {
    if (this.destroyed) throw new Error('Sector cipher used after destroy()');
    if (buf.length % this.blockSize !== 0) {
      throw new Error(`Encrypted data length ${buf.length} is not a multiple of the ${this.blockSize}-byte cipher block`);
    }
    checkSector(firstSector);
    if (buf.length === 0) return;
    switch (this.mode) {
      case 'ecb':
        buf.set(update(enc ? this.ecbEnc : this.ecbDec, buf));
        return;
      case 'xts':
        this.xts(buf, firstSector, enc);
        return;
      case 'cbc':
        if (enc) this.cbcEncrypt(buf, firstSector);
        else this.cbcDecrypt(buf, firstSector);
        return;
      default:
        this.ctr(buf, firstSector);
    }
  }

  /** One IV per sector of buf, back to back. */
  private ivs(sectors: number, firstSector: number | bigint): Buffer {
    const n = this.blockSize;
    const ivs = Buffer.alloc(sectors * n);
    for (let i = 0; i < sectors; i++) writeSectorIv(ivs, i * n, n, firstSector, i, this.ivgen === 'plain');
    // essiv: the plain64 value encrypted with the salt key (one ECB pass for all)
    return this.essivEnc ? update(this.essivEnc, ivs) : ivs;
  }

  private xts(buf: Buffer, firstSector: number | bigint, enc: boolean): void {
    const len = buf.length;
    const sectors = Math.ceil(len / SECTOR_SIZE);
    const tweak0 = update(this.tweakEnc, this.ivs(sectors, firstSector));
    if (!LITTLE_ENDIAN || buf.byteOffset % 4 !== 0 || len % SECTOR_SIZE !== 0) {
      this.xtsBytes(buf, tweak0, sectors, enc);
      return;
    }
    // One pass builds the tweaks T_j = E_k2(IV) * alpha^j in GF(2^128) (IEEE 1619;
    // little-endian, as four host words) and XORs them in; ECB runs once over the whole
    // buffer; a second pass XORs them out. Scratch space is kept between calls.
    const words = len / 4;
    const scratch = this.scratch(len);
    const t32 = scratch.t;
    const x32 = scratch.x;
    const b32 = new Uint32Array(buf.buffer, buf.byteOffset, words);
    const t0 = new Uint32Array(tweak0.buffer, tweak0.byteOffset, tweak0.length / 4);
    for (let s = 0, i = 0; s < sectors; s++) {
      let w0 = t0[s * 4], w1 = t0[s * 4 + 1], w2 = t0[s * 4 + 2], w3 = t0[s * 4 + 3];
      for (const end = i + SECTOR_SIZE / 4; i < end; i += 4) {
        t32[i] = w0;
        t32[i + 1] = w1;
        t32[i + 2] = w2;
        t32[i + 3] = w3;
        x32[i] = b32[i] ^ w0;
        x32[i + 1] = b32[i + 1] ^ w1;
        x32[i + 2] = b32[i + 2] ^ w2;
        x32[i + 3] = b32[i + 3] ^ w3;
        const carry = w3 >>> 31;
        w3 = ((w3 << 1) | (w2 >>> 31)) >>> 0;
        w2 = ((w2 << 1) | (w1 >>> 31)) >>> 0;
        w1 = ((w1 << 1) | (w0 >>> 31)) >>> 0;
        w0 = ((w0 << 1) ^ (carry * 0x87)) >>> 0;
      }
    }
    const y = update(enc ? this.ecbEnc : this.ecbDec, scratch.xBuf.subarray(0, len));
    const y32 = new Uint32Array(y.buffer, y.byteOffset, words);
    for (let i = 0; i < words; i++) b32[i] = y32[i] ^ t32[i];
    // the plaintext passed through the scratch buffers and y: wipe them
    y.fill(0);
    scratch.xBuf.fill(0, 0, len);
    tweak0.fill(0);
  }

  /** XTS for buffers the word loop cannot view (unaligned, or a short last sector). */
  private xtsBytes(buf: Buffer, tweak0: Buffer, sectors: number, enc: boolean): void {
    const len = buf.length;
    const t = Buffer.allocUnsafeSlow(len);
    for (let s = 0; s < sectors; s++) {
      const at = s * SECTOR_SIZE;
      tweak0.copy(t, at, s * 16, s * 16 + 16);
      xtsTweaks(t, at, Math.min(len, at + SECTOR_SIZE));
    }
    const x = Buffer.allocUnsafeSlow(len);
    xorInto(x, buf, t);
    const y = update(enc ? this.ecbEnc : this.ecbDec, x);
    xorInto(buf, y, t);
    for (const b of [x, y, t, tweak0]) b.fill(0);
  }

  private scratchSpace: { t: Uint32Array; x: Uint32Array; xBuf: Buffer; tBuf: Buffer } | undefined;

  /** Tweak and input scratch of at least `len` bytes, grown as needed, reused between calls. */
  private scratch(len: number): { t: Uint32Array; x: Uint32Array; xBuf: Buffer; tBuf: Buffer } {
    if (!this.scratchSpace || this.scratchSpace.xBuf.length < len) {
      this.wipeScratch();
      const tBuf = Buffer.allocUnsafeSlow(len);
      const xBuf = Buffer.allocUnsafeSlow(len);
      this.scratchSpace = {
        tBuf,
        xBuf,
        t: new Uint32Array(tBuf.buffer, tBuf.byteOffset, len / 4),
        x: new Uint32Array(xBuf.buffer, xBuf.byteOffset, len / 4),
      };
    }
    return this.scratchSpace;
  }

  private wipeScratch(): void {
    this.scratchSpace?.tBuf.fill(0);
    this.scratchSpace?.xBuf.fill(0);
    this.scratchSpace = undefined;
  }

  private cbcDecrypt(buf: Buffer, firstSector: number | bigint): void {
    const len = buf.length;
    const n = this.blockSize;
    const sectors = Math.ceil(len / SECTOR_SIZE);
    const ivs = this.ivs(sectors, firstSector);
    // P_i = D(C_i) ^ C_{i-1}, with the sector's IV before its first block
    const prev = Buffer.allocUnsafeSlow(len);
    for (let s = 0; s < sectors; s++) {
      const at = s * SECTOR_SIZE;
      const end = Math.min(len, at + SECTOR_SIZE);
      ivs.copy(prev, at, s * n, s * n + n);
      buf.copy(prev, at + n, at, end - n);
    }
    const d = update(this.ecbDec, buf);
    xorInto(buf, d, prev);
    d.fill(0);
    prev.fill(0);
  }

  /** CTR (both directions): the counter blocks IV, IV+1, ... (big endian) through ECB, XORed in. */
  private ctr(buf: Buffer, firstSector: number | bigint): void {
    const len = buf.length;
    const n = this.blockSize;
    const sectors = Math.ceil(len / SECTOR_SIZE);
    const ivs = this.ivs(sectors, firstSector);
    const counters = Buffer.allocUnsafeSlow(len);
    for (let s = 0; s < sectors; s++) {
      let at = s * SECTOR_SIZE;
      ivs.copy(counters, at, s * n, s * n + n);
      const end = Math.min(len, at + SECTOR_SIZE);
      for (at += n; at < end; at += n) {
        for (let k = 0; k < n; k++) counters[at + k] = counters[at - n + k];
        for (let k = at + n - 1; k >= at; k--) {
          counters[k] = (counters[k] + 1) & 0xff;
          if (counters[k] !== 0) break;
        }
      }
    }
    const keystream = update(this.ecbEnc, counters);
    xorInto(buf, buf, keystream);
    keystream.fill(0);
  }

  /** CBC encryption: a cipher object per sector (node cannot re-IV one, and CBC chains). */
  private cbcEncrypt(buf: Buffer, firstSector: number | bigint): void {
    const n = this.blockSize;
    const len = buf.length;
    const sectors = Math.ceil(len / SECTOR_SIZE);
    const ivs = this.ivs(sectors, firstSector);
    const name = `${this.info.openssl}-cbc`;
    for (let s = 0; s < sectors; s++) {
      const at = s * SECTOR_SIZE;
      const iv = ivs.subarray(s * n, s * n + n);
      const c = createCipheriv(name, this.dataKey, iv).setAutoPadding(false);
      const sector = buf.subarray(at, Math.min(len, at + SECTOR_SIZE));
      const out = c.update(sector);
      out.copy(sector);
      out.fill(0);
    }
  }
}

const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** Fills t[at+16..end) block by block with the previous block times alpha (bytewise: the rare path). */
function xtsTweaks(t: Buffer, at: number, end: number): void {
  for (at += 16; at < end; at += 16) {
    let carry = 0;
    for (let k = 0; k < 16; k++) {
      const v = t[at - 16 + k];
      t[at + k] = ((v << 1) | carry) & 0xff;
      carry = v >>> 7;
    }
    if (carry) t[at] ^= 0x87;
  }
}

function ecb<T extends Cipher | Decipher>(c: T): T {
  c.setAutoPadding(false);
  return c;
}

function update(c: Cipher | Decipher | undefined, data: Buffer): Buffer {
  if (!c) throw new Error('Sector cipher used after destroy()');
  const out = c.update(data);
  // Whole blocks in, whole blocks out: ECB with padding off holds nothing back.
  if (out.length !== data.length) throw new Error(`Cipher returned ${out.length} bytes for ${data.length}`);
  return out;
}

/** dst = a ^ b, 32 bits at a time where the views allow it. */
function xorInto(dst: Buffer, a: Buffer, b: Buffer): void {
  const len = dst.length;
  if ((dst.byteOffset | a.byteOffset | b.byteOffset) % 4 === 0 && len % 4 === 0) {
    const d32 = new Uint32Array(dst.buffer, dst.byteOffset, len / 4);
    const a32 = new Uint32Array(a.buffer, a.byteOffset, len / 4);
    const b32 = new Uint32Array(b.buffer, b.byteOffset, len / 4);
    for (let i = 0; i < d32.length; i++) d32[i] = a32[i] ^ b32[i];
    return;
  }
  for (let i = 0; i < len; i++) dst[i] = a[i] ^ b[i];
}

function checkSector(s: number | bigint): void {
  if (typeof s === 'bigint' ? s < 0n : !Number.isSafeInteger(s) || s < 0) {
    throw new Error(`Invalid sector number ${String(s)}`);
  }
}

/** The plain/plain64 IV of sector first+i at ivs[at..at+n) (already zero). */
function writeSectorIv(ivs: Buffer, at: number, n: number, first: number | bigint, i: number, plain32: boolean): void {
  let lo: number;
  let hi: number;
  if (typeof first === 'bigint') {
    const s = BigInt.asUintN(64, first + BigInt(i));
    lo = Number(s & 0xffffffffn);
    hi = Number(s >> 32n);
  } else {
    const s = first + i;
    lo = s % 0x100000000;
    hi = Math.floor(s / 0x100000000);
  }
  ivs.writeUInt32LE(lo, at);
  if (!plain32 && n >= 8) ivs.writeUInt32LE(hi, at + 4);
}

