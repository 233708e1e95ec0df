/**
 * Encrypted qcow2 (LUKS and legacy AES) against qemu-img/qemu-io 7.2, both ways:
 * images QEMU encrypts read identically in qimg (convert, compare, map), images qimg
 * creates and writes read identically in QEMU and pass its check; create's options,
 * Formatting line and refusals; wrong and missing passphrases; backing chains mixing
 * encrypted and plain layers; unaligned writes through the library API.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, retryingCalibrationSync, tempDir } from '../helpers/qemu.js';
import { mapRanges } from '../hostile/mutate.js';
import { openImage } from '../../src/core/open.js';
import { SecretStore } from '../../src/core/secrets.js';
import { registerFormats } from '../../src/formats/index.js';

registerFormats();
const enabled = qemuAvailable();
const tmp = tempDir('qimg-qcow2-enc-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
const KiB = 1024;
const MiB = 1024 * KiB;

const PASS = 'c0rrect-h0rse';
const SECRET = ['--object', `secret,id=sec0,data=${PASS}`];
const optsOf = (file: string, extra = '') => `driver=qcow2,file.filename=${file},encrypt.key-secret=sec0${extra}`;
/** qemu-img/qimg arguments naming an encrypted image */
const enc = (file: string, extra = '') => [...SECRET, '--image-opts', optsOf(file, extra)];
const both = (args: string[]) => ({ q: qemuImg(args, d), m: qimg(args, { cwd: d }) });
const msg = (s: string) => s.replace(/^(qemu-img|qimg): /gm, '');
/**
 * The reason of a failed open: qemu-img says "Could not open 'FILE': why", qimg
 * "FILE: why" (its one-line `qimg: FILE: what is wrong`).
 */
const reason = (s: string) => msg(s).replace(/^Could not open '[^']*': /gm, '').replace(/^[^\s:]+\.qcow2?: /gm, '');

const retrying = retryingCalibrationSync;

function qemuCreate(file: string, size: string, encOpts: string, more: string[] = []): void {
  ok(retrying(() => qemuImg(['create', '-q', '-f', 'qcow2', ...SECRET, '-o', `${encOpts},encrypt.key-secret=sec0`, ...more, file, size], d)));
}

function qemuWrite(file: string, cmds: string[], extra = ''): void {
  ok(qemuIo([...SECRET, '--image-opts', optsOf(file, extra), ...cmds.flatMap((c) => ['-c', c])], d));
}

/** A pattern layout with unaligned and cluster-crossing writes and zero writes. */
const WRITES = ['write -P 0x11 0 64k', 'write -P 0x22 100000 70000', 'write -P 0x33 1M 512', 'write -z 2M 128k', 'write -P 0x44 3000000 1000', 'write -P 0x55 4194304 1M'];

function rawOf(file: string, tool: 'q' | 'm', extra = ''): Buffer {
  const out = join(d, `${file}.${tool}.raw`);
  const args = ['convert', ...enc(file, extra), '-O', 'raw', out];
  ok(tool === 'q' ? qemuImg(args, d) : qimg(args, { cwd: d }), `${tool} convert ${file}`);
  return readFileSync(out);
}

