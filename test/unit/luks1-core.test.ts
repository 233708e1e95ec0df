/**
 * The LUKS1 crypto core on its own: AF split/merge, the sector cipher against published
 * and independently computed vectors (IEEE 1619 XTS-AES, OpenSSL's own modes, CBC-ESSIV
 * from the openssl CLI), PBKDF2 and QEMU's iteration formula, and LUKS1 create / open /
 * amend over an in-memory disk, with QEMU 7.2's messages and damaged headers.
 */
import { describe, expect, it } from 'vitest';
import { createCipheriv, createHash, randomBytes } from 'node:crypto';
import { afMerge, afSplit } from '../../src/crypto/af-splitter.js';
import {
  createSectorCipher,
  essivCipherAlg,
  isCipherAlgAvailable,
  sectorCipherKeyLength,
  type SectorCipherOptions,
} from '../../src/crypto/sector-cipher.js';
import {
  LUKS_MIN_MASTER_KEY_ITERS,
  LUKS_MIN_SLOT_KEY_ITERS,
  luksMasterKeyIterations,
  luksSlotIterations,
  pbkdf2,
  pbkdf2CountIterations,
} from '../../src/crypto/pbkdf.js';
import {
  amendLuks1,
  createLuks1,
  createPayloadCipher,
  encodeLuksHeader,
  luks1Layout,
  openLuks1,
  readLuks1Header,
  type Luks1AmendOptions,
  type Luks1CreateOptions,
} from '../../src/crypto/luks1.js';
import { LUKS_KEY_SLOT_DISABLED, parseLuksHeader } from '../../src/formats/qcow2/luks.js';
import { Prng } from '../helpers/prng.js';

const H = (hex: string): Buffer => Buffer.from(hex, 'hex');
const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const pw = (s: string): Buffer => Buffer.from(s, 'utf8');
/** 100k iterations/s: iter-time 10 ms gives QEMU's minimum of 1000 for slots and digest. */
const FAST = { calibrate: () => 100_000, iterTime: 10 };

/** A growable in-memory disk with the read/write callbacks luks1 takes. */
class MemDisk {
  buf = Buffer.alloc(0);
  writes: Array<[number, number]> = [];
  read = async (offset: number, length: number): Promise<Buffer> =>
    Buffer.from(this.buf.subarray(offset, Math.min(this.buf.length, offset + length)));
  write = async (offset: number, data: Buffer): Promise<void> => {
    this.writes.push([offset, data.length]);
    if (offset + data.length > this.buf.length) {
      const grown = Buffer.alloc(offset + data.length);
      this.buf.copy(grown);
      this.buf = grown;
    }
    data.copy(this.buf, offset);
  };
}

async function newVolume(opts: Partial<Luks1CreateOptions> = {}, pass = 'PASS') {
  const disk = new MemDisk();
  const vol = await createLuks1(disk.write, { passphrase: pw(pass), ...FAST, ...opts });
  return { disk, vol };
}

async function expectReject(p: Promise<unknown>, message: string): Promise<void> {
  await expect(p).rejects.toThrow(message);
  // exactly that message, not just containing it
  await p.catch((e: Error) => expect(e.message).toBe(message));
}

describe('AF splitter', () => {
  it('split then merge gives the key back for every hash, key length and stripe count', () => {
    for (const hash of ['md5', 'sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160']) {
      for (const keyLen of [16, 20, 24, 32, 33, 48, 64]) {
        for (const stripes of [1, 2, 3, 4000]) {
          if (stripes === 4000 && keyLen !== 32) continue;
          const key = randomBytes(keyLen);
          const split = afSplit(hash, key, stripes);
          expect(split.length).toBe(keyLen * stripes);
          expect(afMerge(hash, split, keyLen, stripes).equals(key)).toBe(true);
        }
      }
    }
  });

  it('merge follows the LUKS1 spec: key = H(s0) ^ s1, H hashing be32(i) || piece i per digest-sized piece', () => {
    // 48-byte key with sha256: pieces of 32 and 16 bytes (the second truncated digest)
    const s0 = Buffer.from([...Array(48).keys()]);
    const s1 = Buffer.alloc(48, 0x5a);
    const piece = (i: number, p: Buffer) =>
      createHash('sha256').update(Buffer.from([0, 0, 0, i])).update(p).digest();
    const d = Buffer.concat([piece(0, s0.subarray(0, 32)), piece(1, s0.subarray(32)).subarray(0, 16)]);
    const want = Buffer.from(d.map((b, i) => b ^ s1[i]));
    expect(afMerge('sha256', Buffer.concat([s0, s1]), 48, 2).equals(want)).toBe(true);
  });

  it('changing any stripe changes the merged key; the stripes are random', () => {
    const key = randomBytes(32);
    const a = afSplit('sha1', key, 4000);
    const b = afSplit('sha1', key, 4000);
    expect(a.equals(b)).toBe(false);
    for (const at of [0, 32 * 1999 + 7, 32 * 3999 + 31]) {
      const bad = Buffer.from(a);
      bad[at] ^= 1;
      expect(afMerge('sha1', bad, 32, 4000).equals(key)).toBe(false);
    }
  });

  it('refuses unknown hashes, bad stripe counts and short material', () => {
    expect(() => afSplit('sha3', randomBytes(16), 2)).toThrow("Hash algorithm 'sha3' not supported");
    expect(() => afSplit('sha1', randomBytes(16), 0)).toThrow('Invalid AF stripe count 0');
    expect(() => afMerge('sha1', Buffer.alloc(10), 16, 2)).toThrow('AF material is 10 bytes, 32 needed');
  });
});

