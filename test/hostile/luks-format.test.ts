/**
 * Hostile standalone luks images: each case patches a copy of a small image qimg made
 * and opens it without a key (`qimg info`, as qemu-img info's NO_IO open) and with one
 * (the library, and the CLI with --object once it has the flag). Every outcome is
 * success or one clear line (`qimg: FILE: ...`, exit 1, no stack trace), quickly (the
 * PBKDF2 work a header asks for is bounded), with the input unchanged and no key
 * material in any message; qemu-img info, where run, agrees on success or failure.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qimg, run, tempDir } from '../helpers/qemu.js';
import { expectCleanFailure, expectSuccess, fingerprint, patch, readAt, runQimg, setU16, setU32 } from './mutate.js';
import { openImage } from '../../src/index.js';
import { QimgError } from '../../src/core/errors.js';
import { parseOptions } from '../../src/core/options.js';
import { SecretStore } from '../../src/core/secrets.js';
import { createLuksImage } from '../../src/formats/luks/create.js';
import { luksCreateOptions } from '../../src/formats/luks/options.js';

const withQemu = qemuAvailable();
const tmp = tempDir('qimg-hostile-luks-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
const P = (name: string) => join(d, name);
const PASS = 'hostile pass phrase';
const secrets = new SecretStore();
secrets.add('k', Buffer.from(PASS));
const cliFlags = /--object/.test(qimg(['info', '--help']).stdout);

/** LUKS1 phdr fields (big endian) of the image below: aes-256 xts, 64-byte keys. */
const F = { magic: 0, version: 6, cipherName: 8, cipherMode: 40, hashSpec: 72, payloadOffset: 104, keyBytes: 108, mkDigest: 112, mkIterations: 164 } as const;
const slot = (i: number) => ({ state: 208 + i * 48, iterations: 212 + i * 48, keyOffset: 248 + i * 48, stripes: 252 + i * 48 });
const PAYLOAD = 2068480;
const KEY_MATERIAL = 4096;

function setString(file: string, at: number, s: string, len = 32): void {
  const b = Buffer.alloc(len);
  Buffer.from(s, 'latin1').copy(b);
  patch(file, at, b);
}

beforeAll(async () => {
  const o = parseOptions(['key-secret=k,iter-time=10'], luksCreateOptions);
  await createLuksImage(P('base.luks'), 1 << 20, o.values, { secrets }, { calibrate: () => 100_000 });
  const img = await openImage(P('base.luks'), { format: 'luks', writable: true, secrets, imageOptions: { 'key-secret': 'k' } });
  await img.write(0, Buffer.alloc(65536, 0x61));
  await img.close();
});

interface Case {
  name: string;
  mutate: (file: string) => void;
  /** qimg info (no key): 'ok' or the message */
  info: 'ok' | string | RegExp;
  /** the library's open with the key: 'ok' or the message */
  open: 'ok' | string | RegExp;
  /** -f luks for info (a probe that fails gives raw) */
  format?: boolean;
  /** qemu-img info's outcome differs (the reason) */
  differs?: string;
}

