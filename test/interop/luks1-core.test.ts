/**
 * The LUKS1 core against real tools, both directions: standalone luks images made by
 * qemu-img 7.2 (and written by qemu-io) unlocked and decrypted by qimg; images made by
 * qimg's createLuks1 read back by qemu-io, described identically by qemu-img info, and
 * amended by either side; and cryptsetup (when installed; required under CI=true)
 * parsing and unlocking qimg's headers, and its own LUKS1 headers unlocked by qimg.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, openSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, run, tempDir, type RunResult, retryingCalibration } from '../helpers/qemu.js';
import { runAsync } from '../hostile/mutate.js';
import {
  amendLuks1,
  createLuks1,
  createPayloadCipher,
  luks1Layout,
  openLuks1,
  readLuks1Header,
  type Luks1CreateOptions,
  type Luks1Volume,
} from '../../src/crypto/luks1.js';
import { luksInfoForQemu } from '../../src/formats/qcow2/luks.js';

const enabled = qemuAvailable();
const inCI = process.env.CI === 'true';
const tmp = tempDir('qimg-luks1-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
const P = (name: string) => join(d, name);
const pw = (s: string) => Buffer.from(s, 'utf8');
const MiB = 1 << 20;
const SIZE = 4 * MiB;
/** keeps our own images fast: iter-time 10 gives QEMU's minimum of 1000 iterations */
const FAST = { calibrate: () => 100_000, iterTime: 10 };

/** cryptsetup lives in /usr/sbin, which is not on every user's PATH. */
const CRYPTSETUP = ['cryptsetup', '/usr/sbin/cryptsetup', '/sbin/cryptsetup'].find(
  (c) => (c === 'cryptsetup' || existsSync(c)) && spawnSync(c, ['--version']).status === 0,
);

interface FileIo {
  read: (offset: number, length: number) => Promise<Buffer>;
  write: (offset: number, buf: Buffer) => Promise<void>;
  truncate: (size: number) => void;
  close: () => void;
}

function fileIo(path: string): FileIo {
  if (!existsSync(path)) writeFileSync(path, '');
  const fd = openSync(path, 'r+');
  return {
    read: async (offset, length) => {
      const b = Buffer.alloc(length);
      return b.subarray(0, readSync(fd, b, 0, length, offset));
    },
    write: async (offset, buf) => void writeSync(fd, buf, 0, buf.length, offset),
    truncate: (size) => ftruncateSync(fd, size),
    close: () => closeSync(fd),
  };
}

/** Opens a standalone luks file with our code; closes it again. */
async function openFile(path: string, pass = 'PASS'): Promise<{ vol: Luks1Volume; payload: (off: number, len: number) => Promise<Buffer> }> {
  const io = fileIo(path);
  try {
    const vol = await openLuks1(io.read, pw(pass), { fileName: path });
    const data = await io.read(vol.payloadOffset, SIZE);
    return {
      vol,
      payload: async (off, len) => {
        const buf = Buffer.from(data.subarray(off, off + len));
        const c = createPayloadCipher(vol);
        c.decrypt(buf, off / 512);
        c.destroy();
        return buf;
      },
    };
  } finally {
    io.close();
  }
}

/** A standalone luks image by createLuks1 with 0xab at [0, 1M) and 0x5c at [3M, 3M+64K). */
async function ourImage(path: string, opts: Partial<Luks1CreateOptions> = {}, pass = 'PASS'): Promise<Luks1Volume> {
  const io = fileIo(path);
  try {
    const vol = await createLuks1(io.write, { passphrase: pw(pass), ...FAST, ...opts, init: async (p) => io.truncate(p + SIZE) });
    const c = createPayloadCipher(vol);
    for (const [off, len, byte] of [[0, MiB, 0xab], [3 * MiB, 65536, 0x5c]]) {
      const buf = Buffer.alloc(len, byte);
      c.encrypt(buf, off / 512);
      await io.write(vol.payloadOffset + off, buf);
    }
    c.destroy();
    return vol;
  } finally {
    io.close();
  }
}

