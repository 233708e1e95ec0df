/**
 * Images through pipes: `convert ... -` writes raw, qcow2 and stream-optimized VMDK to
 * standard output in one forward pass (piped to a file and through cat), and
 * `convert -f raw|vmdk - OUT` reads standard input forward only. qemu-img is the
 * oracle: its check finds no errors and no leaks, compare finds the images equal,
 * info reads them; vmdkinfo parses the VMDK streams. Refusals are one line with a
 * non-zero exit and leave nothing behind; hostile streams end in one clear error;
 * a reader that goes away ends the writer cleanly.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { QIMG, ok, plainEnv, qemuAvailable, qemuImg, qemuIo, qimg, tempDir, type RunResult } from '../helpers/qemu.js';
import { Prng } from '../helpers/prng.js';

const enabled = qemuAvailable();
const hasVmdkinfo = spawnSync('vmdkinfo', ['-V']).status === 0;
if (enabled && !hasVmdkinfo && process.env.CI === 'true') throw new Error('vmdkinfo (libvmdk-utils) is required under CI=true');
const tmp = tempDir('qimg-pipes-');
afterAll(() => tmp.cleanup());
const d = tmp.path;
const P = (n: string) => join(d, n);

/** Runs a bash pipeline in the temp directory; $QIMG runs the built CLI (a function, so paths may hold spaces). */
function sh(script: string, timeout = 30_000): RunResult {
  const r = spawnSync('bash', ['-c', `qimg() { "$NODE_BIN" "$QIMG_JS" "$@"; }\n${script.replaceAll('$QIMG', 'qimg')}`], {
    cwd: d,
    encoding: 'utf8',
    timeout,
    env: { ...plainEnv(), NODE_BIN: process.execPath, QIMG_JS: QIMG },
    maxBuffer: 64 << 20,
  });
  if (r.error) throw r.error;
  return { status: r.status ?? 128, stdout: r.stdout, stderr: r.stderr };
}

/** qemu-img check --output=json: no corruptions, no leaks, no check errors. */
function expectClean(file: string, fmt = 'qcow2'): void {
  const r = qemuImg(['check', '-f', fmt, '--output=json', file], d);
  expect(r.status, `${file}: ${r.stdout}${r.stderr}`).toBe(0);
  const j = JSON.parse(r.stdout) as Record<string, number | undefined>;
  expect(j.corruptions ?? 0).toBe(0);
  expect(j.leaks ?? 0).toBe(0);
  expect(j['check-errors'] ?? 0).toBe(0);
}

function expectSame(a: string, b: string): void {
  const r = qemuImg(['compare', a, b], d);
  expect(r.status, `${a} vs ${b}: ${r.stdout}${r.stderr}`).toBe(0);
}

function info(file: string): Record<string, unknown> {
  return JSON.parse(ok(qemuImg(['info', '--output=json', file], d)).stdout) as Record<string, unknown>;
}

/** A failure as the CLI must give it: exit 1, exactly one stderr line, no stack trace, nothing on stdout. */
function expectRefused(r: RunResult, pattern: RegExp): void {
  expect(r.status, r.stderr).toBe(1);
  const lines = r.stderr.trim().split('\n');
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^qimg: /);
  expect(lines[0]).toMatch(pattern);
  expect(r.stderr).not.toMatch(/\n\s+at /);
}

/** `map --output=json` without host offsets (the layouts differ, the mapping must not). */
function mapping(file: string): string {
  return ok(qemuImg(['map', '--output=json', file], d)).stdout.replace(/, "offset": \d+/g, '');
}