describe('sector cipher', () => {
  const seqIv = (n: bigint): Buffer => {
    const b = Buffer.alloc(16);
    b.writeBigUInt64LE(n);
    return b;
  };
  const enc = (o: SectorCipherOptions, data: Buffer, sector: number | bigint): Buffer => {
    const c = createSectorCipher(o);
    const buf = Buffer.from(data);
    c.encrypt(buf, sector);
    const back = Buffer.from(buf);
    c.decrypt(back, sector);
    expect(back.equals(data)).toBe(true);
    c.destroy();
    return buf;
  };
  const pt512 = Buffer.concat([Buffer.from([...Array(256).keys()]), Buffer.from([...Array(256).keys()])]);

  it('IEEE 1619 XTS-AES vectors 1-3 (32-byte data units)', () => {
    const vectors: Array<[string, bigint, Buffer, string]> = [
      ['00'.repeat(32), 0n, Buffer.alloc(32), '917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e'],
      ['11'.repeat(16) + '22'.repeat(16), 0x3333333333n, Buffer.alloc(32, 0x44), 'c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0'],
      ['fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0' + '22'.repeat(16), 0x3333333333n, Buffer.alloc(32, 0x44), 'af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89'],
    ];
    for (const [key, seq, pt, ct] of vectors) {
      // vector 1 has key1 == key2, which OpenSSL's own XTS refuses; QEMU (nettle) accepts it
      expect(enc({ alg: 'aes-128', mode: 'xts', ivgen: 'plain64', key: H(key) }, pt, seq).toString('hex')).toBe(ct);
    }
  });

  it('IEEE 1619 vectors 4 (XTS-AES-128) and 10 (XTS-AES-256), 512-byte units, match the standard and OpenSSL', () => {
    const cases: Array<[string, string, bigint, string]> = [
      ['aes-128', '27182818284590452353602874713526' + '31415926535897932384626433832795', 0n, '27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c'],
      ['aes-256', '2718281828459045235360287471352662497757247093699959574966967627' + '3141592653589793238462643383279502884197169399375105820974944592', 0xffn, '1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b'],
    ];
    for (const [alg, key, seq, prefix] of cases) {
      const ct = enc({ alg, mode: 'xts', ivgen: 'plain64', key: H(key) }, pt512, seq);
      expect(ct.subarray(0, 32).toString('hex')).toBe(prefix);
      const ossl = createCipheriv(`${alg}-xts`, H(key), seqIv(seq)).update(pt512);
      expect(ct.equals(ossl)).toBe(true);
    }
  });

  it('XTS over many sectors equals OpenSSL per sector, across the 2^32 boundary and with bigint sectors', () => {
    const key = randomBytes(64);
    const data = randomBytes(512 * 9);
    for (const first of [0, 7, 0xfffffffc, 2 ** 40 + 3]) {
      for (const s of [first, BigInt(first)]) {
        const ct = enc({ alg: 'aes-256', mode: 'xts', ivgen: 'plain64', key }, data, s);
        for (let i = 0; i < 9; i++) {
          const want = createCipheriv('aes-256-xts', key, seqIv(BigInt(first) + BigInt(i))).update(data.subarray(i * 512, i * 512 + 512));
          expect(ct.subarray(i * 512, i * 512 + 512).equals(want)).toBe(true);
        }
      }
    }
  });

  it('plain is the sector number mod 2^32, plain64 the full 64 bits (CBC, computed with the openssl CLI)', () => {
    const key = H('000102030405060708090a0b0c0d0e0f');
    const pt = Buffer.from(Array.from({ length: 512 }, (_, i) => (i * 7 + 3) & 255));
    const sector = 2 ** 32 + 5;
    // openssl enc -aes-128-cbc -nopad -iv 05000000000000000000000000000000 / 05000000010000000000000000000000
    expect(sha256(enc({ alg: 'aes-128', mode: 'cbc', ivgen: 'plain', key }, pt, sector))).toBe('43d27f8c0732ac888e8d89f8b003db809abdaab61ac6058809fc85f8e4d2360b');
    expect(sha256(enc({ alg: 'aes-128', mode: 'cbc', ivgen: 'plain64', key }, pt, BigInt(sector)))).toBe('2d62255f743cf26d9d1e1ded35cff828ab8ce9eb01b1137938043349dac2a284');
  });

  it('CBC-ESSIV:sha256 with aes-128 encrypts the IV with aes-256 keyed by sha256(key) (openssl CLI vectors)', () => {
    const key = H('000102030405060708090a0b0c0d0e0f');
    const pt = Buffer.from(Array.from({ length: 1024 }, (_, i) => (i * 7 + 3) & 255));
    // salt = sha256(key); IV(s) = aes-256-ecb(salt, le64(s) || 0^8); ct = aes-128-cbc(key, IV(s)) per sector, sectors 5 and 6
    const ct = enc({ alg: 'aes-128', mode: 'cbc', ivgen: 'essiv', ivgenHash: 'sha256', key }, pt, 5);
    expect(sha256(ct)).toBe('a1a5d5a6c008c2d68b988b76fb2a27a0cfe42b585ea97ebc278e782df761d8eb');
    expect(ct.subarray(0, 32).toString('hex')).toBe('c76fa884de951860ab9a3754d5c57910bd2c9ed67390deaba767de1d9a82de27');
    expect(ct.subarray(512, 544).toString('hex')).toBe('5fcfc24dfc3c408b4f944ff122d3bb5538f488c637f32bfed4b85cd92c37ccf4');
  });

  it('ESSIV in XTS mode hashes the whole double key; ECB and CTR match OpenSSL', () => {
    const key = randomBytes(64);
    const data = randomBytes(1024);
    const salt = createHash('sha256').update(key).digest();
    const ct = enc({ alg: 'aes-256', mode: 'xts', ivgen: 'essiv', ivgenHash: 'sha256', key }, data, 9);
    for (let i = 0; i < 2; i++) {
      const iv = createCipheriv('aes-256-ecb', salt, null).setAutoPadding(false).update(seqIv(BigInt(9 + i)));
      const want = createCipheriv('aes-256-xts', key, iv).update(data.subarray(i * 512, i * 512 + 512));
      expect(ct.subarray(i * 512, i * 512 + 512).equals(want)).toBe(true);
    }
    const k32 = key.subarray(0, 32);
    const ecb = enc({ alg: 'aes-256', mode: 'ecb', ivgen: 'plain64', key: k32 }, data, 3);
    expect(ecb.equals(createCipheriv('aes-256-ecb', k32, null).setAutoPadding(false).update(data))).toBe(true);
    const ctr = enc({ alg: 'aes-256', mode: 'ctr', ivgen: 'plain64', key: k32 }, data, 3);
    expect(ctr.subarray(512).equals(createCipheriv('aes-256-ctr', k32, seqIv(4n)).update(data.subarray(512)))).toBe(true);
  });

  it('round trips every mode and ivgen, on unaligned buffers and with a short final sector', () => {
    const rng = new Prng(1619);
    for (const alg of ['aes-128', 'aes-192', 'aes-256', '3des']) {
      for (const mode of ['ecb', 'cbc', 'xts', 'ctr']) {
        if (alg === '3des' && mode === 'xts') continue;
        for (const ivgen of ['plain', 'plain64', 'essiv']) {
          if (alg === '3des' && ivgen === 'essiv') continue;
          const block = alg === '3des' ? 8 : 16;
          const key = randomBytes(sectorCipherKeyLength(alg, mode));
          const len = 512 * rng.int(0, 3) + block * rng.int(1, 31);
          const backing = randomBytes(len + 3);
          const buf = backing.subarray(3); // not 4-byte aligned
          const plain = Buffer.from(buf);
          const c = createSectorCipher({ alg, mode, ivgen, ivgenHash: 'sha256', key });
          c.encrypt(buf, 77);
          expect(buf.equals(plain)).toBe(false);
          const aligned = Buffer.from(buf);
          c.decrypt(buf, 77);
          expect(buf.equals(plain), `${alg}-${mode}-${ivgen}`).toBe(true);
          // the same result on an aligned copy
          c.decrypt(aligned, 77);
          expect(aligned.equals(plain)).toBe(true);
        }
      }
    }
  });

  it('refuses what it cannot do with one-line messages', () => {
    const k = (n: number) => Buffer.alloc(n, 1);
    expect(() => createSectorCipher({ alg: 'serpent-256', mode: 'xts', ivgen: 'plain64', key: k(64) })).toThrow("Algorithm 'serpent-256' not supported");
    expect(() => createSectorCipher({ alg: 'twofish-128', mode: 'cbc', ivgen: 'plain64', key: k(16) })).toThrow("Algorithm 'twofish-128' not supported");
    if (!isCipherAlgAvailable('cast5-128')) {
      expect(() => createSectorCipher({ alg: 'cast5-128', mode: 'cbc', ivgen: 'plain64', key: k(16) })).toThrow("Algorithm 'cast5-128' not supported");
    }
    expect(() => createSectorCipher({ alg: 'aes-256', mode: 'gcm', ivgen: 'plain64', key: k(32) })).toThrow("Cipher mode 'gcm' not supported");
    expect(() => createSectorCipher({ alg: 'aes-256', mode: 'xts', ivgen: 'plain64', key: k(32) })).toThrow(
      'Cipher key length 32 bytes does not match aes-256-xts, which needs 64',
    );
    expect(() => createSectorCipher({ alg: 'aes-256', mode: 'cbc', ivgen: 'essiv', key: k(32) })).toThrow('Missing IV generator hash specification');
    expect(() => createSectorCipher({ alg: 'aes-256', mode: 'cbc', ivgen: 'bogus', key: k(32) })).toThrow("IV generator 'bogus' not supported");
    expect(essivCipherAlg('aes-128', 'sha256')).toBe('aes-256');
    expect(essivCipherAlg('aes-256', 'md5')).toBe('aes-128');
    expect(essivCipherAlg('aes-256', 'sha256')).toBe('aes-256');
    expect(() => essivCipherAlg('aes-192', 'sha224')).toThrow('No AES cipher with key size 28 available');
    expect(() => essivCipherAlg('aes-128', 'sha1')).toThrow('No AES cipher with key size 20 available');
    expect(() => essivCipherAlg('twofish-256', 'sha512')).toThrow('No Twofish cipher with key size 64 available');
    expect(() => essivCipherAlg('cast5-128', 'sha256')).toThrow('Cipher cast5-128 not supported with essiv');
    const c = createSectorCipher({ alg: 'aes-128', mode: 'xts', ivgen: 'plain64', key: k(32) });
    expect(() => c.encrypt(Buffer.alloc(100), 0)).toThrow('Encrypted data length 100 is not a multiple of the 16-byte cipher block');
    expect(() => c.encrypt(Buffer.alloc(512), -1)).toThrow('Invalid sector number -1');
    expect(() => c.encrypt(Buffer.alloc(512), 1.5)).toThrow('Invalid sector number 1.5');
    c.destroy();
    expect(() => c.encrypt(Buffer.alloc(512), 0)).toThrow('Sector cipher used after destroy()');
  });

  it('keeps its own key copies and zeroes them on destroy', () => {
    const key = randomBytes(64);
    const saved = Buffer.from(key);
    const c = createSectorCipher({ alg: 'aes-256', mode: 'xts', ivgen: 'essiv', ivgenHash: 'sha256', key });
    key.fill(0); // the caller wiping its copy does not break the cipher
    const data = Buffer.alloc(512, 7);
    c.encrypt(data, 1);
    const ref = createSectorCipher({ alg: 'aes-256', mode: 'xts', ivgen: 'essiv', ivgenHash: 'sha256', key: saved });
    const want = Buffer.alloc(512, 7);
    ref.encrypt(want, 1);
    expect(data.equals(want)).toBe(true);
    const held = c as unknown as { dataKey: Buffer; tweakKey: Buffer; essivKey: Buffer };
    c.destroy();
    for (const b of [held.dataKey, held.tweakKey, held.essivKey]) expect(b.every((x) => x === 0)).toBe(true);
  });
});