describe.runIf(enabled)('qcow2 LUKS images made by QEMU', () => {
  const variants: Array<[string, string]> = [
    ['default', 'encrypt.format=luks,encrypt.iter-time=10'],
    ['aes-128-cbc-essiv', 'encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1'],
    ['aes-256-xts-plain', 'encrypt.format=luks,encrypt.iter-time=10,encrypt.ivgen-alg=plain'],
  ];
  for (const [name, o] of variants) {
    it(`${name}: reads, maps and compares as qemu-img`, () => {
      const f = `q-${name}.qcow2`;
      qemuCreate(f, '8M', o);
      qemuWrite(f, WRITES);
      expect(rawOf(f, 'm').equals(rawOf(f, 'q'))).toBe(true);
      const mj = both(['map', '--output=json', ...enc(f)]);
      expect(mapRanges(mj.m.stdout)).toEqual(mapRanges(mj.q.stdout));
      const cmp = both(['compare', ...SECRET, '--image-opts', optsOf(f), `driver=raw,file.filename=${f}.q.raw`]);
      expect(cmp.m.stdout).toBe(cmp.q.stdout);
      expect(cmp.m.status).toBe(0);
      // the human map refuses encrypted data, as qemu-img's
      const { q, m } = both(['map', ...enc(f)]);
      expect(m.status).toBe(q.status);
      expect(msg(m.stderr)).toBe(msg(q.stderr));
      // info needs no key and shows the encrypt block
      const qi = JSON.parse(ok(qemuImg(['info', '--output=json', f], d)).stdout);
      const mi = JSON.parse(ok(qimg(['info', '--output=json', f], { cwd: d })).stdout);
      delete qi['actual-size'];
      delete mi['actual-size'];
      expect(mi).toEqual(qi);
    });
  }

  it('a wrong passphrase, a missing secret, a missing key-secret: qemu-img messages, nothing written', () => {
    const f = 'q-default.qcow2';
    const before = readFileSync(join(d, f));
    const cases = [
      ['convert', '--object', 'secret,id=sec0,data=wrong', '--image-opts', optsOf(f), '-O', 'raw', 'never.raw'],
      ['convert', '-O', 'raw', f, 'never.raw'],
      ['convert', '--image-opts', optsOf(f), '-O', 'raw', 'never.raw'],
      ['check', f],
      ['map', f],
      ['compare', f, f],
    ];
    for (const args of cases) {
      const { q, m } = both(args);
      expect(m.status, args.join(' ')).toBe(q.status);
      expect(reason(m.stderr), args.join(' ')).toBe(reason(q.stderr));
      expect(m.stderr).not.toContain(PASS);
      expect(existsSync(join(d, 'never.raw'))).toBe(false);
    }
    expect(readFileSync(join(d, f)).equals(before)).toBe(true);
  });
});

describe.runIf(enabled)('encrypt.format in --image-opts', () => {
  it('must match the header, even for info (qemu-img messages)', () => {
    ok(qemuImg(['create', '-q', '-f', 'qcow2', 'plain.qcow2', '1M'], d));
    qemuCreate('fmt.qcow2', '1M', 'encrypt.format=luks,encrypt.iter-time=10');
    for (const opts of ['driver=qcow2,file.filename=plain.qcow2,encrypt.format=luks', 'driver=qcow2,file.filename=fmt.qcow2,encrypt.format=aes']) {
      const { q, m } = both(['info', '--image-opts', opts]);
      expect(q.status).toBe(1);
      expect(m.status).toBe(1);
      expect(reason(m.stderr)).toBe(reason(q.stderr));
    }
  });
});

