/**
 * TLS for the NBD client (NBD_OPT_STARTTLS, then a TLS session over the same socket),
 * from QEMU's credential objects with endpoint=client: `tls-creds-psk` (the identity
 * `username`, QEMU's default "qemu", and its key from DIR/keys.psk; TLS 1.2 PSK suites,
 * as qemu-nbd and qimg serve offer them) and `tls-creds-x509` (DIR/ca-cert.pem checks
 * the server's certificate and its name unless verify-peer=off; DIR/client-cert.pem and
 * client-key.pem, when present, are shown to servers that ask for a certificate).
 */
import { isIP, type Socket } from 'node:net';
import { join } from 'node:path';
import * as tls from 'node:tls';
import { QimgError } from '../../core/errors.js';
import { parsePskFile, readCredsFile, readOptionalCredsFile, type TlsCredsSpec } from '../tls-creds.js';
import { NbdError } from './errors.js';

export interface NbdClientTls {
  creds: TlsCredsSpec;
  /** the name the server's certificate must carry (`tls-hostname`); else the host connected to */
  hostname?: string;
}

/** The identity a PSK client sends when the object names none (QEMU's). */
const DEFAULT_PSK_USERNAME = 'qemu';

/** The TLS options the credentials give (files read now: a missing one is named). */
function connectOptions(t: NbdClientTls, host: string | undefined): tls.ConnectionOptions {
  const { creds } = t;
  if (creds.endpoint !== 'client') throw new QimgError('Expected TLS credentials for a client endpoint', { file: '' });
  if (creds.type === 'tls-creds-psk') {
    const username = creds.username ?? DEFAULT_PSK_USERNAME;
    const key = parsePskFile(readCredsFile(creds, 'keys.psk').toString('utf8')).get(username);
    if (!key) throw new QimgError(`Username ${username} not found in PSK file ${join(creds.dir, 'keys.psk')}`, { file: '' });
    return {
      ciphers: 'PSK',
      minVersion: 'TLSv1.2',
      maxVersion: 'TLSv1.2',
      pskCallback: () => ({ psk: key, identity: username }),
      // a PSK session proves the server by the key: there is no certificate to check
      checkServerIdentity: () => undefined,
    };
  }
  const cert = readOptionalCredsFile(creds, 'client-cert.pem');
  const key = readOptionalCredsFile(creds, 'client-key.pem');
  if ((cert === undefined) !== (key === undefined)) throw new QimgError(`Unable to access credentials ${creds.dir}/${cert ? 'client-key.pem' : 'client-cert.pem'}: No such file or directory`, { file: '' });
  const hostname = t.hostname ?? host;
  // a unix socket has no host: the certificate's name needs tls-hostname (qemu's rule)
  if (creds.verifyPeer && hostname === undefined) throw new QimgError('No hostname for certificate validation', { file: '' });
  return {
    ca: readCredsFile(creds, 'ca-cert.pem'),
    ...(cert && key ? { cert, key } : {}),
    minVersion: 'TLSv1.2',
    rejectUnauthorized: creds.verifyPeer,
    // SNI carries names only; an address is still checked against the certificate
    ...(hostname !== undefined && isIP(hostname) === 0 ? { servername: hostname } : {}),
    checkServerIdentity: (_: string, peer: tls.PeerCertificate) => {
      if (!creds.verifyPeer || hostname === undefined || !tls.checkServerIdentity(hostname, peer)) return undefined;
      return new NbdError(`Certificate does not match the hostname ${hostname}`);
    },
  };
}

/**
 * Runs the client side of the TLS handshake over `socket` (after the server accepted
 * NBD_OPT_STARTTLS); `host` is the TCP host connected to (undefined for a unix socket).
 * Rejects with the reason the handshake failed.
 */
export function startClientTls(socket: Socket, t: NbdClientTls, host: string | undefined): Promise<tls.TLSSocket> {
  const options = connectOptions(t, host);
  return new Promise((resolve, reject) => {
    const secure = tls.connect({ ...options, socket });
    const fail = (err: Error) => {
      secure.destroy();
      reject(err instanceof NbdError ? err : new NbdError(`TLS handshake failed: ${err.message}`));
    };
    secure.once('error', fail);
    secure.once('close', () => fail(new Error('the server closed the connection')));
    secure.once('secureConnect', () => {
      secure.off('error', fail);
      secure.removeAllListeners('close');
      resolve(secure);
    });
  });
}