describe('PBKDF2 and QEMU iteration counts', () => {
  it('pbkdf2 matches RFC 6070 and refuses bad input', async () => {
    expect((await pbkdf2('sha1', pw('password'), pw('salt'), 2, 20)).toString('hex')).toBe('ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957');
    await expect(pbkdf2('sha3', pw('p'), pw('s'), 1, 20)).rejects.toThrow('PBKDF does not support hash algorithm sha3');
    await expect(pbkdf2('sha1', pw('p'), pw('s'), 0, 20)).rejects.toThrow('PBKDF iterations 0 must be between 1 and 4294967295');
  });

  it('slot = per_sec * ms / 1000, digest = that / 8, each at least 1000; more than 2^32-1 is an error', () => {
    expect(luksSlotIterations(1_000_000, 2000)).toBe(2_000_000);
    expect(luksMasterKeyIterations(1_000_000, 2000)).toBe(250_000);
    expect(luksSlotIterations(99_999, 10)).toBe(LUKS_MIN_SLOT_KEY_ITERS);
    expect(luksMasterKeyIterations(700_000, 10)).toBe(LUKS_MIN_MASTER_KEY_ITERS);
    expect(luksSlotIterations(1_234_567, 1500)).toBe(1_851_850);
    expect(() => luksSlotIterations(3_000_000_000, 2000)).toThrow('PBKDF iterations 6000000000 larger than 4294967295: Numerical result out of range');
    expect(luksMasterKeyIterations(3_000_000_000, 2000)).toBe(750_000_000);
    expect(() => luksMasterKeyIterations(Number.MAX_SAFE_INTEGER, 4_000_000)).toThrow(/too large to scale|larger than/);
  });

  it('calibration measures a plausible rate', () => {
    const perSec = pbkdf2CountIterations('sha256', pw('PASS'), randomBytes(32), 32);
    expect(perSec).toBeGreaterThan(10_000);
    expect(perSec).toBeLessThan(1e9);
  });
});

