/**
 * `--object tls-creds-psk|tls-creds-x509,...`: QEMU's TLS credential objects, taken by
 * `serve` (endpoint=server) and by the commands that open NBD exports (endpoint=client,
 * named by `tls-creds=ID` in --image-opts); and `authz-simple` (serve --tls-authz).
 * Refusals are qemu's.
 */
import type { TlsCredsSpec } from '../io/tls-creds.js';
import { ObjectError, parseKeyval, type KvDict } from './object-options.js';

const TLS_TYPES: readonly string[] = ['tls-creds-psk', 'tls-creds-x509'];
const MEMBERS: Record<TlsCredsSpec['type'], string[]> = {
  'tls-creds-psk': ['qom-type', 'id', 'dir', 'endpoint', 'verify-peer', 'username', 'priority', 'loaded'],
  'tls-creds-x509': ['qom-type', 'id', 'dir', 'endpoint', 'verify-peer', 'priority', 'loaded', 'sanity-check', 'passwordid'],
};
const BOOL_VALUES = ['on', 'yes', 'true', 'y', 'off', 'no', 'false', 'n'];

/**
 * The --object definitions whose type is one of `types`, built by `build` and keyed by
 * their id, apart from the others (definitions that do not parse, or help requests, are
 * left to the common parser with the others).
 */
function takeObjects<T>(defs: readonly string[] | undefined, types: readonly string[], build: (type: string, dict: KvDict) => { id: string; value: T }): { taken: Map<string, T>; others: string[] } {
  const taken = new Map<string, T>();
  const others: string[] = [];
  for (const def of defs ?? []) {
    let dict: KvDict;
    try {
      const kv = parseKeyval(def, 'qom-type');
      if (kv.help) throw new Error('help');
      dict = kv.dict;
    } catch {
      others.push(def);
      continue;
    }
    const type = dict.get('qom-type');
    if (typeof type !== 'string' || !types.includes(type)) {
      others.push(def);
      continue;
    }
    const { id, value } = build(type, dict);
    if (taken.has(id)) throw new ObjectError(`attempt to add duplicate property '${id}' to object (type 'container')`);
    taken.set(id, value);
  }
  return { taken, others };
}

/**
 * The --object definitions of TLS credentials apart from the others (secrets, created
 * as every command creates them). With `endpoint` (the server's), credentials for the
 * other endpoint are refused at once; a client checks them when a connection uses them.
 */
export function splitTlsObjects(defs: readonly string[] | undefined, endpoint?: TlsCredsSpec['endpoint']): { tlsSpecs: Map<string, TlsCredsSpec>; others: string[] } {
  const { taken, others } = takeObjects(defs, TLS_TYPES, (type, dict) => {
    const spec = tlsSpec(type as TlsCredsSpec['type'], dict, endpoint);
    return { id: spec.id, value: spec };
  });
  return { tlsSpecs: taken, others };
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
  const { taken, others } = takeObjects(defs, ['authz-simple'], (_type, dict) => {
    for (const key of dict.keys()) if (!['qom-type', 'id', 'identity'].includes(key)) throw new ObjectError(`Parameter '${key}' is unexpected`);
    const id = dict.get('id');
    const identity = dict.get('identity');
    if (typeof id !== 'string') throw new ObjectError("Parameter 'id' is missing");
    if (typeof identity !== 'string') throw new ObjectError("Parameter 'identity' is missing");
    return { id, value: identity };
  });
  return { authz: taken, others };
}
