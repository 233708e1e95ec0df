/**
 * TLS credential directories laid out as QEMU's tls-creds objects read them: a PSK
 * keys.psk, and an X.509 CA with a server certificate for 127.0.0.1/localhost (srv/),
 * a client certificate (cli/) and the CA alone (nocert/). Made with openssl.
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { ok, run } from './qemu.js';

/** DIR/keys.psk with one random key per user. */
export function makePskDir(dir: string, users: string[] = ['alice']): void {
  mkdirSync(dir, { recursive: true });
  writeFileSync(`${dir}/keys.psk`, users.map((u) => `${u}:${randomBytes(32).toString('hex')}\n`).join(''));
}

/** DIR/srv (server-cert.pem, server-key.pem, ca-cert.pem), DIR/cli (client-*.pem, ca-cert.pem), DIR/nocert (ca-cert.pem). */
export function makeX509Dirs(x: string): { srv: string; cli: string; nocert: string } {
  for (const d of ['', '/srv', '/cli', '/nocert']) mkdirSync(x + d, { recursive: true });
  writeFileSync(
    `${x}/ext.cnf`,
    [
      '[srv]',
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature,keyEncipherment',
      'extendedKeyUsage=serverAuth',
      'subjectAltName=IP:127.0.0.1,DNS:localhost',
      '[cli]',
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature,keyEncipherment',
      'extendedKeyUsage=clientAuth',
      '',
    ].join('\n'),
  );
  const openssl = (args: string[]) => ok(run('openssl', args, { cwd: x }), `openssl ${args[0]}`);
  openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=qimg test CA', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  for (const [who, cert, key] of [['srv', 'server-cert.pem', 'server-key.pem'], ['cli', 'client-cert.pem', 'client-key.pem']]) {
    openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${who}/${key}`, '-out', `${who}.csr`, '-subj', `/CN=${who}`]);
    openssl(['x509', '-req', '-in', `${who}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${who}/${cert}`, '-days', '2', '-extfile', 'ext.cnf', '-extensions', who]);
    writeFileSync(`${x}/${who}/ca-cert.pem`, readFileSync(`${x}/ca-cert.pem`));
  }
  writeFileSync(`${x}/nocert/ca-cert.pem`, readFileSync(`${x}/ca-cert.pem`));
  return { srv: `${x}/srv`, cli: `${x}/cli`, nocert: `${x}/nocert` };
}