describe('LUKS1 volumes', () => {
  it('creates the layout QEMU 7.2 creates and opens it again', async () => {
    const inits: number[] = [];
    const { disk, vol } = await newVolume({ init: async (p) => void inits.push(p), uuid: '01234567-89ab-cdef-0123-456789abcdef' });
    // init comes first, then slot 0's material, then the header
    expect(inits).toEqual([2068480]);
    expect(disk.writes).toEqual([[4096, 64 * 4000], [0, 592]]);
    const h = parseLuksHeader(disk.buf.subarray(0, 592));
    expect(h).toMatchObject({ cipherName: 'aes', cipherMode: 'xts-plain64', hashSpec: 'sha256', keyBytes: 64, payloadOffsetSector: 4040, uuid: '01234567-89ab-cdef-0123-456789abcdef' });
    expect(h.masterKeyIterations).toBe(1000);
    expect(h.slots.map((s) => s.keyOffsetSector)).toEqual([8, 512, 1016, 1520, 2024, 2528, 3032, 3536]);
    expect(h.slots.map((s) => s.active)).toEqual([true, false, false, false, false, false, false, false]);
    expect(h.slots[0].iterations).toBe(1000);
    expect(h.slots[1]).toMatchObject({ state: LUKS_KEY_SLOT_DISABLED, iterations: 0, stripes: 4000 });
    expect(h.slots[1].salt.every((b) => b === 0)).toBe(true);
    expect(encodeLuksHeader(h).equals(disk.buf.subarray(0, 592))).toBe(true);

    const opened = await openLuks1(disk.read, pw('PASS'));
    expect(opened.masterKey.equals(vol.masterKey)).toBe(true);
    expect(opened.keyslot).toBe(0);
    expect(opened.payloadOffset).toBe(2068480);
    expect(opened.algorithms).toEqual({ cipherAlg: 'aes-256', cipherMode: 'xts', ivgenAlg: 'plain64', ivgenCipherAlg: 'aes-256', hashAlg: 'sha256' });

    // payload written with one cipher reads back through the other
    const data = randomBytes(8192);
    const c1 = createPayloadCipher(vol);
    const c2 = createPayloadCipher(opened);
    const buf = Buffer.from(data);
    c1.encrypt(buf, 16);
    c2.decrypt(buf, 16);
    expect(buf.equals(data)).toBe(true);
  });

  it('lays out other key sizes as QEMU does and records the mode spec and hashes', async () => {
    expect(luks1Layout(32)).toEqual({ slotOffsets: [4096, 135168, 266240, 397312, 528384, 659456, 790528, 921600], slotSectors: 256, payloadOffset: 1052672 });
    expect(luks1Layout(16).payloadOffset).toBe(4096 + 8 * 64 * 1024);
    const { disk } = await newVolume({ cipherAlg: 'aes-128', cipherMode: 'cbc', ivgenAlg: 'essiv', hashAlg: 'sha1' });
    const { header, algorithms } = await readLuks1Header(disk.read);
    expect(header).toMatchObject({ cipherName: 'aes', cipherMode: 'cbc-essiv:sha256', hashSpec: 'sha1', keyBytes: 16, payloadOffsetSector: 8 + 8 * 128 });
    expect(algorithms).toMatchObject({ cipherAlg: 'aes-128', ivgenAlg: 'essiv', ivgenHashAlg: 'sha256', ivgenCipherAlg: 'aes-256' });
    // an ivgen hash with plain64 is kept in the header and ignored
    const { disk: d2 } = await newVolume({ cipherAlg: 'aes-192', ivgenHashAlg: 'sha1' });
    expect((await readLuks1Header(d2.read)).header.cipherMode).toBe('xts-plain64:sha1');
    expect((await openLuks1(d2.read, pw('PASS'))).keyslot).toBe(0);
    for (const opts of [{ cipherMode: 'ecb' }, { cipherMode: 'ctr', hashAlg: 'sha512' }, { cipherAlg: 'aes-128', ivgenAlg: 'plain', hashAlg: 'ripemd160' }]) {
      const { disk: d } = await newVolume(opts);
      expect((await openLuks1(d.read, pw('PASS'))).keyslot).toBe(0);
    }
  });

  it('calibrates with the given hash and output lengths', async () => {
    const calls: Array<[string, number]> = [];
    const calibrate = (hash: string, _p: Buffer, _s: Buffer, len: number) => {
      calls.push([hash, len]);
      return 2_000_000;
    };
    const { disk } = await newVolume({ calibrate, iterTime: 100, hashAlg: 'sha512', cipherAlg: 'aes-128' });
    // digest first (20 bytes out), then the slot (master key length)
    expect(calls).toEqual([['sha512', 20], ['sha512', 32]]);
    const { header } = await readLuks1Header(disk.read);
    expect(header.masterKeyIterations).toBe(25_000);
    expect(header.slots[0].iterations).toBe(200_000);
  });

  it('refuses ciphers it cannot create, before writing anything', async () => {
    for (const [opts, msg] of [
      [{ cipherAlg: 'serpent-256' }, "Algorithm 'serpent-256' not supported"],
      [{ cipherAlg: 'twofish-128', cipherMode: 'cbc' }, "Algorithm 'twofish-128' not supported"],
      [{ cipherAlg: '3des', cipherMode: 'cbc' }, "Algorithm '3des' not supported"],
      [{ cipherAlg: 'aes-128', ivgenAlg: 'essiv', ivgenHashAlg: 'sha1' }, 'No AES cipher with key size 20 available'],
      [{ cipherAlg: 'aes-192', cipherMode: 'cbc' }, 'Cipher aes-192 in mode cbc needs 96000-byte key slots, which are not whole 512-byte sectors; QEMU cannot use such a LUKS header'],
    ] as Array<[Partial<Luks1CreateOptions>, string]>) {
      const disk = new MemDisk();
      await expectReject(createLuks1(disk.write, { passphrase: pw('x'), ...FAST, ...opts }), msg);
      expect(disk.writes).toEqual([]);
    }
  });

  it('a wrong passphrase gives QEMU message; the passphrase ends at a NUL as in QEMU', async () => {
    const { disk } = await newVolume({}, 'secret');
    await expectReject(openLuks1(disk.read, pw('Secret')), 'Invalid password, cannot unlock any keyslot');
    await expect(openLuks1(disk.read, pw('wrong'), { fileName: 'x.luks' })).rejects.toMatchObject({ file: 'x.luks' });
    expect((await openLuks1(disk.read, Buffer.from('secret\0ignored'))).keyslot).toBe(0);
  });

  describe('amend', () => {
    const amend = (disk: MemDisk, o: Omit<Luks1AmendOptions, 'calibrate'>) =>
      amendLuks1(disk.read, disk.write, { calibrate: FAST.calibrate, ...o });

    it('adds keys to the first free or the given slot; each passphrase opens its slot', async () => {
      const { disk, vol } = await newVolume();
      await amend(disk, { state: 'active', keySecret: pw('PASS'), newSecret: pw('two'), iterTime: 10 });
      await amend(disk, { state: 'active', keySecret: pw('two'), newSecret: pw('six'), keyslot: 6, iterTime: 10 });
      const h = (await readLuks1Header(disk.read)).header;
      expect(h.slots.map((s) => s.active)).toEqual([true, true, false, false, false, false, true, false]);
      for (const [p, slot] of [['PASS', 0], ['two', 1], ['six', 6]] as const) {
        const o = await openLuks1(disk.read, pw(p));
        expect(o.keyslot).toBe(slot);
        expect(o.masterKey.equals(vol.masterKey)).toBe(true);
      }
      // 'secret' takes precedence over the open passphrase
      await expectReject(amend(disk, { state: 'active', keySecret: pw('PASS'), secret: pw('nope'), newSecret: pw('x'), iterTime: 10 }), 'Invalid password, cannot unlock any keyslot');
    });

    it('refuses adding with QEMU 7.2 messages, and --force overwrites an active slot', async () => {
      const { disk } = await newVolume();
      const base = { state: 'active' as const, keySecret: pw('PASS'), iterTime: 10 };
      await expectReject(amend(disk, { ...base }), "'new-secret' is required to activate a keyslot");
      await expectReject(amend(disk, { ...base, newSecret: pw('n'), oldSecret: pw('PASS') }), "'old-secret' must not be given when activating keyslots");
      await expectReject(amend(disk, { ...base, newSecret: pw('n'), keyslot: 8 }), 'Invalid keyslot 8 specified, must be between 0 and 7');
      await expectReject(amend(disk, { ...base, newSecret: pw('n'), keyslot: -1 }), 'Invalid keyslot 4294967295 specified, must be between 0 and 7');
      await expectReject(amend(disk, { ...base, newSecret: pw('n'), keyslot: 0 }), 'Refusing to overwrite active keyslot 0 - please erase it first');
      await amend(disk, { ...base, newSecret: pw('n'), keyslot: 0, force: true });
      await expectReject(openLuks1(disk.read, pw('PASS')), 'Invalid password, cannot unlock any keyslot');
      for (let i = 1; i < 8; i++) await amend(disk, { ...base, keySecret: pw('n'), newSecret: pw(`k${i}`) });
      await expectReject(amend(disk, { ...base, keySecret: pw('n'), newSecret: pw('k9') }), "Can't add a keyslot - all keyslots are in use");
    });

    it('erases by slot or by old passphrase, overwriting the material', async () => {
      const { disk } = await newVolume();
      const base = { state: 'active' as const, keySecret: pw('PASS'), iterTime: 10 };
      await amend(disk, { ...base, newSecret: pw('b') });
      await amend(disk, { ...base, newSecret: pw('b') });
      await amend(disk, { ...base, newSecret: pw('c') });
      const before = Buffer.from(disk.buf.subarray(512 * 512, 512 * 512 + 64 * 4000));
      disk.writes = [];
      await amend(disk, { state: 'inactive', keyslot: 1 });
      // header first, then QEMU's 40 passes of random data over the material
      expect(disk.writes[0]).toEqual([0, 592]);
      expect(disk.writes.slice(1)).toEqual(Array(40).fill([512 * 512, 64 * 4000]));
      const after = disk.buf.subarray(512 * 512, 512 * 512 + 64 * 4000);
      expect(after.equals(before)).toBe(false);
      let h = (await readLuks1Header(disk.read)).header;
      expect(h.slots[1]).toMatchObject({ active: false, state: LUKS_KEY_SLOT_DISABLED, iterations: 0 });
      expect(h.slots[1].salt.every((b) => b === 0)).toBe(true);
      // slot 2 still holds 'b'; erasing by passphrase takes every slot it opens
      await amend(disk, { state: 'inactive', oldSecret: pw('b') });
      h = (await readLuks1Header(disk.read)).header;
      expect(h.slots.map((s) => s.active)).toEqual([true, false, false, true, false, false, false, false]);
      await expectReject(openLuks1(disk.read, pw('b')), 'Invalid password, cannot unlock any keyslot');
      expect((await openLuks1(disk.read, pw('c'))).keyslot).toBe(3);
    });

    it('refuses erasing with QEMU 7.2 messages', async () => {
      const { disk } = await newVolume();
      const er = { state: 'inactive' as const };
      await expectReject(amend(disk, { ...er, keyslot: 0, newSecret: pw('x') }), "'new-secret' must not be given when erasing keyslots");
      await expectReject(amend(disk, { ...er, keyslot: 0, iterTime: 10 }), "'iter-time' must not be given when erasing keyslots");
      await expectReject(amend(disk, { ...er, keyslot: 0, secret: pw('PASS') }), "'secret' must not be given when erasing keyslots");
      await expectReject(amend(disk, { ...er, keyslot: 9 }), 'Invalid keyslot 9 specified, must be between 0 and 7');
      await expectReject(amend(disk, { ...er, keyslot: -1 }), 'Invalid keyslot -1 specified, must be between 0 and 7');
      await expectReject(amend(disk, { ...er, keyslot: 3 }), 'Given keyslot 3 is already erased (inactive) ');
      await expectReject(amend(disk, { ...er, keyslot: 0, oldSecret: pw('nope') }), "Given keyslot 0 doesn't contain the given old password for erase operation");
      await expectReject(
        amend(disk, { ...er, keyslot: 0 }),
        'Attempt to erase the only active keyslot 0 which will erase all the data in the image irreversibly - refusing operation',
      );
      await expectReject(amend(disk, { ...er, oldSecret: pw('nope') }), 'No keyslots match given (old) password for erase operation');
      await expectReject(
        amend(disk, { ...er, oldSecret: pw('PASS') }),
        'All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation',
      );
      await expectReject(
        amend(disk, { ...er }),
        'To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given',
      );
      // nothing changed
      expect((await openLuks1(disk.read, pw('PASS'))).keyslot).toBe(0);
      // --force erases the last slot
      await amend(disk, { ...er, keyslot: 0, force: true });
      await expectReject(openLuks1(disk.read, pw('PASS')), 'Invalid password, cannot unlock any keyslot');
    });
  });

  describe('damaged headers give errors, never crashes or hangs', () => {
    const slotAt = (i: number) => 208 + 48 * i;

    it('with QEMU messages for the checks QEMU makes', async () => {
      const { disk } = await newVolume();
      const cases: Array<[(b: Buffer) => void, string]> = [
        [(b) => b.write('LUKZ', 0, 'latin1'), 'Volume is not in LUKS format'],
        [(b) => b.writeUInt16BE(2, 6), 'LUKS version 2 is not supported'],
        [(b) => b.writeUInt32BE(7, 104), 'LUKS payload is overlapping with the header'],
        [(b) => b.writeUInt32BE(0, 164), 'LUKS key iteration count is zero'],
        [(b) => b.writeUInt32BE(40000, slotAt(0) + 44), 'Keyslot 0 is corrupted (stripes 40000 != 4000)'],
        [(b) => b.writeUInt32BE(1, slotAt(2)), 'Keyslot 2 state (active/disable) is corrupted'],
        [(b) => b.writeUInt32BE(0, slotAt(0) + 4), 'Keyslot 0 iteration count is zero'],
        [(b) => b.writeUInt32BE(7, slotAt(0) + 40), 'Keyslot 0 is overlapping with the LUKS header'],
        [(b) => b.writeUInt32BE(4000, slotAt(7) + 40), 'Keyslot 7 is overlapping with the encrypted payload'],
        [(b) => b.writeUInt32BE(600, slotAt(0) + 40), 'Keyslots 0 and 1 are overlapping in the header'],
        [(b) => b.writeUInt32BE(40, 108), "Algorithm 'aes' with key size 20 bytes not supported"],
        [(b) => b.write('xts\0', 40, 'latin1'), "Unexpected cipher mode string format 'xts'"],
        [(b) => b.write('sha3\0', 72, 'latin1'), "Hash algorithm 'sha3' not supported"],
        [(b) => b.write('serpent\0', 8, 'latin1'), ''],
      ];
      for (const [damage, msg] of cases) {
        const d = new MemDisk();
        d.buf = Buffer.from(disk.buf);
        damage(d.buf);
        if (msg === '') {
          // a valid header with a cipher OpenSSL lacks: the header reads, unlocking fails clearly
          await readLuks1Header(d.read);
          await expectReject(openLuks1(d.read, pw('PASS')), "Algorithm 'serpent-256' not supported");
        } else {
          await expectReject(openLuks1(d.read, pw('PASS')), msg);
        }
      }
    });

    it('short reads, truncated key material and iteration limits', async () => {
      const { disk } = await newVolume();
      const short = new MemDisk();
      short.buf = Buffer.from(disk.buf.subarray(0, 300));
      await expectReject(openLuks1(short.read, pw('PASS')), 'Volume is not in LUKS format');
      const cut = new MemDisk();
      cut.buf = Buffer.from(disk.buf.subarray(0, 4096 + 1000));
      await expectReject(openLuks1(cut.read, pw('PASS')), 'Keyslot 0 key material is truncated (1000 of 256000 bytes)');
      const big = new MemDisk();
      big.buf = Buffer.from(disk.buf);
      big.buf.writeUInt32BE(0xffffffff, slotAt(0) + 4);
      await expectReject(openLuks1(big.read, pw('PASS'), { maxIterations: 1_000_000 }), 'Keyslot 0 needs 4294967295 PBKDF2 iterations, more than the limit of 1000000');
    });

    it('random damage to the header and key material: an error or a correct key, quickly', async () => {
      const { disk, vol } = await newVolume({ cipherAlg: 'aes-128', cipherMode: 'cbc', ivgenAlg: 'essiv' });
      const rng = new Prng(0x1005);
      for (let n = 0; n < 150; n++) {
        const d = new MemDisk();
        d.buf = Buffer.from(disk.buf);
        const flips = rng.int(1, 4);
        for (let f = 0; f < flips; f++) {
          const at = rng.chance(0.8) ? rng.int(0, 591) : rng.int(4096, 4096 + 16 * 4000 - 1);
          d.buf[at] = rng.chance(0.5) ? rng.int(0, 255) : d.buf[at] ^ (1 << rng.int(0, 7));
        }
        try {
          const o = await openLuks1(d.read, pw('PASS'), { maxIterations: 5000 });
          // only damage that left the slot and digest intact can unlock
          expect(o.masterKey.equals(vol.masterKey)).toBe(true);
        } catch (e) {
          expect(e).toBeInstanceOf(Error);
          expect((e as Error).message).not.toMatch(/\n/);
          expect((e as Error).message).not.toMatch(/Cannot read|undefined|NaN|RangeError/);
        }
      }
    });
  });
});
