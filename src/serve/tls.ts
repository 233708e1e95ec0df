/**
 * TLS for the NBD server, from QEMU's credential objects: `tls-creds-psk` (DIR/keys.psk
 * holds `username:hexkey` lines; TLS 1.2 PSK suites, as GnuTLS clients such as
 * qemu-img negotiate them) and `tls-creds-x509` (DIR/ca-cert.pem, server-cert.pem,
 * server-key.pem; client certificates required and checked against the CA unless
 * verify-peer=off, QEMU's default being on).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import * as tls from 'node:tls';
import { QimgError, describeSystemError } from '../core/errors.js';

export interface TlsCredsSpec {
  type: 'tls-creds-psk' | 'tls-creds-x509';
  id: string;
  dir: string;
  verifyPeer: boolean;
}

/** A TLS handshake that has not finished in this time drops the connection. */
const TLS_HANDSHAKE_TIMEOUT_MS = 10_000;

export class TlsServerCreds {
  private constructor(private readonly options: tls.TLSSocketOptions) {}

  /** Loads the credentials from their directory (QEMU's file names); errors name the file. */
  static load(spec: TlsCredsSpec): TlsServerCreds {
    const read = (name: string): Buffer => {
      const path = join(spec.dir, name);
      try {
        return readFileSync(path);
      } catch (err) {
        throw new QimgError(`Unable to access credentials ${path}: ${describeSystemError(err)}`, { file: '' });
      }
    };
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

/** `username:hexkey` lines (QEMU's keys.psk); a bad line is refused. */
export function parsePskFile(text: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  for (const line of text.split('\n')) {
    const l = line.trim();
    if (l === '') continue;
    const colon = l.indexOf(':');
    const key = l.slice(colon + 1);
    if (colon <= 0 || !/^([0-9a-fA-F]{2})+$/.test(key)) throw new QimgError('Invalid line in PSK credentials file keys.psk', { file: '' });
    keys.set(l.slice(0, colon), Buffer.from(key, 'hex'));
  }
  if (keys.size === 0) throw new QimgError('No keys in PSK credentials file keys.psk', { file: '' });
  return keys;
}
