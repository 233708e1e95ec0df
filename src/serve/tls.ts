/**
 * TLS for the NBD server, from QEMU's credential objects: `tls-creds-psk` (DIR/keys.psk
 * holds `username:hexkey` lines; TLS 1.2 PSK suites, as GnuTLS clients such as
 * qemu-img negotiate them) and `tls-creds-x509` (DIR/ca-cert.pem, server-cert.pem,
 * server-key.pem; client certificates required and checked against the CA unless
 * verify-peer=off, QEMU's default being on).
 */
import type { Duplex } from 'node:stream';
import * as tls from 'node:tls';
import { parsePskFile, readCredsFile, type TlsCredsSpec } from '../io/tls-creds.js';

export type { TlsCredsSpec } from '../io/tls-creds.js';

/** A TLS handshake that has not finished in this time drops the connection. */
const TLS_HANDSHAKE_TIMEOUT_MS = 10_000;

export class TlsServerCreds {
  private constructor(private readonly options: tls.TLSSocketOptions) {}

  /** Loads the credentials from their directory (QEMU's file names); errors name the file. */
  static load(spec: TlsCredsSpec): TlsServerCreds {
    const read = (name: string): Buffer => readCredsFile(spec, name);
    if (spec.type === 'tls-creds-psk') {
      const keys = parsePskFile(read('keys.psk').toString('utf8'));
      const secureContext = tls.createSecureContext({ ciphers: 'PSK', minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' });
      return new TlsServerCreds({
        isServer: true,
        secureContext,
        pskCallback: (_socket: tls.TLSSocket, identity: string) => keys.get(identity) ?? null,
      } as tls.TLSSocketOptions);
    }
    const secureContext = tls.createSecureContext({
      ca: read('ca-cert.pem'),
      cert: read('server-cert.pem'),
      key: read('server-key.pem'),
      minVersion: 'TLSv1.2',
    });
    return new TlsServerCreds({ isServer: true, secureContext, requestCert: spec.verifyPeer, rejectUnauthorized: spec.verifyPeer });
  }

  /** Runs the server side of the TLS handshake over `socket`; rejects if it fails. */
  upgrade(socket: Duplex): Promise<tls.TLSSocket> {
    return new Promise((resolve, reject) => {
      const secure = new tls.TLSSocket(socket, this.options);
      const timer = setTimeout(() => fail(new Error('TLS handshake timed out')), TLS_HANDSHAKE_TIMEOUT_MS);
      const fail = (err: Error) => {
        clearTimeout(timer);
        secure.destroy();
        socket.destroy();
        reject(err);
      };
      secure.once('error', fail);
      secure.once('secure', () => {
        clearTimeout(timer);
        secure.off('error', fail);
        resolve(secure);
      });
    });
  }
}