beforeAll(() => {
  if (!enabled) return;
  const rng = new Prng(13);
  // a sparse raw: random, patterned and zero runs between holes, not a multiple of 64 KiB
  const sparse = Buffer.alloc(6 * 1024 * 1024 + 7 * 512);
  for (let i = 0; i < 40; i++) {
    const at = rng.int(0, sparse.length - 70_000);
    const len = rng.int(1, 64) * 1024;
    if (i % 3 === 0) sparse.fill(rng.int(1, 255), at, at + len);
    else for (let j = at; j < at + len; j++) sparse[j] = rng.u32() & 0xff;
  }
  writeFileSync(P('sparse.raw'), sparse);
  ok(qemuImg(['convert', '-O', 'raw', '-S', '4k', 'sparse.raw', 'holes.raw'], d));
  // an all-zero image and one whose size is no multiple of a cluster (nor of a sector)
  ok(qemuImg(['create', '-f', 'raw', 'zero.raw', '3M'], d));
  const odd = Buffer.alloc(1_000_000);
  for (let j = 0; j < odd.length; j += 4) odd.writeUInt32LE(rng.u32(), j);
  writeFileSync(P('odd.raw'), odd);
  // a qcow2 chain: data, zeros and a pattern over a base
  ok(qemuImg(['create', '-f', 'qcow2', 'base.qcow2', '5M'], d));
  ok(qemuIo(['-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 3M 512k', 'base.qcow2'], d));
  ok(qemuImg(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], d));
  ok(qemuIo(['-c', 'write -P 0x33 512k 1M', '-c', 'write -z 3M 64k', '-c', 'write -P 0x44 4M 4k', 'top.qcow2'], d));
  // VMDKs made by qemu-img: a monolithic sparse one and a stream-optimized one
  ok(qemuImg(['convert', '-O', 'vmdk', 'holes.raw', 'src.vmdk'], d));
  ok(qemuImg(['convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'holes.raw', 'qemu-stream.vmdk'], d));
});

describe.runIf(enabled)('convert to standard output', () => {
  it('qcow2: check clean (no leaks), compare equal and info reads it, for each source and option', () => {
    const cases: Array<[string, string]> = [
      ['holes.raw', 'cluster_size=512'],
      ['holes.raw', 'cluster_size=2M,compat=0.10'],
      ['top.qcow2', 'cluster_size=65536'],
      ['top.qcow2', 'compat=0.10'],
      ['top.qcow2', 'compat=1.1,lazy_refcounts=on'],
      ['top.qcow2', 'extended_l2=on'],
      ['top.qcow2', 'refcount_bits=1,cluster_size=512'],
      ['src.vmdk', 'cluster_size=2M'],
      ['zero.raw', 'compat=1.1'],
      ['odd.raw', 'cluster_size=65536'],
      ['odd.raw', 'cluster_size=2M'],
    ];
    cases.forEach(([src, opts], i) => {
      ok(sh(`$QIMG convert -O qcow2 -o ${opts} ${src} - > s${i}.qcow2`), `${src} ${opts}`);
      expectClean(`s${i}.qcow2`);
      expectSame(`s${i}.qcow2`, src);
      const j = info(`s${i}.qcow2`);
      expect(j.format).toBe('qcow2');
      expect(j['virtual-size']).toBe(info(src)['virtual-size']);
      if (opts.includes('compat=0.10')) expect((j['format-specific'] as { data: { compat: string } }).data.compat).toBe('0.10');
    });
    // through a pipe the bytes are the same as redirected (one deterministic pass)
    ok(sh('set -o pipefail; $QIMG convert -O qcow2 -o compat=0.10 top.qcow2 - | cat > piped.qcow2'));
    expect(readFileSync(P('piped.qcow2')).equals(readFileSync(P('s3.qcow2')))).toBe(true);
    // an all-zero source allocates no data cluster
    expect((info('s8.qcow2')['actual-size'] as number) < 1024 * 1024).toBe(true);
  });

  it('qcow2 with -B: the same mapping as a normal convert, zero clusters kept (v3) or stored (v2)', () => {
    for (const compat of ['1.1', '0.10']) {
      ok(sh(`$QIMG convert -O qcow2 -o compat=${compat} -B base.qcow2 -F qcow2 top.qcow2 - > b${compat}.qcow2`));
      ok(qimg(['convert', '-O', 'qcow2', '-o', `compat=${compat}`, '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', `n${compat}.qcow2`], { cwd: d }));
      expectClean(`b${compat}.qcow2`);
      expectSame(`b${compat}.qcow2`, 'top.qcow2');
      expect(info(`b${compat}.qcow2`)['backing-filename']).toBe('base.qcow2');
      expect(mapping(`b${compat}.qcow2`)).toBe(mapping(`n${compat}.qcow2`));
    }
  });

  it('raw: the bytes of the disk in order, holes as zeros; -p goes to stderr', () => {
    ok(qemuImg(['convert', '-O', 'raw', 'top.qcow2', 'top-ref.raw'], d));
    ok(sh('set -o pipefail; $QIMG convert -O raw top.qcow2 - | cat > top.raw'));
    expect(readFileSync(P('top.raw')).equals(readFileSync(P('top-ref.raw')))).toBe(true);
    ok(sh('$QIMG convert holes.raw - > holes-out.raw'));
    expect(readFileSync(P('holes-out.raw')).equals(readFileSync(P('sparse.raw')))).toBe(true);
    const r = ok(sh('$QIMG convert -p -O qcow2 top.qcow2 - > p.qcow2'));
    expect(r.stderr).toMatch(/100\.00\/100%/);
    ok(sh('$QIMG convert -O qcow2 top.qcow2 - > np.qcow2'));
    expect(readFileSync(P('p.qcow2')).equals(readFileSync(P('np.qcow2')))).toBe(true);
  });

  it('stream-optimized VMDK: qemu-img check and compare, vmdkinfo parses it', () => {
    const srcs = ['top.qcow2', 'odd.raw', 'zero.raw', 'holes.raw'];
    srcs.forEach((src, i) => {
      ok(sh(`set -o pipefail; $QIMG convert -O vmdk -o subformat=streamOptimized ${src} - | cat > v${i}.vmdk`));
      expectClean(`v${i}.vmdk`, 'vmdk');
      expectSame(`v${i}.vmdk`, src);
      const j = info(`v${i}.vmdk`);
      expect((j['format-specific'] as { data: { 'create-type': string } }).data['create-type']).toBe('streamOptimized');
      if (hasVmdkinfo) {
        const v = spawnSync('vmdkinfo', [`v${i}.vmdk`], { cwd: d, encoding: 'utf8' });
        expect(v.status, v.stderr).toBe(0);
        expect(v.stdout).toMatch(/Stream optimized/);
      }
    });
  });
});

describe.runIf(enabled)('convert from standard input', () => {
  it('raw from a pipe (size known at its end) and from a redirected file', () => {
    ok(sh('cat holes.raw | $QIMG convert -f raw -O qcow2 - in1.qcow2'));
    expectClean('in1.qcow2');
    expectSame('in1.qcow2', 'holes.raw');
    expect(info('in1.qcow2')['virtual-size']).toBe(info('holes.raw')['virtual-size']);
    ok(sh('cat odd.raw | $QIMG convert -f raw -O qcow2 -o cluster_size=2M - in2.qcow2'));
    expectClean('in2.qcow2');
    expectSame('in2.qcow2', 'odd.raw');
    ok(sh('$QIMG convert -f raw -O qcow2 - in3.qcow2 < top-ref.raw'));
    expectSame('in3.qcow2', 'top.qcow2');
    ok(sh('cat zero.raw | $QIMG convert -f raw -O raw - in4.raw'));
    expectSame('in4.raw', 'zero.raw');
    // pipe to pipe
    ok(sh('set -o pipefail; cat sparse.raw | $QIMG convert -f raw -O raw - - | cat > in5.raw'));
    expect(readFileSync(P('in5.raw')).equals(readFileSync(P('sparse.raw')))).toBe(true);
  });

  it("stream-optimized VMDK: qemu-img's and qimg's streams read forward", () => {
    ok(sh('cat qemu-stream.vmdk | $QIMG convert -f vmdk -O qcow2 - in6.qcow2'));
    expectClean('in6.qcow2');
    expectSame('in6.qcow2', 'holes.raw');
    ok(sh('set -o pipefail; $QIMG convert -O vmdk -o subformat=streamOptimized top.qcow2 - | $QIMG convert -f vmdk -O raw - in7.raw'));
    expect(readFileSync(P('in7.raw')).equals(readFileSync(P('top-ref.raw')))).toBe(true);
    ok(sh('set -o pipefail; cat qemu-stream.vmdk | $QIMG convert -f vmdk -O vmdk -o subformat=streamOptimized - - | cat > in8.vmdk'));
    expectSame('in8.vmdk', 'holes.raw');
    // VMware puts a grain table after each table's grains: metadata records between grains are skipped
    ok(sh('$QIMG convert -O vmdk -o subformat=streamOptimized top.qcow2 - > mid.vmdk'));
    const b = readFileSync(P('mid.vmdk'));
    const afterFirst = 65536 + Math.ceil((12 + b.readUInt32LE(65536 + 8)) / 512) * 512;
    const table = Buffer.alloc(5 * 512);
    table.writeBigUInt64LE(4n, 0); // 4 sectors of grain table follow
    table.writeUInt32LE(1, 12); // MARKER_GRAIN_TABLE
    writeFileSync(P('mid2.vmdk'), Buffer.concat([b.subarray(0, afterFirst), table, b.subarray(afterFirst)]));
    ok(sh('cat mid2.vmdk | $QIMG convert -f vmdk -O raw - in9.raw'));
    expect(readFileSync(P('in9.raw')).equals(readFileSync(P('top-ref.raw')))).toBe(true);
  });
});

describe.runIf(enabled)('refusals and hostile input', () => {
  it('random-access sources, unsupported outputs and options: one line, exit 1, nothing left behind', () => {
    const cases: Array<[string, RegExp, string?]> = [
      ['cat top.qcow2 | $QIMG convert -f qcow2 -O raw - r1.raw', /^qimg: -: .*needs random access/, 'r1.raw'],
      ['cat top.qcow2 | $QIMG convert -O raw - r2.raw', /^qimg: -: .*needs random access/, 'r2.raw'],
      ['cat src.vmdk | $QIMG convert -f vmdk -O raw - r3.raw', /^qimg: -: .*needs random access/, 'r3.raw'],
      ['$QIMG convert -O vdi top.qcow2 - > r4.out', /^qimg: -: .*cannot be written to standard output/],
      ['$QIMG convert -n -O qcow2 top.qcow2 - > r5.out', /-n/],
      ['$QIMG convert -c -O qcow2 top.qcow2 - > r6.out', /-c/],
      ['$QIMG convert -O vmdk top.qcow2 - > r7.out', /subformat=streamOptimized/],
      ['$QIMG convert -O qcow2 -o preallocation=full top.qcow2 - > r8.out', /preallocation/],
      ['cat holes.raw | $QIMG convert -f raw -O vdi - r9.vdi', /^qimg: -: .*cannot grow/, 'r9.vdi'],
      ['cat holes.raw | $QIMG convert -f raw -O qcow2 - - > r10.out', /^qimg: -: /],
      ['$QIMG info -', /standard input/],
      ['$QIMG check -', /standard input/],
    ];
    for (const [script, pattern, output] of cases) {
      const r = sh(script);
      expectRefused(r, pattern);
      if (output) expect(existsSync(P(output)), script).toBe(false);
      expect(existsSync(P('-')), script).toBe(false);
    }
  });

  it('hostile stream-optimized VMDKs: LBA past the end, huge markers, bombs, disorder, truncation', () => {
    const good = readFileSync(P('v0.vmdk'));
    const g = 65536; // the first grain marker (qimg's streams start grains at 64 KiB)
    const first = good.readUInt32LE(g + 8);
    const second = g + Math.ceil((12 + first) / 512) * 512;
    const mutate = (name: string, fn: (b: Buffer) => Buffer) => writeFileSync(P(name), fn(Buffer.from(good)));
    mutate('h-lba.vmdk', (b) => (b.writeBigUInt64LE(10n ** 9n, g), b));
    mutate('h-size.vmdk', (b) => (b.writeUInt32LE(0x7fffffff, g + 8), b));
    mutate('h-order.vmdk', (b) => (b.writeBigUInt64LE(b.readBigUInt64LE(second) + 128n, g), b));
    mutate('h-align.vmdk', (b) => (b.writeBigUInt64LE(5n, g), b));
    mutate('h-trunc.vmdk', (b) => b.subarray(0, g + 100));
    mutate('h-tail.vmdk', (b) => b.subarray(0, b.length - 1024));
    mutate('h-type.vmdk', (b) => {
      b.fill(0, second, second + 512);
      b.writeUInt32LE(77, second + 12);
      return b;
    });
    // a grain that inflates to 1 MiB (a bomb for a 64 KiB grain)
    const zlib = spawnSync(process.execPath, ['-e', "process.stdout.write(require('zlib').deflateSync(Buffer.alloc(1<<20)))"], { encoding: 'buffer' }).stdout;
    mutate('h-bomb.vmdk', (b) => {
      const rec = Buffer.alloc(Math.ceil((12 + zlib.length) / 512) * 512);
      rec.writeBigUInt64LE(0n, 0);
      rec.writeUInt32LE(zlib.length, 8);
      zlib.copy(rec, 12);
      return Buffer.concat([b.subarray(0, g), rec, Buffer.alloc(512)]);
    });
    const expected: Array<[string, RegExp]> = [
      ['h-lba', /past the end of the disk/],
      ['h-size', /too large/],
      ['h-order', /out of order/],
      ['h-align', /grain boundary/],
      ['h-trunc', /truncated/],
      ['h-tail', /truncated/],
      ['h-type', /unknown stream marker/],
      ['h-bomb', /more than one grain/],
    ];
    for (const [name, pattern] of expected) {
      const r = sh(`cat ${name}.vmdk | $QIMG convert -f vmdk -O qcow2 - ${name}.qcow2`, 20_000);
      expectRefused(r, pattern);
      expect(existsSync(P(`${name}.qcow2`)), name).toBe(false);
    }
  });

  it('a reader that goes away (head -c 1000) ends the writer with one clear line, no hang', () => {
    for (const fmt of ['qcow2', 'raw']) {
      const r = sh(`$QIMG convert -O ${fmt} top.qcow2 - | head -c 1000 > /dev/null; echo "status=\${PIPESTATUS[0]}"`, 20_000);
      const status = Number(/status=(\d+)/.exec(r.stdout)?.[1]);
      expect([1, 141]).toContain(status);
      expect(r.stderr).not.toMatch(/\n\s+at /);
      if (status === 1) expect(r.stderr.trim()).toMatch(/^qimg: -: error writing to standard output: .*broken pipe/);
    }
  });
});