describe.runIf(enabled)('qcow2 LUKS images made by qimg', () => {
  it('create: the Formatting line and info as qemu-img, qemu-img check passes, QEMU writes and reads it', () => {
    const o = 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256';
    const q = retrying(() => qemuImg(['create', '-f', 'qcow2', ...SECRET, '-o', o, 'c-q.qcow2', '8M'], d));
    const m = qimg(['create', '-f', 'qcow2', ...SECRET, '-o', o, 'c-m.qcow2', '8M'], { cwd: d });
    ok(q);
    ok(m);
    expect(m.stdout.replace('c-m', 'c-q')).toBe(q.stdout);
    ok(qemuImg(['check', ...enc('c-m.qcow2')], d));
    const strip = (j: Record<string, unknown>) => {
      const data = (j['format-specific'] as { data: { encrypt: Record<string, unknown> } }).data;
      const e = data.encrypt as { uuid?: string; 'master-key-iters'?: number; slots: Array<{ iters?: number }> };
      delete e.uuid;
      delete e['master-key-iters'];
      for (const s of e.slots) delete s.iters;
      delete j['actual-size'];
      delete j.filename;
      return j;
    };
    const qi = strip(JSON.parse(ok(qemuImg(['info', '--output=json', 'c-q.qcow2'], d)).stdout));
    const mi = strip(JSON.parse(ok(qimg(['info', '--output=json', 'c-m.qcow2'], { cwd: d })).stdout));
    expect(mi).toEqual(qi);
    qemuWrite('c-m.qcow2', WRITES);
    expect(rawOf('c-m.qcow2', 'm').equals(rawOf('c-m.qcow2', 'q'))).toBe(true);
  });

  it('convert to an encrypted qcow2: QEMU reads what qimg wrote; qemu-img check and compare pass', () => {
    const src = join(d, 'pattern.raw');
    const buf = Buffer.alloc(6 * MiB + 1536);
    for (let i = 0; i < buf.length; i += 4096) buf.fill((i / 4096) % 251, i, Math.min(buf.length, i + 3000));
    buf.fill(0, 2 * MiB, 3 * MiB);
    writeFileSync(src, buf);
    const o = 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10';
    ok(qimg(['convert', ...SECRET, '-O', 'qcow2', '-o', o, 'pattern.raw', 'conv.qcow2'], { cwd: d }));
    ok(qemuImg(['check', ...enc('conv.qcow2')], d));
    ok(qemuImg(['compare', ...SECRET, '--image-opts', 'driver=raw,file.filename=pattern.raw', optsOf('conv.qcow2')], d));
    expect(rawOf('conv.qcow2', 'q').equals(buf)).toBe(true);
    const c = qimg(['convert', '-c', ...SECRET, '-O', 'qcow2', '-o', o, 'pattern.raw', 'never.qcow2'], { cwd: d });
    const cq = qemuImg(['convert', '-c', ...SECRET, '-O', 'qcow2', '-o', o, 'pattern.raw', 'never.qcow2'], d);
    expect(c.status).toBe(cq.status);
    expect(msg(c.stderr)).toBe(msg(cq.stderr));
    expect(existsSync(join(d, 'never.qcow2'))).toBe(false);
  });

  it('unaligned writes through the library (sector read-modify-write, copy-on-write) read back in qemu-io', async () => {
    const o = 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10';
    ok(qimg(['create', '-q', '-f', 'qcow2', ...SECRET, '-o', o, 'lib.qcow2', '4M'], { cwd: d }));
    const secrets = new SecretStore();
    secrets.add('sec0', Buffer.from(PASS));
    const img = await openImage(join(d, 'lib.qcow2'), { writable: true, secrets, imageOptions: { 'encrypt.key-secret': 'sec0' } });
    try {
      await img.write(100, Buffer.alloc(300, 0x61)); // inside one sector
      await img.write(65536 - 10, Buffer.alloc(20, 0x62)); // across a cluster boundary
      await img.write(200000, Buffer.alloc(100000, 0x63)); // partial clusters both ends
      await img.writeZeroes(1 * MiB + 7, 1000);
      await img.write(3 * MiB, Buffer.alloc(65536, 0x64));
      await img.writeZeroes(3 * MiB + 1007, 1000); // zeros written over data, unaligned
    } finally {
      await img.close();
    }
    const checks = ['read -P 0 0 100', 'read -P 0x61 100 300', 'read -P 0 400 65126', 'read -P 0x62 65526 20', 'read -P 0 65546 134454', 'read -P 0x63 200000 100000', 'read -P 0 300000 2000000', 'read -P 0x64 3145728 1007', 'read -P 0 3146735 1000', 'read -P 0x64 3147735 63529'];
    for (const c of checks) ok(qemuIo([...SECRET, '--image-opts', optsOf('lib.qcow2'), '-c', c], d), c);
    ok(qemuImg(['check', ...enc('lib.qcow2')], d));
    secrets.destroy();
  });
});