const cases: Case[] = [
  { name: 'header cut at 300 bytes', mutate: (f) => truncateSync(f, 300), info: 'LUKS header is truncated (the file has 300 of its 592 bytes)', open: /LUKS header is truncated/ },
  { name: 'magic changed: probed as raw', mutate: (f) => setU16(f, 0, 0x4c56), info: 'ok', open: 'ok' },
  { name: 'magic changed, -f luks', format: true, mutate: (f) => setU16(f, 0, 0x4c56), info: 'Volume is not in LUKS format', open: 'Volume is not in LUKS format' },
  { name: 'version 2, -f luks', format: true, mutate: (f) => setU16(f, F.version, 2), info: 'LUKS version 2 is not supported', open: 'LUKS version 2 is not supported' },
  { name: 'payload offset beyond the file', mutate: (f) => setU32(f, F.payloadOffset, 1 << 20), info: `LUKS payload offset ${2 ** 29} lies beyond the end of the file (${PAYLOAD + (1 << 20)} bytes)`, open: /lies beyond the end of the file/ },
  { name: 'file cut inside the key material', mutate: (f) => truncateSync(f, 100_000), info: `LUKS payload offset ${PAYLOAD} lies beyond the end of the file (100000 bytes)`, open: /lies beyond the end of the file/ },
  { name: 'payload offset inside the header', mutate: (f) => setU32(f, F.payloadOffset, 4), info: 'LUKS payload is overlapping with the header', open: 'LUKS payload is overlapping with the header' },
  { name: 'key material past the payload', mutate: (f) => setU32(f, slot(7).keyOffset, PAYLOAD / 512 - 8), info: 'Keyslot 7 is overlapping with the encrypted payload', open: 'Keyslot 7 is overlapping with the encrypted payload' },
  { name: 'key material in the header', mutate: (f) => setU32(f, slot(0).keyOffset, 1), info: 'Keyslot 0 is overlapping with the LUKS header', open: 'Keyslot 0 is overlapping with the LUKS header' },
  { name: 'two slots share material', mutate: (f) => setU32(f, slot(3).keyOffset, readAt(f, slot(2).keyOffset, 4).readUInt32BE(0)), info: 'Keyslots 2 and 3 are overlapping in the header', open: 'Keyslots 2 and 3 are overlapping in the header' },
  { name: 'stripes 2^32-1', mutate: (f) => setU32(f, slot(0).stripes, 0xffffffff), info: 'Keyslot 0 is corrupted (stripes 4294967295 != 4000)', open: 'Keyslot 0 is corrupted (stripes 4294967295 != 4000)' },
  { name: 'key bytes 2^32-1', mutate: (f) => setU32(f, F.keyBytes, 0xffffffff), info: 'Keyslot 0 is overlapping with the encrypted payload', open: 'Keyslot 0 is overlapping with the encrypted payload' },
  { name: 'key bytes 20 (no aes key of 10 bytes)', mutate: (f) => setU32(f, F.keyBytes, 20), info: "Algorithm 'aes' with key size 10 bytes not supported", open: "Algorithm 'aes' with key size 10 bytes not supported" },
  { name: 'slot state garbage', mutate: (f) => setU32(f, slot(4).state, 0x12345678), info: 'Keyslot 4 state (active/disable) is corrupted', open: 'Keyslot 4 state (active/disable) is corrupted' },
  { name: 'master key iterations 0', mutate: (f) => setU32(f, F.mkIterations, 0), info: 'LUKS key iteration count is zero', open: 'LUKS key iteration count is zero' },
  { name: 'active slot with 0 iterations', mutate: (f) => setU32(f, slot(0).iterations, 0), info: 'Keyslot 0 iteration count is zero', open: 'Keyslot 0 iteration count is zero' },
  // bounded: QEMU would run PBKDF2 for CPU-hours
  { name: 'slot iterations 2^32-1', mutate: (f) => setU32(f, slot(0).iterations, 0xffffffff), info: 'ok', open: 'Keyslot 0 needs 4294967295 PBKDF2 iterations, more than the limit of 100000000' },
  { name: 'master key iterations 2^32-1', mutate: (f) => setU32(f, F.mkIterations, 0xffffffff), info: 'ok', open: 'Keyslot 0 needs 4294967295 PBKDF2 iterations, more than the limit of 100000000' },
  { name: 'damaged key material', mutate: (f) => patch(f, KEY_MATERIAL + 1000, Buffer.alloc(64, 0x5a)), info: 'ok', open: 'Invalid password, cannot unlock any keyslot' },
  { name: 'damaged master key digest', mutate: (f) => patch(f, F.mkDigest, Buffer.alloc(20, 0xff)), info: 'ok', open: 'Invalid password, cannot unlock any keyslot' },
  { name: 'unknown cipher', mutate: (f) => setString(f, F.cipherName, 'blowfish'), info: "Algorithm 'blowfish' with key size 32 bytes not supported", open: "Algorithm 'blowfish' with key size 32 bytes not supported" },
  { name: 'control characters in the cipher name', mutate: (f) => setString(f, F.cipherName, 'a\x01\n\x1b'), info: "Algorithm 'a\\x01\\x0a\\x1b' with key size 32 bytes not supported", open: /Algorithm 'a\\x01\\x0a\\x1b'/ },
  { name: 'unknown cipher mode', mutate: (f) => setString(f, F.cipherMode, 'foo-plain64'), info: "Cipher mode 'foo' not supported", open: "Cipher mode 'foo' not supported" },
  { name: 'unknown IV generator', mutate: (f) => setString(f, F.cipherMode, 'xts-bogus'), info: "IV generator 'bogus' not supported", open: "IV generator 'bogus' not supported" },
  { name: 'cipher mode without IV generator', mutate: (f) => setString(f, F.cipherMode, 'xts'), info: "Unexpected cipher mode string format 'xts'", open: "Unexpected cipher mode string format 'xts'" },
  { name: 'unknown hash', mutate: (f) => setString(f, F.hashSpec, 'whirlpool'), info: "Hash algorithm 'whirlpool' not supported", open: "Hash algorithm 'whirlpool' not supported" },
  { name: 'serpent: described, not readable', mutate: (f) => setString(f, F.cipherName, 'serpent'), info: 'ok', open: /^Cipher algorithm 'serpent-256' is not available/ },
  { name: 'unterminated hash spec', mutate: (f) => setString(f, F.hashSpec, 'x'.repeat(32)), info: 'LUKS header hash spec is not NUL terminated', open: 'LUKS header hash spec is not NUL terminated' },
];

