/**
 * The certificate authorities HTTPS sources trust: Node's bundled roots, the system's
 * bundle (where an administrator adds a company CA, and what qemu's curl trusts) or
 * the one SSL_CERT_FILE names, and NODE_EXTRA_CA_CERTS. Node alone trusts only its
 * bundled roots (Node 20 has no option for the system store).
 */
import { readFileSync } from 'node:fs';
import type * as Tls from 'node:tls';

/** Where Linux distributions keep the system bundle (Debian/Ubuntu, Fedora/RHEL, Alpine/others). */
const SYSTEM_BUNDLES = ['/etc/ssl/certs/ca-certificates.crt', '/etc/pki/tls/certs/ca-bundle.crt', '/etc/ssl/cert.pem'];

let cached: string[] | undefined;

/** The CA list for https requests (read once per process). */
export function trustedCertificates(env: NodeJS.ProcessEnv = process.env): string[] {
  if (cached) return cached;
  const list = [...(process.getBuiltinModule('node:tls') as typeof Tls).rootCertificates];
  const system = env.SSL_CERT_FILE ? [env.SSL_CERT_FILE] : SYSTEM_BUNDLES;
  for (const file of system) {
    const pem = readPem(file);
    if (pem) {
      list.push(pem);
      break;
    }
  }
  // an explicit CA list replaces Node's default store, extras included: add them back
  const extra = env.NODE_EXTRA_CA_CERTS ? readPem(env.NODE_EXTRA_CA_CERTS) : undefined;
  if (extra) list.push(extra);
  cached = list;
  return list;
}

function readPem(file: string): string | undefined {
  try {
    const text = readFileSync(file, 'utf8');
    return text.includes('-----BEGIN CERTIFICATE-----') ? text : undefined;
  } catch {
    return undefined;
  }
}