describe.runIf(enabled)('amend: LUKS key slots in qcow2', () => {
  const SECRETS = [...SECRET, '--object', 'secret,id=sec1,data=n3w-pass'];
  const withNew = (file: string) => ['--object', 'secret,id=sec1,data=n3w-pass', '--image-opts', `driver=qcow2,file.filename=${file},encrypt.key-secret=sec1`];
  it('adds a slot, erases the old one; QEMU unlocks with the new passphrase only', () => {
    qemuCreate('ks.qcow2', '2M', 'encrypt.format=luks,encrypt.iter-time=10');
    qemuWrite('ks.qcow2', ['write -P 0x3c 0 1M']);
    ok(qimg(['amend', ...SECRETS, '--image-opts', '-o', 'encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=3,encrypt.iter-time=10', optsOf('ks.qcow2')], { cwd: d }));
    ok(qemuIo([...withNew('ks.qcow2'), '-c', 'read -P 0x3c 0 1M'], d));
    ok(qimg(['amend', ...withNew('ks.qcow2'), '-o', 'encrypt.state=inactive,encrypt.keyslot=0'], { cwd: d }));
    const old = qemuIo([...enc('ks.qcow2'), '-c', 'read -P 0x3c 0 1M'], d);
    expect(old.stderr + old.stdout).toMatch(/Invalid password, cannot unlock any keyslot/);
    ok(qemuIo([...withNew('ks.qcow2'), '-c', 'read -P 0x3c 0 1M'], d));
    const info = JSON.parse(ok(qemuImg(['info', '--output=json', 'ks.qcow2'], d)).stdout);
    const slots = info['format-specific'].data.encrypt.slots as Array<{ active: boolean }>;
    expect(slots.map((x) => x.active)).toEqual([false, false, false, true, false, false, false, false]);
    ok(qemuImg(['check', ...withNew('ks.qcow2')], d));
    // and back: qemu-img adds a slot to what qimg left, qimg reads with it
    ok(retrying(() => qemuImg(['amend', ...SECRETS, '--image-opts', '-o', 'encrypt.state=active,encrypt.new-secret=sec0,encrypt.iter-time=10', `driver=qcow2,file.filename=ks.qcow2,encrypt.key-secret=sec1`], d)));
    expect(rawOf('ks.qcow2', 'm').subarray(0, MiB).every((b) => b === 0x3c)).toBe(true);
  });

  it('refusals as qemu-img', () => {
    ok(qemuImg(['create', '-q', '-f', 'qcow2', 'am-plain.qcow2', '1M'], d));
    qemuCreate('am-aes.qcow2', '1M', 'encrypt.format=aes');
    qemuCreate('am-luks.qcow2', '1M', 'encrypt.format=luks,encrypt.iter-time=10');
    const cases: string[][] = [
      ['amend', ...SECRETS, '-o', 'encrypt.state=active,encrypt.new-secret=sec1', 'am-plain.qcow2'],
      ['amend', ...SECRETS, '--image-opts', '-o', 'encrypt.state=active,encrypt.new-secret=sec1', optsOf('am-aes.qcow2')],
      ['amend', ...SECRETS, '--image-opts', '-o', 'encrypt.new-secret=sec1', optsOf('am-luks.qcow2')],
      ['amend', ...SECRETS, '--image-opts', '-o', 'encrypt.state=foo', optsOf('am-luks.qcow2')],
      ['amend', ...SECRETS, '--image-opts', '-o', 'encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=9', optsOf('am-luks.qcow2')],
      ['amend', ...SECRETS, '--image-opts', '-o', 'encrypt.state=inactive,encrypt.old-secret=sec0', optsOf('am-luks.qcow2')],
      ['amend', ...SECRETS, '--image-opts', '-o', 'encrypt.state=inactive,encrypt.keyslot=0', optsOf('am-luks.qcow2')],
      ['amend', ...SECRETS, '--image-opts', '-o', 'encrypt.state=active,encrypt.new-secret=nope', optsOf('am-luks.qcow2')],
      ['amend', ...SECRETS, '-o', 'encrypt.state=active,encrypt.new-secret=sec1', 'am-luks.qcow2'],
    ];
    const before = readFileSync(join(d, 'am-luks.qcow2'));
    for (const args of cases) {
      const { q, m } = both(args);
      expect(m.status, args.join(' ')).toBe(q.status);
      expect(reason(m.stderr), args.join(' ')).toBe(reason(q.stderr));
    }
    expect(readFileSync(join(d, 'am-luks.qcow2')).equals(before)).toBe(true);
  });

  it('amend -o help lists the amend options as qemu-img', () => {
    for (const args of [['amend', '-f', 'qcow2', '-o', 'help', 'nonexistent.qcow2'], ['amend', '-o', 'help', 'am-plain.qcow2'], ['amend', '-f', 'luks', '-o', 'help', 'x']]) {
      const { q, m } = both(args);
      expect(m.stdout, args.join(' ')).toBe(q.stdout);
      expect(m.status).toBe(q.status);
    }
  });
});