const allBytes = (b: Buffer, v: number) => b.every((x) => x === v);
const ioArgs = (file: string, pass: string, cmds: string[]) => [
  '--object', `secret,id=s0,data=${pass}`,
  '--image-opts', `driver=luks,key-secret=s0,file.filename=${file}`,
  ...cmds.flatMap((c) => ['-c', c]),
];
const qemuIo = (file: string, pass: string, cmds: string[]) => run('qemu-io', ioArgs(file, pass, cmds), { cwd: d });
function expectIoOk(r: RunResult, what: string): void {
  expect(r.status, `${what}: ${r.stderr}${r.stdout}`).toBe(0);
  expect(r.stdout + r.stderr).not.toMatch(/Pattern verification failed|can't open|error/i);
}

/** qemu-img, repeated when only its PBKDF calibration failed. */
const qemuRetry = (args: string[]): Promise<RunResult> => retryingCalibration(() => runAsync('qemu-img', args, d));

async function qemuCreate(name: string, opts: string): Promise<void> {
  const r = await qemuRetry([
    'create', '-q', '-f', 'luks', '--object', 'secret,id=s0,data=PASS',
    '-o', `key-secret=s0,iter-time=10${opts ? `,${opts}` : ''}`, P(name), '4M',
  ]);
  if (r.status !== 0) throw new Error(`qemu-img create ${opts} failed: ${r.stderr}`);
}

/** qemu-img info's luks data for a standalone image: the qcow2 "encrypt" object without its format member. */
function expectedInfo(vol: Luks1Volume): Record<string, unknown> {
  const { format: _format, ...rest } = luksInfoForQemu(vol.header, vol.algorithms);
  return rest;
}

function qemuInfo(path: string): { 'virtual-size': number; format: string; 'format-specific': { type: string; data: unknown } } {
  const r = run('qemu-img', ['info', '--output=json', path], { cwd: d });
  if (r.status !== 0) throw new Error(`qemu-img info failed: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

describe.skipIf(!enabled)('qemu-img 7.2 luks images read by qimg', () => {
  const variants: Array<[string, string]> = [
    ['q-default.luks', ''],
    ['q-cbc-essiv.luks', 'cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1'],
    ['q-ecb.luks', 'cipher-mode=ecb'],
    ['q-ctr.luks', 'cipher-mode=ctr,ivgen-alg=plain,hash-alg=sha384'],
    ['q-xts-essiv-md5.luks', 'cipher-alg=aes-128,ivgen-alg=essiv,ivgen-hash-alg=md5,hash-alg=sha512'],
    ['q-xts192-plain64hash.luks', 'cipher-alg=aes-192,ivgen-hash-alg=sha1,hash-alg=sha224'],
  ];

  beforeAll(async () => {
    // two at a time: qemu calibrates PBKDF2 for about a second of CPU per create
    for (let i = 0; i < variants.length; i += 2) {
      await Promise.all(variants.slice(i, i + 2).map(([name, opts]) => qemuCreate(name, opts)));
    }
    for (const [name] of variants) {
      expectIoOk(qemuIo(P(name), 'PASS', ['write -q -P 0xab 0 1M', 'write -q -P 0x5c 3M 64k']), `qemu-io write ${name}`);
    }
  });

  it.each(variants)('%s (%s): unlocked, decrypted, and described as qemu-img info does', async (name) => {
    const { vol, payload } = await openFile(P(name));
    expect(allBytes(await payload(0, MiB), 0xab)).toBe(true);
    expect(allBytes(await payload(3 * MiB, 65536), 0x5c)).toBe(true);
    const info = qemuInfo(P(name));
    expect(info.format).toBe('luks');
    expect(info['format-specific'].data).toEqual(expectedInfo(vol));
    // QEMU's layout is the one createLuks1 makes
    const layout = luks1Layout(vol.header.keyBytes);
    expect(vol.header.slots.map((s) => s.keyOffsetSector * 512)).toEqual(layout.slotOffsets);
    expect(vol.payloadOffset).toBe(layout.payloadOffset);
    vol.masterKey.fill(0);
  });

  it('a wrong passphrase fails with the same message as qemu-io', async () => {
    const r = qemuIo(P('q-default.luks'), 'WRONG', ['read 0 512']);
    expect(r.stderr).toContain('Invalid password, cannot unlock any keyslot');
    await expect(openFile(P('q-default.luks'), 'WRONG')).rejects.toThrow('Invalid password, cannot unlock any keyslot');
  });
});

describe.skipIf(!enabled)('qimg luks images read and amended by qemu 7.2', () => {
  const variants: Array<[string, Partial<Luks1CreateOptions>]> = [
    ['i-default.luks', { calibrate: undefined }], // QEMU's calibration for real
    ['i-cbc-essiv.luks', { cipherAlg: 'aes-128', cipherMode: 'cbc', ivgenAlg: 'essiv', hashAlg: 'sha1' }],
    ['i-ecb.luks', { cipherMode: 'ecb' }],
    ['i-xts192-plain.luks', { cipherAlg: 'aes-192', ivgenAlg: 'plain', hashAlg: 'sha512' }],
    ['i-ctr-ripemd.luks', { cipherMode: 'ctr', hashAlg: 'ripemd160' }],
    ['i-xts128-essiv.luks', { cipherAlg: 'aes-128', ivgenAlg: 'essiv', hashAlg: 'sha1' }],
  ];
  const vols = new Map<string, Luks1Volume>();

  beforeAll(async () => {
    for (const [name, opts] of variants) vols.set(name, await ourImage(P(name), opts));
  });

  it.each(variants)('%s: qemu-io reads the patterns, qemu-img info matches, qemu-io writes we read', async (name) => {
    expectIoOk(qemuIo(P(name), 'PASS', ['read -P 0xab 0 1M', 'read -P 0x5c 3M 64k', 'read 1M 4k']), `qemu-io read ${name}`);
    const info = qemuInfo(P(name));
    expect(info.format).toBe('luks');
    expect(info['virtual-size']).toBe(SIZE);
    const vol = vols.get(name) as Luks1Volume;
    expect(info['format-specific'].data).toEqual(expectedInfo(vol));
    expectIoOk(qemuIo(P(name), 'PASS', ['write -q -P 0x33 2M 4k']), `qemu-io write ${name}`);
    const { payload } = await openFile(P(name));
    expect(allBytes(await payload(2 * MiB, 4096), 0x33)).toBe(true);
    expect(allBytes(await payload(0, MiB), 0xab)).toBe(true);
  });

  it('the real calibration gives at least QEMU minimums', () => {
    const h = (vols.get('i-default.luks') as Luks1Volume).header;
    expect(h.masterKeyIterations).toBeGreaterThanOrEqual(1000);
    expect(h.slots[0].iterations).toBeGreaterThanOrEqual(1000);
  });

  it('keys added and erased by qemu-img amend and by qimg work for both', async () => {
    const file = P('i-amend.luks');
    const vol = await ourImage(file);
    // qemu-img adds slot 1 ...
    const add = await qemuRetry([
      'amend', '--object', 'secret,id=s0,data=PASS', '--object', 'secret,id=s1,data=NEW',
      '--image-opts', `driver=luks,key-secret=s0,file.filename=${file}`, '-o', 'state=active,new-secret=s1,iter-time=10',
    ]);
    expect(add.status, add.stderr).toBe(0);
    const byNew = await openFile(file, 'NEW');
    expect(byNew.vol.keyslot).toBe(1);
    expect(byNew.vol.masterKey.equals(vol.masterKey)).toBe(true);
    // ... qimg adds slot 5 and erases the slots PASS opens
    const io = fileIo(file);
    try {
      await amendLuks1(io.read, io.write, { state: 'active', keyslot: 5, keySecret: pw('NEW'), newSecret: pw('FIVE'), ...FAST });
      await amendLuks1(io.read, io.write, { state: 'inactive', oldSecret: pw('PASS'), calibrate: FAST.calibrate });
    } finally {
      io.close();
    }
    expect(qemuIo(file, 'PASS', ['read 0 512']).stderr).toContain('Invalid password, cannot unlock any keyslot');
    expectIoOk(qemuIo(file, 'FIVE', ['read -P 0xab 0 1M']), 'qemu-io with the slot qimg added');
    expectIoOk(qemuIo(file, 'NEW', ['read -P 0x5c 3M 64k']), 'qemu-io with the slot qemu added');
    const slots = (qemuInfo(file)['format-specific'].data as { slots: Array<{ active: boolean }> }).slots;
    expect(slots.map((s) => s.active)).toEqual([false, true, false, false, false, true, false, false]);
    // and qemu-img erases the slot qimg added
    const erase = await qemuRetry([
      'amend', '--object', 'secret,id=s0,data=NEW',
      '--image-opts', `driver=luks,key-secret=s0,file.filename=${file}`, '-o', 'state=inactive,keyslot=5',
    ]);
    expect(erase.status, erase.stderr).toBe(0);
    await expect(openFile(file, 'FIVE')).rejects.toThrow('Invalid password, cannot unlock any keyslot');
    expect((await openFile(file, 'NEW')).vol.keyslot).toBe(1);
    const io2 = fileIo(file);
    const { header } = await readLuks1Header(io2.read);
    io2.close();
    expect(header.slots[5]).toMatchObject({ active: false, iterations: 0 });
    expect(header.slots[5].salt.every((b) => b === 0)).toBe(true);
  });
});

const cs = CRYPTSETUP as string;
/** cryptsetup with a passphrase in a key file. */
function cryptsetup(args: string[], pass?: string): RunResult {
  const keyArgs: string[] = [];
  if (pass !== undefined) {
    const keyFile = P(`key-${pass}`);
    writeFileSync(keyFile, pass);
    keyArgs.push(`--key-file=${keyFile}`);
  }
  return run(cs, [...args, ...keyArgs], { cwd: d });
}
/** The master key cryptsetup unlocks with pass, as hex. */
function cryptsetupMasterKey(file: string, pass: string): string {
  const r = cryptsetup(['luksDump', '--dump-master-key', '-q', file], pass);
  expect(r.status, r.stderr).toBe(0);
  const after = r.stdout.slice(r.stdout.search(/(MK|key) dump:/));
  const lines = after.replace(/^[^:]*:/, '').split('\n');
  let hex = '';
  for (const line of lines) {
    if (!/^\s*([0-9a-f]{2}\s*)+$/i.test(line)) break;
    hex += line.replace(/\s+/g, '');
  }
  return hex;
}

if (!CRYPTSETUP && inCI) {
  it('cryptsetup is installed (required under CI=true)', () => {
    throw new Error('cryptsetup is required under CI=true (install cryptsetup-bin)');
  });
}

describe.skipIf(!CRYPTSETUP)('cryptsetup', () => {
  it("parses qimg's headers and unlocks them with the passphrase", async () => {
    for (const [name, opts, mode] of [
      ['c-default.luks', {}, 'xts-plain64'],
      ['c-cbc-essiv.luks', { cipherAlg: 'aes-128', cipherMode: 'cbc', ivgenAlg: 'essiv', hashAlg: 'sha1' }, 'cbc-essiv:sha256'],
    ] as Array<[string, Partial<Luks1CreateOptions>, string]>) {
      const file = P(name);
      const vol = await ourImage(file, opts, 'pass phrase');
      const dump = cryptsetup(['luksDump', file]);
      expect(dump.status, dump.stderr).toBe(0);
      expect(dump.stdout).toMatch(/Version:\s+1\n/);
      expect(dump.stdout).toMatch(/Cipher name:\s+aes\n/);
      expect(dump.stdout).toContain(`Cipher mode:   \t${mode}\n`);
      expect(dump.stdout).toMatch(new RegExp(`Hash spec:\\s+${vol.algorithms.hashAlg}\\n`));
      expect(dump.stdout).toMatch(new RegExp(`Payload offset:\\s+${vol.payloadOffset / 512}\\n`));
      expect(dump.stdout).toMatch(new RegExp(`MK bits:\\s+${vol.header.keyBytes * 8}\\n`));
      expect(dump.stdout).toMatch(new RegExp(`UUID:\\s+${vol.header.uuid}\\n`));
      expect(dump.stdout).toMatch(/Key Slot 0: ENABLED\n\s+Iterations:\s+1000\n/);
      expect(dump.stdout).toMatch(/Key Slot 1: DISABLED/);
      expect(cryptsetup(['open', '--test-passphrase', file], 'pass phrase').status).toBe(0);
      expect(cryptsetup(['open', '--test-passphrase', file], 'wrong').status).not.toBe(0);
      expect(cryptsetupMasterKey(file, 'pass phrase')).toBe(vol.masterKey.toString('hex'));
    }
  });

  it("unlocks cryptsetup's LUKS1 headers, also with a key slot cryptsetup added", async () => {
    for (const [name, cipher, bits, hash] of [
      ['cs-xts.luks', 'aes-xts-plain64', 512, 'sha512'],
      // 24-byte keys: 96000 bytes of key material, a half sector at the end
      ['cs-cbc192.luks', 'aes-cbc-essiv:sha256', 192, 'sha1'],
    ] as const) {
      const file = P(name);
      writeFileSync(file, Buffer.alloc(4 * MiB));
      const fmt = cryptsetup(['luksFormat', '-q', '--type', 'luks1', '--pbkdf-force-iterations', '1000', '--cipher', cipher, '--key-size', String(bits), '--hash', hash, file], 'one');
      expect(fmt.status, fmt.stderr).toBe(0);
      writeFileSync(P('key-two-new'), 'two');
      const add = run(cs, ['luksAddKey', '-q', '--pbkdf-force-iterations', '1000', `--key-file=${P('key-one')}`, file, P('key-two-new')], { cwd: d });
      expect(add.status, add.stderr).toBe(0);
      const mk = cryptsetupMasterKey(file, 'one');
      const one = await openFile(file, 'one');
      const two = await openFile(file, 'two');
      expect(one.vol.keyslot).toBe(0);
      expect(two.vol.keyslot).toBe(1);
      expect(one.vol.masterKey.toString('hex')).toBe(mk);
      expect(two.vol.masterKey.toString('hex')).toBe(mk);
      // qimg erases slot 0: cryptsetup sees it disabled and the old passphrase gone
      const io = fileIo(file);
      try {
        await amendLuks1(io.read, io.write, { state: 'inactive', oldSecret: pw('one') });
      } finally {
        io.close();
      }
      expect(cryptsetup(['luksDump', file]).stdout).toMatch(/Key Slot 0: DISABLED\nKey Slot 1: ENABLED/);
      expect(cryptsetup(['open', '--test-passphrase', file], 'one').status).not.toBe(0);
      expect(cryptsetup(['open', '--test-passphrase', file], 'two').status).toBe(0);
    }
  });
});
