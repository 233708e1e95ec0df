/**
 * qimg as an NBD client against real servers, with qemu-img on the same export as the
 * oracle: qemu-nbd (unix socket and TCP on 127.0.0.1, read-only and writable, a raw
 * image, a qcow2 chain, a qcow2 file exported as raw bytes) and nbdkit (memory, data
 * with --no-sr for simple replies, blocksize-policy for block-size constraints, delay
 * for a server killed mid-transfer).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { QIMG, ok, plainEnv, qemuAvailable, qemuImg, qemuIo, qimg, tempDir } from '../helpers/qemu.js';
import { freePort, nbdServersAvailable, startNbdkit, startQemuNbd, type RunningServer } from '../helpers/nbd-servers.js';

const enabled = qemuAvailable() && nbdServersAvailable();
const MiB = 1024 * 1024;

/** qimg's map JSON carries qemu 10's "compressed" member; qemu-img 7.2's does not. */
function mapJson(text: string): unknown {
  return (JSON.parse(text) as Array<Record<string, unknown>>).map(({ compressed: _c, ...rest }) => rest);
}

/** A failure as a user sees it: exit 1, one `qimg: ...` line, no stack trace. */
function expectOneLineError(r: { status: number; stderr: string }, pattern: RegExp): void {
  expect(r.status).not.toBe(0);
  const lines = r.stderr.trim().split('\n');
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^qimg: /);
  expect(lines[0]).toMatch(pattern);
}