describe.runIf(enabled)('chains mixing encrypted and plain layers', () => {
  it('a plain overlay over an encrypted base, and an encrypted overlay over a plain base', () => {
    qemuCreate('eb.qcow2', '4M', 'encrypt.format=luks,encrypt.iter-time=10');
    qemuWrite('eb.qcow2', ['write -P 0x71 0 1M', 'write -P 0x72 2M 1M']);
    ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'eb.qcow2', '-F', 'qcow2', '-u', 'po.qcow2', '4M'], d));
    const opts = 'driver=qcow2,file.filename=po.qcow2,backing.encrypt.key-secret=sec0';
    ok(qemuIo([...SECRET, '--image-opts', opts, '-c', 'write -P 0x73 512k 1M'], d));
    const q = ok(qemuImg(['convert', ...SECRET, '--image-opts', opts, '-O', 'raw', 'po.q.raw'], d));
    const m = ok(qimg(['convert', ...SECRET, '--image-opts', opts, '-O', 'raw', 'po.m.raw'], { cwd: d }));
    expect(q.status).toBe(m.status);
    expect(readFileSync(join(d, 'po.m.raw')).equals(readFileSync(join(d, 'po.q.raw')))).toBe(true);
    // without the backing file's key, qemu-img and qimg both refuse
    const nb = both(['convert', '-O', 'raw', 'po.qcow2', 'never.raw']);
    expect(nb.m.status).toBe(nb.q.status);
    expect(reason(nb.m.stderr)).toBe(reason(nb.q.stderr));

    ok(qemuImg(['create', '-q', '-f', 'qcow2', 'pb.qcow2', '4M'], d));
    ok(qemuIo(['-f', 'qcow2', 'pb.qcow2', '-c', 'write -P 0x81 0 3M'], d));
    qemuCreate('eo.qcow2', '4M', 'encrypt.format=luks,encrypt.iter-time=10', ['-b', 'pb.qcow2', '-F', 'qcow2']);
    qemuWrite('eo.qcow2', ['write -P 0x82 1M 100k']);
    expect(rawOf('eo.qcow2', 'm').equals(rawOf('eo.qcow2', 'q'))).toBe(true);
  });
});

describe.runIf(enabled)('legacy AES (crypt_method 1)', () => {
  it('images QEMU made read identically; images qimg made read identically in QEMU', () => {
    qemuCreate('aes-q.qcow2', '4M', 'encrypt.format=aes');
    qemuWrite('aes-q.qcow2', WRITES.filter((w) => !w.includes('4194304')));
    expect(rawOf('aes-q.qcow2', 'm').equals(rawOf('aes-q.qcow2', 'q'))).toBe(true);
    const q = qemuImg(['create', '-f', 'qcow2', ...SECRET, '-o', 'encryption=on,encrypt.key-secret=sec0', 'aes-c-q.qcow2', '4M'], d);
    const m = qimg(['create', '-f', 'qcow2', ...SECRET, '-o', 'encryption=on,encrypt.key-secret=sec0', 'aes-m.qcow2', '4M'], { cwd: d });
    expect(m.stdout.replace('aes-m', 'aes-c-q')).toBe(q.stdout);
    ok(m);
    qemuWrite('aes-m.qcow2', ['write -P 0x99 0 100k']);
    expect(rawOf('aes-m.qcow2', 'm').equals(rawOf('aes-m.qcow2', 'q'))).toBe(true);
    const qi = JSON.parse(ok(qemuImg(['info', '--output=json', 'aes-c-q.qcow2'], d)).stdout);
    const mi = JSON.parse(ok(qimg(['info', '--output=json', 'aes-m.qcow2'], { cwd: d })).stdout);
    for (const j of [qi, mi]) {
      delete j['actual-size'];
      delete j.filename;
    }
    expect(mi).toEqual(qi);
  });
});