async function openWithKey(file: string, format?: string): Promise<string> {
  try {
    const img = await openImage(file, { format, secrets, imageOptions: { 'key-secret': 'k' } });
    const buf = Buffer.alloc(512);
    await img.read(0, buf);
    await img.close();
    return 'ok';
  } catch (err) {
    expect(err, String(err)).toBeInstanceOf(QimgError);
    return (err as Error).message;
  }
}

describe('hostile luks headers', () => {
  it.each(cases.map((c) => [c.name, c] as const))('%s', async (_name, c) => {
    const name = `${c.name.replace(/[^a-z0-9]+/gi, '-')}.luks`;
    const file = P(name);
    copyFileSync(P('base.luks'), file);
    c.mutate(file);
    const before = fingerprint(file);
    const fmt = c.format ? ['-f', 'luks'] : [];

    const info = await runQimg(['info', ...fmt, name], d);
    if (c.info === 'ok') expectSuccess(info, `info ${name}`);
    else expectCleanFailure(info, c.info, `info ${name}`);

    const started = Date.now();
    const opened = await openWithKey(file, c.format ? 'luks' : undefined);
    expect(Date.now() - started, 'bounded work').toBeLessThan(10_000);
    if (c.open === 'ok') expect(opened).toBe('ok');
    else if (typeof c.open === 'string') expect(opened).toBe(c.open);
    else expect(opened).toMatch(c.open);
    expect(opened).not.toContain('\n');
    expect(opened).not.toContain(PASS);

    // (--image-opts says driver=luks: not for the image that probes as raw)
    if (cliFlags && !/probed as raw/.test(c.name)) {
      const r = await runQimg(['convert', '--object', `secret,id=k,data=${PASS}`, '--image-opts', `driver=luks,key-secret=k,file.filename=${name}`, '-O', 'raw', 'out.raw'], d);
      if (opened === 'ok') expectSuccess(r, `convert ${name}`);
      else expectCleanFailure(r, opened, `convert ${name}`);
      expect(r.stderr).not.toContain(PASS);
    }
    expect(fingerprint(file), 'the input changed').toEqual(before);

    if (withQemu) {
      const q = run('qemu-img', ['info', ...fmt, name], { cwd: d, timeout: 20_000 });
      const ctx = `qemu-img info: ${q.status} ${q.stderr}`;
      expect(q.status === 0, ctx).toBe(c.differs ? c.info !== 'ok' : c.info === 'ok');
      if (q.status === 0 && c.info === 'ok') {
        expect(info.stdout, 'qimg info vs qemu-img info').toBe(q.stdout);
      }
    }
  });

  it('no key: metadata opens work, data opens ask for key-secret; an unknown id is named', async () => {
    expectSuccess(await runQimg(['info', 'base.luks'], d));
    const r = await runQimg(['map', 'base.luks'], d);
    expectCleanFailure(r, "Parameter 'key-secret' is required for cipher");
    await expect(openImage(P('base.luks'), { secrets, imageOptions: { 'key-secret': 'nope' } })).rejects.toThrow("No secret with id 'nope'");
  });
});
