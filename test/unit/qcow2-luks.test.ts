import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ImageFile } from '../../src/io/file.js';
import { CorruptImageError } from '../../src/core/errors.js';
import { readHeader } from '../../src/formats/qcow2/header.js';
import { luksAlgorithms, parseLuksHeader, readLuksInfo } from '../../src/formats/qcow2/luks.js';
import { retryingCalibrationSync } from '../helpers/qemu.js';

const hasQemu = spawnSync('qemu-img', ['--version']).status === 0;
const inCI = process.env.CI === 'true';
// Without qemu-img: skip locally, fail in CI.
const suite = hasQemu || inCI ? describe : describe.skip;

const EXT_CRYPTO = 0x0537be77;
// LUKS1 header field offsets
const CIPHER_NAME = 8;
const CIPHER_MODE = 40;
const HASH_SPEC = 72;
const PAYLOAD = 104;
const KEY_BYTES = 108;
const MK_ITERS = 164;
const UUID = 168;
const slotAt = (i: number): number => 208 + 48 * i;

function qemuImg(args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  if (r.error) throw r.error;
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Creates a LUKS-encrypted qcow2 image (qemu's PBKDF calibration fails now and then: retried as everywhere). */
function createLuks(path: string, extra: string): void {
  const opts = `encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10${extra ? `,${extra}` : ''}`;
  const r = retryingCalibrationSync(() => qemuImg(['create', '-q', '-f', 'qcow2', '--object', 'secret,id=s0,data=abc', '-o', opts, path, '1M']));
  if (r.status !== 0) throw new Error(`qemu-img create (${opts}) failed: ${r.stderr}`);
}

/** `qemu-img info` of a qcow2 image: the parsed JSON, or the error text after "Could not open '…': ". */
// eslint-disable-next-line @typescript-eslint/no-explicit-any -- qemu-img's JSON, probed field by field
function qemuInfo(path: string): { ok: true; json: any } | { ok: false; error: string } {
  const r = qemuImg(['info', '--output=json', '-f', 'qcow2', path]);
  if (r.status === 0) return { ok: true, json: JSON.parse(r.stdout) };
  const line = r.stderr.trim().split('\n')[0];
  const m = /^qemu-img: Could not open '[^']*': (.*)$/.exec(line);
  return { ok: false, error: m ? m[1] : line };
}

/** Position of the crypto header extension's data (u64 offset, u64 length) in an image. */
function cryptoExtAt(img: Buffer): number {
  let pos = img.readUInt32BE(100);
  for (;;) {
    const type = img.readUInt32BE(pos);
    const len = img.readUInt32BE(pos + 4);
    if (type === 0) throw new Error('no crypto header extension');
    if (type === EXT_CRYPTO) return pos + 8;
    pos += 8 + Math.ceil(len / 8) * 8;
  }
}

async function ourInfo(path: string): Promise<Record<string, unknown>> {
  const file = await ImageFile.open(path);
  try {
    const h = await readHeader(file);
    if (!h.crypto) throw new Error('image has no crypto header extension');
    return await readLuksInfo(file, h.crypto);
  } finally {
    await file.close();
  }
}

async function ourError(path: string): Promise<CorruptImageError> {
  try {
    await ourInfo(path);
  } catch (err) {
    expect(err).toBeInstanceOf(CorruptImageError);
    return err as CorruptImageError;
  }
  throw new Error(`expected ${path} to be refused`);
}

/** Same "encrypt" object as qemu-img info (deep equality including key order). */
async function expectSameEncrypt(path: string): Promise<Record<string, unknown>> {
  const q = qemuInfo(path);
  if (!q.ok) throw new Error(`qemu-img info refused ${path}: ${q.error}`);
  const ours = await ourInfo(path);
  expect(JSON.stringify(ours)).toBe(JSON.stringify(q.json['format-specific'].data.encrypt));
  return ours;
}

function putString(buf: Buffer, at: number, value: string | Buffer, len = 32): void {
  const b = typeof value === 'string' ? Buffer.from(value, 'latin1') : value;
  buf.fill(0, at, at + len);
  b.copy(buf, at, 0, Math.min(len, b.length));
}

suite('qcow2 LUKS header', () => {
  let dir = '';
  let n = 0;
  const tmp = (): string => join(dir, `t${n++}.qcow2`);
  const images: Record<string, string> = {};

  /** A copy of image `name` with the LUKS header (or the image) patched. */
  function patched(name: string, patch: (luks: Buffer, img: Buffer, ext: number) => void): string {
    const img = readFileSync(images[name]);
    const ext = cryptoExtAt(img);
    const off = Number(img.readBigUInt64BE(ext));
    const luks = img.subarray(off, off + 592);
    patch(luks, img, ext);
    const out = tmp();
    writeFileSync(out, img);
    return out;
  }

  beforeAll(() => {
    if (!hasQemu) throw new Error('qemu-img is required for these tests (CI=true)');
    dir = mkdtempSync(join(tmpdir(), 'qimg-luks-'));
    const variants: Record<string, string> = {
      default: '',
      essiv: 'encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256',
      twofish: 'encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512',
    };
    for (const [name, opts] of Object.entries(variants)) {
      images[name] = join(dir, `${name}.qcow2`);
      createLuks(images[name], opts);
    }
  });

  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('reproduces qemu-img info "encrypt" for the default LUKS image', async () => {
    const info = await expectSameEncrypt(images.default);
    expect(Object.keys(info)).toEqual([
      'ivgen-alg', 'hash-alg', 'cipher-alg', 'uuid', 'format', 'cipher-mode', 'slots', 'payload-offset', 'master-key-iters',
    ]);
    expect(info).toMatchObject({ 'ivgen-alg': 'plain64', 'hash-alg': 'sha256', 'cipher-alg': 'aes-256', format: 'luks', 'cipher-mode': 'xts' });
    const slots = info.slots as Array<Record<string, unknown>>;
    expect(slots).toHaveLength(8);
    expect(Object.keys(slots[0])).toEqual(['active', 'iters', 'key-offset', 'stripes']);
    expect(slots[0]).toMatchObject({ active: true, 'key-offset': 4096, stripes: 4000 });
    expect(Object.keys(slots[1])).toEqual(['active', 'key-offset']);
  });

  it('reproduces qemu-img info "encrypt" for essiv (ivgen-hash-alg after uuid) and twofish images', async () => {
    const info = await expectSameEncrypt(images.essiv);
    expect(Object.keys(info)).toEqual([
      'ivgen-alg', 'hash-alg', 'cipher-alg', 'uuid', 'ivgen-hash-alg', 'format', 'cipher-mode', 'slots', 'payload-offset', 'master-key-iters',
    ]);
    expect(info).toMatchObject({ 'ivgen-alg': 'essiv', 'ivgen-hash-alg': 'sha256', 'cipher-alg': 'aes-128', 'cipher-mode': 'cbc' });
    expect(await expectSameEncrypt(images.twofish)).toMatchObject({ 'cipher-alg': 'twofish-128', 'ivgen-alg': 'plain', 'hash-alg': 'sha512' });
  });

  it('matches qemu-img info on header variations qemu accepts', async () => {
    const accepted: Array<[string, (l: Buffer) => void]> = [
      ['slot 0 disabled', (l) => l.writeUInt32BE(0xdead, slotAt(0))],
      ['slot 5 enabled', (l) => { l.writeUInt32BE(0x00ac71f3, slotAt(5)); l.writeUInt32BE(1234, slotAt(5) + 4); }],
      ['uuid fills the field', (l) => putString(l, UUID, 'u'.repeat(40), 40)],
      ['hash sha1', (l) => putString(l, HASH_SPEC, 'sha1')],
      ['hash md5', (l) => putString(l, HASH_SPEC, 'md5')],
      ['hash ripemd160', (l) => putString(l, HASH_SPEC, 'ripemd160')],
      ['plain64 ignores a hash', (l) => putString(l, CIPHER_MODE, 'xts-plain64:sha1')],
      ['xts-essiv:sha256', (l) => putString(l, CIPHER_MODE, 'xts-essiv:sha256')],
      ['aes-192 (48-byte xts key)', (l) => l.writeUInt32BE(48, KEY_BYTES)],
      ['serpent', (l) => putString(l, CIPHER_NAME, 'serpent')],
      ['twofish', (l) => putString(l, CIPHER_NAME, 'twofish')],
      ['cast5', (l) => { putString(l, CIPHER_NAME, 'cast5'); l.writeUInt32BE(32, KEY_BYTES); }],
      ['payload after the key material', (l) => l.writeUInt32BE(l.readUInt32BE(PAYLOAD), PAYLOAD)],
    ];
    for (const [what, p] of accepted) {
      const path = patched('default', p);
      expect(qemuInfo(path).ok, what).toBe(true);
      await expectSameEncrypt(path);
    }
    const essivVariants: Array<[string, (l: Buffer) => void]> = [
      ['aes-128 cbc-essiv:md5 (ESSIV cipher aes-128)', (l) => putString(l, CIPHER_MODE, 'cbc-essiv:md5')],
      ['aes-128 ecb-essiv:sha256 (ESSIV cipher aes-256)', (l) => putString(l, CIPHER_MODE, 'ecb-essiv:sha256')],
      ['ctr-plain', (l) => putString(l, CIPHER_MODE, 'ctr-plain')],
    ];
    for (const [what, p] of essivVariants) {
      const path = patched('essiv', p);
      expect(qemuInfo(path).ok, what).toBe(true);
      await expectSameEncrypt(path);
    }
  });

  it('refuses what qemu-img refuses, with the same message', async () => {
    const refused: Array<[string, string, (l: Buffer) => void]> = [
      ['default', 'bad magic', (l) => (l[0] = 0x4d)],
      ['default', 'version 2', (l) => l.writeUInt16BE(2, 6)],
      ['default', 'bad slot marker', (l) => l.writeUInt32BE(0x12345678, slotAt(3))],
      ['default', 'stripes 0', (l) => l.writeUInt32BE(0, slotAt(2) + 44)],
      ['default', 'stripes 4001', (l) => l.writeUInt32BE(4001, slotAt(7) + 44)],
      ['default', 'cipher name unterminated', (l) => putString(l, CIPHER_NAME, 'a'.repeat(32))],
      ['default', 'cipher mode unterminated', (l) => putString(l, CIPHER_MODE, 'a'.repeat(32))],
      ['default', 'hash spec unterminated', (l) => putString(l, HASH_SPEC, 'a'.repeat(32))],
      ['default', 'unknown cipher', (l) => putString(l, CIPHER_NAME, 'foo')],
      ['default', 'cipher name is case sensitive', (l) => putString(l, CIPHER_NAME, 'AES')],
      ['default', 'sm4 is not in 7.2', (l) => { putString(l, CIPHER_NAME, 'sm4'); l.writeUInt32BE(32, KEY_BYTES); }],
      ['default', 'unknown hash', (l) => putString(l, HASH_SPEC, 'foo')],
      ['default', 'hash "toString"', (l) => putString(l, HASH_SPEC, 'toString')],
      ['default', 'mode without ivgen', (l) => putString(l, CIPHER_MODE, 'xts')],
      ['default', 'unknown mode', (l) => putString(l, CIPHER_MODE, 'foo-plain64')],
      ['default', 'unknown ivgen', (l) => putString(l, CIPHER_MODE, 'xts-foo')],
      ['default', 'unknown ivgen hash (checked first)', (l) => putString(l, CIPHER_MODE, 'foo-plain64:bar')],
      ['default', 'essiv without hash', (l) => putString(l, CIPHER_MODE, 'xts-essiv')],
      ['default', 'essiv sha1 with aes', (l) => putString(l, CIPHER_MODE, 'xts-essiv:sha1')],
      ['default', 'essiv sha512 with aes', (l) => putString(l, CIPHER_MODE, 'xts-essiv:sha512')],
      ['default', 'ecb with a 64-byte key', (l) => putString(l, CIPHER_MODE, 'ecb-plain')],
      ['default', 'key bytes 0', (l) => l.writeUInt32BE(0, KEY_BYTES)],
      ['default', 'master key iterations 0', (l) => l.writeUInt32BE(0, MK_ITERS)],
      ['default', 'active slot with 0 iterations', (l) => l.writeUInt32BE(0, slotAt(0) + 4)],
      ['default', 'payload overlapping the key material', (l) => l.writeUInt32BE(100, PAYLOAD)],
      ['default', 'payload overlapping the header', (l) => l.writeUInt32BE(0, PAYLOAD)],
      ['default', 'key material overlapping the header', (l) => l.writeUInt32BE(1, slotAt(0) + 40)],
      ['default', 'overlapping key slots', (l) => l.writeUInt32BE(9, slotAt(1) + 40)],
      ['essiv', 'aes-128 essiv:sha384 (no 48-byte AES key)', (l) => putString(l, CIPHER_MODE, 'cbc-essiv:sha384')],
      ['essiv', 'cast5 with essiv:sha256', (l) => putString(l, CIPHER_NAME, 'cast5')],
      ['twofish', 'twofish essiv:sha1', (l) => putString(l, CIPHER_MODE, 'cbc-essiv:sha1')],
    ];
    for (const [image, what, p] of refused) {
      const path = patched(image, p);
      const q = qemuInfo(path);
      expect(q.ok, `qemu-img should refuse: ${what}`).toBe(false);
      const err = await ourError(path);
      if (!q.ok) expect(err.message, what).toBe(q.error);
      expect(err.file).toBe(path);
    }
  });

  it('refuses a crypto header area too short for the LUKS header', async () => {
    const path = patched('default', (_l, img, ext) => img.writeBigUInt64BE(591n, ext + 8));
    const q = qemuInfo(path);
    expect(q.ok).toBe(false);
    const err = await ourError(path);
    if (!q.ok) expect(err.message).toContain(q.error);
  });

  it('refuses key material or payload outside the crypto header area (stricter than qemu-img info)', async () => {
    // qemu-img info never reads key material, so it accepts both of these.
    const short = patched('default', (_l, img, ext) => img.writeBigUInt64BE(4096n, ext + 8));
    expect(qemuInfo(short).ok).toBe(true);
    expect((await ourError(short)).message).toMatch(/^Keyslot 0 key material \(ends at byte 260096\) lies outside the 4096-byte encryption header$/);
    const far = patched('default', (l) => l.writeUInt32BE(100000, PAYLOAD));
    expect(qemuInfo(far).ok).toBe(true);
    expect((await ourError(far)).message).toMatch(/^LUKS payload offset 51200000 lies outside the \d+-byte encryption header$/);
  });

  it('keeps messages on one line', () => {
    const buf = readFileSync(images.default);
    const off = Number(buf.readBigUInt64BE(cryptoExtAt(buf)));
    const luks = Buffer.from(buf.subarray(off, off + 592));
    putString(luks, CIPHER_NAME, 'evil\nname');
    // parseLuksHeader validates the structure; the cipher name is refused when resolved.
    const header = parseLuksHeader(luks, 'x.qcow2');
    expect(() => luksAlgorithms(header, 'x.qcow2')).toThrow(
      new CorruptImageError('x.qcow2', "Algorithm 'evil\\x0aname' with key size 32 bytes not supported"),
    );
  });
});
