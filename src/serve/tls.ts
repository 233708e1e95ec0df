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
  /** the PSK identity each session's client gave */
  private readonly pskIdentities = new WeakMap<tls.TLSSocket, string>();

  private constructor(
    private readonly options: tls.TLSSocketOptions,
    private readonly kind: 'psk' | 'x509',
    /** --tls-authz with an authz-simple object: the one client identity let in */
    private readonly allowedIdentity?: string,
  ) {}

  /** Loads the credentials from their directory (QEMU's file names); errors name the file. */
  static load(spec: TlsCredsSpec, allowedIdentity?: string): TlsServerCreds {
    const read = (name: string): Buffer => readCredsFile(spec, name);
    if (spec.type === 'tls-creds-psk') {
      const keys = parsePskFile(read('keys.psk').toString('utf8'));
      const secureContext = tls.createSecureContext({ ciphers: 'PSK', minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2' });
      const creds: TlsServerCreds = new TlsServerCreds(
        {
          isServer: true,
          secureContext,
          pskCallback: (socket: tls.TLSSocket, identity: string) => {
            creds.pskIdentities.set(socket, identity);
            return keys.get(identity) ?? null;
          },
        } as tls.TLSSocketOptions,
        'psk',
        allowedIdentity,
      );
      return creds;
    }
    const secureContext = tls.createSecureContext({
      ca: read('ca-cert.pem'),
      cert: read('server-cert.pem'),
      key: read('server-key.pem'),
      minVersion: 'TLSv1.2',
    });
    // an authorization check needs the client's certificate even when verify-peer is off
    const requestCert = spec.verifyPeer || allowedIdentity !== undefined;
    return new TlsServerCreds({ isServer: true, secureContext, requestCert, rejectUnauthorized: spec.verifyPeer }, 'x509', allowedIdentity);
  }

  /** The client identity --tls-authz checks (QEMU's: the PSK username, or the certificate's DN as GnuTLS writes it), or why it is refused. */
  private refusal(secure: tls.TLSSocket): string | undefined {
    if (this.allowedIdentity === undefined) return undefined;
    if (this.kind === 'psk') {
      const who = this.pskIdentities.get(secure) ?? '';
      return who === this.allowedIdentity ? undefined : `TLS PSK authz check for ${who} is denied`;
    }
    const cert = secure.getPeerX509Certificate();
    // Node lists the subject's attributes in certificate order, one per line; GnuTLS
    // (and so QEMU) writes them in RFC 4514 order, last first, separated by commas
    const dn = cert ? cert.subject.split('\n').reverse().join(',') : '';
    return dn === this.allowedIdentity ? undefined : `TLS x509 authz check for ${dn} is denied`;
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
        const denied = this.refusal(secure);
        if (denied !== undefined) return fail(new Error(denied));
        clearTimeout(timer);
        secure.off('error', fail);
        resolve(secure);
      });
    });
  }
}