describe.runIf(enabled)('legacy AES in qcow (v1)', () => {
  it('reads and converts out as qemu-img; writes are refused with one line', () => {
    ok(retrying(() => qemuImg(['create', '-q', '-f', 'qcow', ...SECRET, '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', 'v1.qcow', '4M'], d)));
    const io = (c: string) => ok(qemuIo([...SECRET, '--image-opts', 'driver=qcow,file.filename=v1.qcow,encrypt.key-secret=sec0', '-c', c], d));
    for (const c of ['write -P 0x21 0 64k', 'write -P 0x22 100000 5000', 'write -P 0x23 3M 512']) io(c);
    const opts = 'driver=qcow,file.filename=v1.qcow,encrypt.key-secret=sec0';
    ok(qemuImg(['convert', ...SECRET, '--image-opts', opts, '-O', 'raw', 'v1.q.raw'], d));
    ok(qimg(['convert', ...SECRET, '--image-opts', opts, '-O', 'raw', 'v1.m.raw'], { cwd: d }));
    expect(readFileSync(join(d, 'v1.m.raw')).equals(readFileSync(join(d, 'v1.q.raw')))).toBe(true);
    const mj = both(['map', '--output=json', ...SECRET, '--image-opts', opts]);
    expect(mapRanges(mj.m.stdout)).toEqual(mapRanges(mj.q.stdout));
    const noKey = both(['convert', '-O', 'raw', 'v1.qcow', 'never.raw']);
    expect(noKey.m.status).toBe(noKey.q.status);
    expect(reason(noKey.m.stderr)).toBe(reason(noKey.q.stderr));
    const w = qimg(['resize', ...SECRET, '--image-opts', opts, '8M'], { cwd: d });
    expect(w.status).toBe(1);
    expect(w.stderr.trim().split('\n')).toHaveLength(1);
  });
});

describe.runIf(enabled)('create refusals as qemu-img 7.2', () => {
  const cases: Array<[string, string]> = [
    ['format=foo', 'encrypt.format=foo,encrypt.key-secret=sec0'],
    ['no format', 'encrypt.key-secret=sec0'],
    ['no key-secret', 'encrypt.format=luks'],
    ['unknown secret', 'encrypt.format=luks,encrypt.key-secret=nope'],
    ['aes with a luks option', 'encrypt.format=aes,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-256'],
    ['both aliases', 'encryption=on,encrypt.format=luks,encrypt.key-secret=sec0'],
  ];
  for (const [name, o] of cases) {
    it(name, () => {
      const q = qemuImg(['create', '-f', 'qcow2', ...SECRET, '-o', o, 'refused.qcow2', '1M'], d);
      const m = qimg(['create', '-f', 'qcow2', ...SECRET, '-o', o, 'refused.qcow2', '1M'], { cwd: d });
      expect(m.stdout).toBe(q.stdout);
      expect(m.status).toBe(q.status);
      expect(msg(m.stderr)).toBe(msg(q.stderr));
      expect(existsSync(join(d, 'refused.qcow2'))).toBe(false);
    });
  }
  it('serpent (not in Node\'s OpenSSL): one clear line, no file', () => {
    const m = qimg(['create', '-f', 'qcow2', ...SECRET, '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=serpent-256', 'refused.qcow2', '1M'], { cwd: d });
    expect(m.status).toBe(1);
    expect(m.stderr).toMatch(/^qimg: refused\.qcow2: Algorithm 'serpent-256' not supported\n$/);
    expect(existsSync(join(d, 'refused.qcow2'))).toBe(false);
  });
});