describe.skipIf(!enabled)('NBD client against qemu-nbd and nbdkit', () => {
  const tmp = tempDir('qimg-nbd-client-');
  const dir = tmp.path;
  const servers: RunningServer[] = [];
  const f = (name: string) => join(dir, name);

  beforeAll(() => {
    // a sparse raw disk: data at 0, 1 MiB and the last 64 KiB
    ok(qemuImg(['create', '-f', 'raw', f('sparse.raw'), '4M']));
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 0x11 0 64k', '-c', 'write -P 0x22 1M 128k', '-c', 'write -P 0x33 4032k 64k', f('sparse.raw')]));
    // a qcow2 chain: base with two areas, top overwriting one and zeroing another
    ok(qemuImg(['create', '-f', 'qcow2', f('base.qcow2'), '4M']));
    ok(qemuIo(['-c', 'write -P 1 0 128k', '-c', 'write -P 2 2M 64k', f('base.qcow2')]));
    ok(qemuImg(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('top.qcow2')]));
    ok(qemuIo(['-c', 'write -P 3 64k 128k', '-c', 'write -z 2M 64k', f('top.qcow2')]));
  });

  afterAll(() => {
    for (const s of servers) s.stop();
    tmp.cleanup();
  });

  it('reads a sparse raw export over TCP as qemu-img does: info, map, convert, compare', async () => {
    const port = await freePort();
    const srv = startQemuNbd(dir, 'tcp', f('sparse.raw'), { format: 'raw', readOnly: true, port });
    servers.push(srv);
    for (const args of [['info'], ['info', '--output=json'], ['map'], ['info', '-f', 'raw', '--output=json']]) {
      expect(ok(qimg([...args, srv.uri])).stdout, args.join(' ')).toBe(ok(qemuImg([...args, srv.uri])).stdout);
    }
    expect(mapJson(ok(qimg(['map', '--output=json', srv.uri])).stdout)).toEqual(mapJson(ok(qemuImg(['map', '--output=json', srv.uri])).stdout));
    // qemu's legacy name of the same export
    const legacy = `nbd:127.0.0.1:${port}:exportname=exp`;
    expect(JSON.parse(ok(qimg(['info', '--output=json', legacy])).stdout)['virtual-size']).toBe(4 * MiB);

    // holes are not transferred: the copy is as sparse as the data
    ok(qimg(['convert', '-O', 'raw', srv.uri, f('copy.raw')]));
    ok(qemuImg(['compare', '-f', 'raw', '-F', 'raw', f('copy.raw'), f('sparse.raw')]));
    expect(statSync(f('copy.raw')).blocks * 512).toBeLessThanOrEqual(512 * 1024);
    ok(qimg(['convert', '-O', 'qcow2', srv.uri, f('copy.qcow2')]));
    ok(qemuImg(['compare', f('copy.qcow2'), f('sparse.raw')]));
    expect(ok(qimg(['compare', f('sparse.raw'), srv.uri])).stdout).toContain('Images are identical.');
    const r = qimg(['compare', f('copy.qcow2'), srv.uri]);
    expect(r.status).toBe(0);

    // refusals: an unknown export, a write to a read-only export, a port nobody serves
    expectOneLineError(qimg(['info', `nbd://127.0.0.1:${port}/nosuch`]), /Requested export not available/);
    writeFileSync(f('small.raw'), randomBytes(64 * 1024));
    expectOneLineError(qimg(['convert', '-n', '-f', 'raw', '-O', 'raw', f('small.raw'), srv.uri]), /Permission denied \(the NBD export is read-only\)/);
    const closed = await freePort();
    expectOneLineError(qimg(['info', `nbd://127.0.0.1:${closed}`]), new RegExp(`Failed to connect to '127.0.0.1:${closed}': Connection refused`));
  });

  it('reads a qcow2 chain served by qemu-nbd over a unix socket: map and content as qemu-img', () => {
    const srv = startQemuNbd(dir, 'chain', f('top.qcow2'), { format: 'qcow2', readOnly: true });
    servers.push(srv);
    expect(ok(qimg(['map', srv.uri])).stdout).toBe(ok(qemuImg(['map', srv.uri])).stdout);
    expect(mapJson(ok(qimg(['map', '--output=json', srv.uri])).stdout)).toEqual(mapJson(ok(qemuImg(['map', '--output=json', srv.uri])).stdout));
    expect(ok(qimg(['compare', f('top.qcow2'), srv.uri])).stdout).toContain('Images are identical.');
    ok(qimg(['convert', '-O', 'qcow2', srv.uri, f('chain-copy.qcow2')]));
    ok(qemuImg(['compare', f('chain-copy.qcow2'), f('top.qcow2')]));
  });

  it('opens a qcow2 image through a raw export (probed and with -f qcow2)', () => {
    const srv = startQemuNbd(dir, 'qraw', f('base.qcow2'), { format: 'raw', readOnly: true });
    servers.push(srv);
    expect(ok(qimg(['info', srv.uri])).stdout).toBe(ok(qemuImg(['info', srv.uri])).stdout);
    expect(ok(qimg(['info', '-f', 'qcow2', '--output=json', srv.uri])).stdout).toBe(ok(qemuImg(['info', '-f', 'qcow2', '--output=json', srv.uri])).stdout);
    expect(mapJson(ok(qimg(['map', '-f', 'qcow2', '--output=json', srv.uri])).stdout)).toEqual(
      mapJson(ok(qemuImg(['map', '-f', 'qcow2', '--output=json', srv.uri])).stdout),
    );
    expect(ok(qimg(['compare', '-f', 'qcow2', '-F', 'qcow2', srv.uri, f('base.qcow2')])).stdout).toContain('Images are identical.');
  });

  it('writes to a writable export: convert -n, raw and qcow2 created on it, commit and rebase with the export as backing', () => {
    ok(qemuImg(['create', '-f', 'raw', f('target.raw'), '4M']));
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 0x99 0 4M', f('target.raw')]));
    const srv = startQemuNbd(dir, 'rw', f('target.raw'), { format: 'raw' });
    servers.push(srv);
    ok(qimg(['convert', '-n', '-O', 'raw', f('top.qcow2'), srv.uri]));
    ok(qemuImg(['compare', '-F', 'qcow2', srv.uri, f('top.qcow2')]));
    // "creating" raw on an export: it must fit, and old contents do not show through
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 0x99 0 4M', srv.uri]));
    ok(qimg(['convert', '-O', 'raw', f('sparse.raw'), srv.uri]));
    ok(qemuImg(['compare', '-f', 'raw', '-F', 'raw', srv.uri, f('sparse.raw')]));
    expectOneLineError(qimg(['create', '-f', 'raw', srv.uri, '8M']), /Cannot grow NBD nodes/);
    expectOneLineError(qimg(['resize', '-f', 'raw', srv.uri, '8M']), /size of an NBD export/);

    // a local overlay over the export: rebase onto it (safe mode), then commit into it
    ok(qemuImg(['create', '-f', 'qcow2', '-b', 'sparse.raw', '-F', 'raw', f('ov.qcow2')]));
    ok(qemuIo(['-c', 'write -P 0x44 1M 64k', f('ov.qcow2')]));
    ok(qemuImg(['convert', '-O', 'raw', f('ov.qcow2'), f('ov-expected.raw')]));
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 0x55 3M 64k', srv.uri]));
    ok(qimg(['rebase', '-F', 'raw', '-b', srv.uri, f('ov.qcow2')]));
    expect(JSON.parse(ok(qemuImg(['info', '--output=json', '-U', f('ov.qcow2')])).stdout)['backing-filename']).toBe(srv.uri);
    ok(qemuImg(['compare', '-F', 'raw', f('ov.qcow2'), f('ov-expected.raw')]));
    expect(ok(qimg(['map', f('ov.qcow2')])).stdout).toBe(ok(qemuImg(['map', f('ov.qcow2')])).stdout);
    ok(qimg(['commit', f('ov.qcow2')]));
    ok(qemuImg(['compare', '-f', 'raw', '-F', 'raw', srv.uri, f('ov-expected.raw')]));

    // qcow2 onto the export (made in a scratch file, then copied), and then written in place
    ok(qimg(['convert', '-O', 'qcow2', f('top.qcow2'), srv.uri]));
    ok(qemuImg(['check', '-f', 'qcow2', srv.uri]));
    ok(qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', srv.uri, f('top.qcow2')]));
    ok(qimg(['convert', '-n', '-O', 'qcow2', f('sparse.raw'), srv.uri]));
    ok(qemuImg(['check', '-f', 'qcow2', srv.uri]));
    ok(qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', srv.uri, f('sparse.raw')]));
    // check, and metadata rewrites that place new structures after the last cluster in use
    expect(ok(qimg(['check', srv.uri])).stdout).toBe(ok(qemuImg(['check', srv.uri])).stdout);
    ok(qimg(['snapshot', '-c', 's1', srv.uri]));
    ok(qimg(['amend', '-o', 'refcount_bits=8', srv.uri]));
    expect(ok(qemuImg(['check', srv.uri])).stdout).toMatch(/^No errors were found on the image\./);
    expect(ok(qemuImg(['snapshot', '-l', srv.uri])).stdout).toContain('s1');
    ok(qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', srv.uri, f('sparse.raw')]));
    expectOneLineError(qimg(['create', '-f', 'vpc', srv.uri, '1M']), /Creating a vpc image on an NBD export is not supported/);
    // a relative backing name has no directory to be relative to on an export
    expectOneLineError(qimg(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', srv.uri]), /Cannot generate a base directory for NBD nodes/);
    ok(qemuImg(['create', '-f', 'qcow2', '-u', '-b', 'base.qcow2', '-F', 'qcow2', srv.uri, '4M']));
    for (const args of [['info'], ['info', '--output=json']]) expect(ok(qimg([...args, srv.uri])).stdout).toBe(ok(qemuImg([...args, srv.uri])).stdout);
    expectOneLineError(qimg(['map', srv.uri]), /Cannot generate a base directory for NBD nodes/);
  });

  it('works with nbdkit: simple replies (--no-sr), block-size constraints, writes', async () => {
    const data = await startNbdkit(dir, 'data', ['--no-sr', 'data', '1 2 3 @1048576 4 5 6 @3145728 7', 'size=4M']);
    servers.push(data);
    expect(mapJson(ok(qimg(['map', '-f', 'raw', '--output=json', data.uri])).stdout)).toEqual(mapJson(ok(qemuImg(['map', '-f', 'raw', '--output=json', data.uri])).stdout));
    ok(qimg(['convert', '-f', 'raw', '-O', 'raw', data.uri, f('data.raw')]));
    ok(qemuImg(['compare', '-f', 'raw', '-F', 'raw', f('data.raw'), data.uri]));

    // the server refuses requests that break its advertised block sizes
    const policy = [
      '--filter=blocksize-policy',
      'memory',
      '1M',
      'blocksize-minimum=4096',
      'blocksize-preferred=65536',
      'blocksize-maximum=65536',
      'blocksize-error-policy=error',
    ];
    const mem = await startNbdkit(dir, 'mem', policy);
    servers.push(mem);
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 0x55 0 1M', mem.uri]));
    // 9 sectors: the last write is unaligned (read-modify-write keeps the bytes after it)
    writeFileSync(f('odd.raw'), randomBytes(4608));
    ok(qimg(['convert', '-n', '-f', 'raw', '-O', 'raw', f('odd.raw'), mem.uri]));
    ok(qemuImg(['convert', '-f', 'raw', '-O', 'raw', mem.uri, f('mem.raw')]));
    const expected = Buffer.alloc(MiB, 0x55);
    readFileSync(f('odd.raw')).copy(expected);
    expect(readFileSync(f('mem.raw')).equals(expected)).toBe(true);
    // large reads are split to the 64 KiB maximum
    ok(qimg(['convert', '-f', 'raw', '-O', 'raw', mem.uri, f('mem2.raw')]));
    ok(qemuImg(['compare', '-f', 'raw', '-F', 'raw', f('mem2.raw'), f('mem.raw')]));
    const mem4 = await startNbdkit(dir, 'mem4', ['memory', '4M']);
    servers.push(mem4);
    ok(qimg(['convert', '-n', '-O', 'raw', f('top.qcow2'), mem4.uri]));
    ok(qemuImg(['compare', '-F', 'qcow2', mem4.uri, f('top.qcow2')]));
  });

  it('fails once, clearly and promptly when the server dies mid-transfer', async () => {
    const slow = await startNbdkit(dir, 'slow', ['--filter=delay', 'pattern', '64M', 'rdelay=300ms']);
    servers.push(slow);
    const started = Date.now();
    const child = spawn(process.execPath, [QIMG, 'convert', '-f', 'raw', '-O', 'raw', slow.uri, f('dropped.raw')], { env: plainEnv() });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    setTimeout(() => process.kill(slow.pid, 'SIGKILL'), 1200);
    const status = await new Promise<number>((resolve) => child.on('close', (code) => resolve(code ?? 128)));
    expect(Date.now() - started).toBeLessThan(15_000);
    expectOneLineError({ status, stderr }, /NBD server closed the connection/);
    expect(() => statSync(f('dropped.raw'))).toThrow();
  });
});
