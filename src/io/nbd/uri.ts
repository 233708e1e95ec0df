/**
 * The names that denote an NBD export, as qemu accepts them:
 *   nbd://HOST[:PORT][/EXPORT]        (also nbd+tcp://)
 *   nbd+unix:///EXPORT?socket=PATH
 *   nbd:HOST:PORT[:exportname=NAME]   (qemu's legacy syntax)
 *   nbd:unix:PATH[:exportname=NAME]
 * Errors read as qemu's ("No valid URL specified", "Unknown protocol 'nbds'").
 */
import { QimgError } from '../../core/errors.js';
import { NBD_DEFAULT_PORT, NBD_MAX_STRING } from './protocol.js';

/** Where an export is and what it is called. */
export type NbdAddress =
  | { transport: 'tcp'; host: string; port: number; exportName: string }
  | { transport: 'unix'; socket: string; exportName: string };

/** Parses an NBD name; throws a QimgError worded as qemu's when it is malformed. */
export function parseNbdName(name: string): NbdAddress {
  // (a name read from an image may hold anything; no address holds control characters)
  // eslint-disable-next-line no-control-regex
  if (/[\x00-\x1f\x7f]/.test(name)) throw invalidUrl(name);
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(name)?.[1]?.toLowerCase();
  if (scheme === 'nbd' && !name.slice(4).startsWith('//')) return parseLegacy(name);
  if (scheme !== 'nbd' && scheme !== 'nbd+tcp' && scheme !== 'nbd+unix') {
    throw openError(name, `Unknown protocol '${scheme ?? name}'`);
  }
  const rest = name.slice(scheme.length + 1);
  if (!rest.startsWith('//')) throw invalidUrl(name);
  const m = /^\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?$/.exec(rest);
  if (!m) throw invalidUrl(name);
  const [, authority, path, query] = m;
  const exportName = decode(name, path.startsWith('/') ? path.slice(1) : path);
  checkExportName(name, exportName);
  if (scheme === 'nbd+unix') {
    // a unix socket URL has no host and exactly one query parameter: socket=PATH
    if (authority !== '' || query === undefined) throw invalidUrl(name);
    const params = query.split('&');
    if (params.length !== 1 || !params[0].startsWith('socket=')) throw invalidUrl(name);
    const socket = decode(name, params[0].slice('socket='.length));
    if (socket === '') throw invalidUrl(name);
    return { transport: 'unix', socket, exportName };
  }
  if (query !== undefined || authority === '') throw invalidUrl(name);
  const hp = /^(?:\[([^\]]+)\]|([^:@[\]]*))(?::(\d*))?$/.exec(authority);
  if (!hp) throw invalidUrl(name);
  const host = hp[1] ?? decode(name, hp[2]);
  if (host === '') throw invalidUrl(name);
  const port = hp[3] === undefined || hp[3] === '' ? NBD_DEFAULT_PORT : Number(hp[3]);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw invalidUrl(name);
  return { transport: 'tcp', host, port, exportName };
}

/** qemu's legacy `nbd:` syntax (no slashes after the colon). */
function parseLegacy(name: string): NbdAddress {
  let spec = name.slice(4);
  let exportName = '';
  const marker = spec.indexOf(':exportname=');
  if (marker >= 0) {
    exportName = spec.slice(marker + ':exportname='.length);
    spec = spec.slice(0, marker);
    checkExportName(name, exportName);
  }
  if (spec === '') throw openError(name, 'NBD server address missing');
  if (spec.startsWith('unix:')) {
    const socket = spec.slice(5);
    if (socket === '') throw openError(name, `error parsing address '${spec}'`);
    return { transport: 'unix', socket, exportName };
  }
  const hp = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d+)$/.exec(spec);
  if (!hp) throw openError(name, `error parsing address '${spec}'`);
  const port = Number(hp[3]);
  if (port < 1 || port > 65535) throw openError(name, `error parsing address '${spec}'`);
  return { transport: 'tcp', host: hp[1] ?? hp[2], port, exportName };
}

/** The address as qemu prints it in connection errors ('HOST:PORT' or the socket path). */
export function describeNbdAddress(addr: NbdAddress): string {
  return addr.transport === 'unix' ? addr.socket : `${addr.host}:${addr.port}`;
}

function checkExportName(name: string, exportName: string): void {
  if (Buffer.byteLength(exportName) > NBD_MAX_STRING) throw openError(name, `export name is longer than ${NBD_MAX_STRING} bytes`);
}

function decode(name: string, text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw invalidUrl(name);
  }
}

function openError(name: string, what: string): QimgError {
  return new QimgError(`Could not open '${name}': ${what}`, { file: name });
}

function invalidUrl(name: string): QimgError {
  return openError(name, 'No valid URL specified');
}
