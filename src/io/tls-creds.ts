/**
 * QEMU's TLS credential objects (`--object tls-creds-psk|tls-creds-x509,id=ID,dir=DIR,
 * endpoint=server|client`) as qimg's NBD server and client use them: the files they
 * name in DIR (keys.psk; ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
 * client-key.pem) and the PSK file's `username:hexkey` lines.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { QimgError, describeSystemError } from '../core/errors.js';

export interface TlsCredsSpec {
  type: 'tls-creds-psk' | 'tls-creds-x509';
  id: string;
  dir: string;
  endpoint: 'server' | 'client';
  /** x509: check the peer's certificate (QEMU's default: on) */
  verifyPeer: boolean;
  /** psk, client endpoint: the identity sent (QEMU's default: "qemu") */
  username?: string;
}

/** A credentials file from the object's directory; a missing or unreadable one is named. */
export function readCredsFile(spec: TlsCredsSpec, name: string): Buffer {
  const path = join(spec.dir, name);
  try {
    return readFileSync(path);
  } catch (err) {
    throw new QimgError(`Unable to access credentials ${path}: ${describeSystemError(err)}`, { file: '' });
  }
}

/** An optional credentials file: undefined when it does not exist. */
export function readOptionalCredsFile(spec: TlsCredsSpec, name: string): Buffer | undefined {
  try {
    return readFileSync(join(spec.dir, name));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    return readCredsFile(spec, name);
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
