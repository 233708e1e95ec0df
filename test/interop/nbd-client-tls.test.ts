/**
 * qimg's NBD client with TLS and qemu's nbd protocol options in --image-opts, with
 * qemu-img beside it on the same command line as the oracle: qemu-nbd serving over
 * TLS-PSK (TCP) and X.509 (TCP and a unix socket), `qimg serve` as a writable X.509
 * server, `driver=nbd` / `file.driver=nbd` / `file.filename=URL` forms, and the refusals
 * (wrong identity, wrong host name, no certificate, server credentials, unknown id, a
 * server without TLS, a TLS server asked without credentials, malformed options).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { sameAsQemuImg } from '../helpers/same-as-qemu.js';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, tempDir, type RunResult } from '../helpers/qemu.js';
import { nbdServersAvailable } from '../helpers/nbd-servers.js';
import { freePort, qemuNbdForked, serveForked, stopAll, stopPid } from '../helpers/nbd-serve.js';
import { makePskDir, makeX509Dirs } from '../helpers/tls.js';

const enabled = qemuAvailable() && nbdServersAvailable();

let tmp: { path: string; cleanup: () => void };
const p = (name: string) => join(tmp.path, name);

/** qemu's message without the program name and the outer "Could not open 'OPTS': " */
const message = (r: RunResult) =>
  r.stderr
    .trim()
    .split('\n')[0]
    .replace(/^(qemu-img|qimg): /, '')
    .replace(/^(Could not open '[^']*': )+/, '');

const same = sameAsQemuImg;

/** A refusal of both, as one line from qimg holding `pattern` (qemu-img's own line matches `qemuPattern`). */
function bothRefuse(args: string[], pattern: RegExp, qemuPattern: RegExp = pattern): void {
  const q = qemuImg(args);
  const r = qimg(args);
  expect(q.status, `qemu-img ${args.join(' ')}`).not.toBe(0);
  expect(r.status, `qimg ${args.join(' ')}`).toBe(1);
  expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
  expect(r.stderr).not.toMatch(/\n\s+at /);
  expect(message(r)).toMatch(pattern);
  expect(message(q)).toMatch(qemuPattern);
}

describe.skipIf(!enabled)('NBD client over TLS and with nbd --image-opts', () => {
  let psk: string;
  let x509: { srv: string; cli: string; nocert: string };
  const pskObj = (user = 'alice', endpoint = 'client', dir = psk) => ['--object', `tls-creds-psk,id=tls0,dir=${dir},endpoint=${endpoint},username=${user}`];
  const x509Obj = (dir: string, extra = '') => ['--object', `tls-creds-x509,id=tls0,dir=${dir},endpoint=client${extra}`];

  beforeAll(() => {
    tmp = tempDir('qimg-nbd-tls-');
    psk = p('psk');
    makePskDir(psk);
    makePskDir(p('psk-other'));
    x509 = makeX509Dirs(p('x509'));
    ok(qemuImg(['create', '-q', '-f', 'qcow2', p('d.qcow2'), '4M']));
    ok(qemuIo(['-c', 'write -P 0x5a 0 64k', '-c', 'write -P 0xa5 1M 512k', p('d.qcow2')]));
    ok(qemuImg(['convert', '-O', 'raw', p('d.qcow2'), p('d.raw')]));
  });

  afterAll(async () => {
    await stopAll();
    tmp.cleanup();
  });

  it('TLS-PSK against qemu-nbd: info, map and convert as qemu-img; the refusals', async () => {
    const port = await freePort();
    const s = qemuNbdForked(['-t', '-r', '-b', '127.0.0.1', '-p', String(port), '-x', 'exp', '--object', `tls-creds-psk,id=tls0,dir=${psk},endpoint=server`, '--tls-creds', 'tls0', '-f', 'qcow2', p('d.qcow2')], p('psk.pid'));
    try {
      const opts = `driver=nbd,host=127.0.0.1,port=${port},export=exp,tls-creds=tls0`;
      expect(same(['info', ...pskObj(), '--image-opts', opts]).stdout).toContain(`image: nbd://127.0.0.1:${port}/exp\nfile format: nbd\nvirtual size: 4 MiB`);
      same(['info', '--output=json', ...pskObj(), '--image-opts', opts]);
      same(['map', '--output=json', ...pskObj(), '--image-opts', `driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port=${port},file.export=exp,file.tls-creds=tls0`]);
      ok(qimg(['convert', ...pskObj(), '--image-opts', opts, '-O', 'qcow2', p('psk-copy.qcow2')]));
      ok(qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', p('psk-copy.qcow2'), p('d.raw')]));
      ok(qemuImg(['check', p('psk-copy.qcow2')]));
      // the URL form with the TLS option beside it
      expect(ok(qimg(['compare', ...pskObj(), '--image-opts', `driver=raw,file.filename=nbd://127.0.0.1:${port}/exp,file.tls-creds=tls0`, `driver=raw,file.filename=${p('d.raw')}`])).stdout).toBe('Images are identical.\n');

      bothRefuse(['info', ...pskObj('bob'), '--image-opts', opts], new RegExp(`Username bob not found in PSK file ${psk}/keys.psk`));
      // a key the server does not have for that identity
      bothRefuse(['info', ...pskObj('alice', 'client', p('psk-other')), '--image-opts', opts], /TLS handshake failed|closed the connection/, /TLS|closed|read/);
      bothRefuse(['info', '--object', `tls-creds-psk,id=tls0,dir=${psk},endpoint=server`, '--image-opts', opts], /^Expected TLS credentials for a client endpoint$/);
      bothRefuse(['info', ...pskObj('alice', 'server'), '--image-opts', opts], /^username should not be set when endpoint=server$/);
      bothRefuse(['info', ...pskObj(), '--image-opts', opts.replace('tls-creds=tls0', 'tls-creds=nope')], /^No TLS credentials with id 'nope'$/);
      // no credentials for a server that requires TLS
      const plain = qimg(['info', `nbd://127.0.0.1:${port}/exp`]);
      expect(plain.status).toBe(1);
      expect(plain.stderr).toMatch(/^qimg: .*requires TLS.*\n$/);
    } finally {
      await stopPid(s.pid);
    }
  });

  it('X.509 against qemu-nbd: the server certificate and its host name checked, as qemu-img checks them', async () => {
    const port = await freePort();
    const s = qemuNbdForked(['-t', '-r', '-b', '127.0.0.1', '-p', String(port), '--object', `tls-creds-x509,id=tls0,dir=${x509.srv},endpoint=server`, '--tls-creds', 'tls0', '-f', 'qcow2', p('d.qcow2')], p('x509.pid'));
    try {
      for (const host of ['127.0.0.1', 'localhost']) {
        same(['info', ...x509Obj(x509.cli), '--image-opts', `driver=nbd,host=${host},port=${port},tls-creds=tls0`]);
      }
      const opts = `driver=nbd,host=127.0.0.1,port=${port},tls-creds=tls0`;
      bothRefuse(['info', ...x509Obj(x509.cli), '--image-opts', `${opts},tls-hostname=other.example`], /^Certificate does not match the hostname other\.example$/);
      // verify-peer=off: the name is not checked
      same(['info', ...x509Obj(x509.cli, ',verify-peer=off'), '--image-opts', `${opts},tls-hostname=other.example`]);
      // qemu-nbd verifies clients: one without a certificate is dropped
      bothRefuse(['info', ...x509Obj(x509.nocert), '--image-opts', opts], /NBD server closed the connection|TLS handshake failed/, /Cannot read from TLS channel|TLS handshake failed/);
      // a client trusting another CA refuses the server
      bothRefuse(['info', ...x509Obj(x509.srv.replace(/srv$/, 'nocert'), ',verify-peer=on'), '--image-opts', opts.replace('127.0.0.1', 'localhost') + ',tls-hostname=nope'], /Certificate does not match|TLS handshake failed|closed the connection/, /./);
    } finally {
      await stopPid(s.pid);
    }
  });

  it('X.509 over a unix socket: a qcow2 read through file.driver=nbd from an export of its bytes', async () => {
    const sock = p('x.sock');
    const s = qemuNbdForked(['-t', '-r', '-k', sock, '-x', 'img', '--object', `tls-creds-x509,id=tls0,dir=${x509.srv},endpoint=server`, '--tls-creds', 'tls0', '-f', 'raw', p('d.qcow2')], p('xu.pid'));
    try {
      const opts = `driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=${sock},file.export=img,file.tls-creds=tls0,file.tls-hostname=localhost`;
      // a unix socket has no host name to check the certificate against: tls-hostname is needed
      bothRefuse(['info', ...x509Obj(x509.cli), '--image-opts', opts.replace(',file.tls-hostname=localhost', '')], /^No hostname for certificate validation$/);
      same(['info', ...x509Obj(x509.cli, ',verify-peer=off'), '--image-opts', opts.replace(',file.tls-hostname=localhost', '')]);
      same(['info', ...x509Obj(x509.cli), '--image-opts', opts]);
      same(['map', '--output=json', ...x509Obj(x509.cli), '--image-opts', opts]);
      ok(qimg(['convert', ...x509Obj(x509.cli), '--image-opts', opts, '-O', 'raw', p('xu.raw')]));
      ok(qemuImg(['compare', '-f', 'raw', '-F', 'raw', p('xu.raw'), p('d.raw')]));
    } finally {
      await stopPid(s.pid);
    }
  });

  it('writes over TLS to qimg serve (X.509): convert -n onto the export; qemu-img reads it back over TLS', async () => {
    const port = await freePort();
    ok(qemuImg(['create', '-q', '-f', 'qcow2', p('target.qcow2'), '4M']));
    const s = serveForked(['-t', '-p', String(port), '--object', `tls-creds-x509,id=tls0,dir=${x509.srv},endpoint=server`, '--tls-creds', 'tls0', '-f', 'qcow2', p('target.qcow2')], p('serve.pid'));
    try {
      const opts = `driver=nbd,host=localhost,port=${port},tls-creds=tls0`;
      ok(qimg(['convert', '-n', ...x509Obj(x509.cli), '-f', 'raw', p('d.raw'), '--target-image-opts', opts]));
      ok(qemuImg(['compare', ...x509Obj(x509.cli), '--image-opts', opts, `driver=raw,file.filename=${p('d.raw')}`]), 'qemu-img over TLS');
      expect(ok(qimg(['compare', ...x509Obj(x509.cli), '--image-opts', opts, `driver=raw,file.filename=${p('d.raw')}`])).stdout).toBe('Images are identical.\n');
    } finally {
      await stopPid(s.pid);
    }
    ok(qemuImg(['check', p('target.qcow2')]));
    ok(qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', p('target.qcow2'), p('d.raw')]));
  });

  it('nbd options in --image-opts without TLS: the forms qemu-img takes, its refusals, a server without TLS', async () => {
    const sock = p('plain.sock');
    const s = qemuNbdForked(['-t', '-r', '-k', sock, '-x', 'e1', '-f', 'qcow2', p('d.qcow2')], p('plain.pid'));
    try {
      for (const opts of [`driver=nbd,server.type=unix,server.path=${sock},export=e1`, `driver=nbd,path=${sock},export=e1`, `driver=raw,file.driver=nbd,file.path=${sock},file.export=e1`]) {
        same(['info', '--image-opts', opts]);
        same(['map', '--output=json', '--image-opts', opts]);
      }
      bothRefuse(['info', '--image-opts', `driver=nbd,path=${sock},host=x`], /^path and host may not be used at the same time$/);
      bothRefuse(['info', '--image-opts', `driver=nbd,server.type=unix,path=${sock}`], /^Cannot use 'server' and path\/host\/port at the same time$/);
      bothRefuse(['info', '--image-opts', 'driver=nbd,server.type=unix'], /^Parameter 'path' is missing$/);
      bothRefuse(['info', '--image-opts', 'driver=nbd,server.type=inet,server.port=1'], /^Parameter 'host' is missing$/);
      bothRefuse(['info', '--image-opts', 'driver=nbd'], /^NBD server address missing$/);
      bothRefuse(['info', '--image-opts', `driver=nbd,path=${sock},export=e1,bogus=1`], /^Block protocol 'nbd' doesn't support the option 'bogus'$/);
      // credentials for a server that has no TLS
      bothRefuse(['info', ...pskObj(), '--image-opts', `driver=nbd,path=${sock},export=e1,tls-creds=tls0`], /does not support TLS.*TLS not configured/, /Denied by server for option 5 \(starttls\)/);
    } finally {
      await stopPid(s.pid);
    }
  });
});
