/**
 * `--object tls-creds-psk|tls-creds-x509,...`: QEMU's TLS credential objects, taken by
 * `serve` (endpoint=server) and by the commands that open NBD exports (endpoint=client,
 * named by `tls-creds=ID` in --image-opts); and `authz-simple` (serve --tls-authz).
 * Refusals are qemu's.
 */
import type { TlsCredsSpec } from '../io/tls-creds.js';
import { ObjectError, parseKeyval, type KvDict } from './object-options.js';

const TLS_TYPES = ['tls-creds-psk', 'tls-creds-x509'] as const;
const MEMBERS: Record<TlsCredsSpec['type'], string[]> = {
  'tls-creds-psk': ['qom-type', 'id', 'dir', 'endpoint', 'verify-peer', 'username', 'priority', 'loaded'],
  'tls-creds-x509': ['qom-type', 'id', 'dir', 'endpoint', 'verify-peer', 'priority', 'loaded', 'sanity-check', 'passwordid'],
};
const BOOL_VALUES = ['on', 'yes', 'true', 'y', 'off', 'no', 'false', 'n'];

/**
 * The --object definitions of TLS credentials apart from the others (secrets, created
 * as every command creates them). With `endpoint` (the server's), credentials for the
 * other endpoint are refused at once; a client checks them when a connection uses them.
 */
export function splitTlsObjects(defs: readonly string[] | undefined, endpoint?: TlsCredsSpec['endpoint']): { tlsSpecs: Map<string, TlsCredsSpec>; others: string[] } {
  const tlsSpecs = new Map<string, TlsCredsSpec>();
  const others: string[] = [];
  for (const def of defs ?? []) {
    let dict: KvDict;
    try {
      const kv = parseKeyval(def, 'qom-type');
      if (kv.help) throw new Error('help');
      dict = kv.dict;
    } catch {
      others.push(def); // the common parser reports it (or answers the help request)
      continue;
    }
    const type = dict.get('qom-type');
    if (!TLS_TYPES.includes(type as TlsCredsSpec['type'])) {
      others.push(def);
      continue;
    }
    const spec = tlsSpec(type as TlsCredsSpec['type'], dict, endpoint);
    if (tlsSpecs.has(spec.id)) throw new ObjectError(`attempt to add duplicate property '${spec.id}' to object (type 'container')`);
    tlsSpecs.set(spec.id, spec);
  }
  return { tlsSpecs, others };
}

function tlsSpec(type: TlsCredsSpec['type'], dict: KvDict, wanted: TlsCredsSpec['endpoint'] | undefined): TlsCredsSpec {
  const str = (key: string): string | undefined => {
    const v = dict.get(key);
    if (v instanceof Map) throw new ObjectError(`Parameters '${key}.*' are unexpected`);
    return v;
  };
  for (const key of dict.keys()) if (!MEMBERS[type].includes(key)) throw new ObjectError(`Parameter '${key}' is unexpected`);
  const id = str('id');
  if (id === undefined) throw new ObjectError("Parameter 'id' is missing");
  const dir = str('dir');
  if (dir === undefined) throw new ObjectError(`${type}: Missing 'dir' property value`);
  const endpoint = str('endpoint') ?? 'client';
  if (endpoint !== 'server' && endpoint !== 'client') throw new ObjectError(`Parameter 'endpoint' does not accept value '${endpoint}'`);
  if (wanted !== undefined && endpoint !== wanted) throw new ObjectError(`Expecting TLS credentials with a ${wanted} endpoint`);
  const verify = str('verify-peer') ?? 'on';
  if (!BOOL_VALUES.includes(verify)) throw new ObjectError("Parameter 'verify-peer' expects 'on' or 'off'");
  const username = str('username');
  if (username !== undefined && endpoint === 'server') throw new ObjectError('username should not be set when endpoint=server');
  return { type, id, dir, endpoint, verifyPeer: ['on', 'yes', 'true', 'y'].includes(verify), ...(username !== undefined ? { username } : {}) };
}

/**
 * The `authz-simple,id=ID,identity=NAME` objects among `defs` (serve --tls-authz): the
 * identity a TLS client must have (its certificate's distinguished name, or its PSK
 * username); the other definitions are returned as they are.
 */
export function splitAuthzObjects(defs: readonly string[]): { authz: Map<string, string>; others: string[] } {
  const authz = new Map<string, string>();
  const others: string[] = [];
  for (const def of defs) {
    let dict: KvDict;
    try {
      const kv = parseKeyval(def, 'qom-type');
      if (kv.help) throw new Error('help');
      dict = kv.dict;
    } catch {
      others.push(def);
      continue;
    }
    if (dict.get('qom-type') !== 'authz-simple') {
      others.push(def);
      continue;
    }
    for (const key of dict.keys()) if (!['qom-type', 'id', 'identity'].includes(key)) throw new ObjectError(`Parameter '${key}' is unexpected`);
    const id = dict.get('id');
    const identity = dict.get('identity');
    if (typeof id !== 'string') throw new ObjectError("Parameter 'id' is missing");
    if (typeof identity !== 'string') throw new ObjectError("Parameter 'identity' is missing");
    if (authz.has(id)) throw new ObjectError(`attempt to add duplicate property '${id}' to object (type 'container')`);
    authz.set(id, identity);
  }
  return { authz, others };
}
