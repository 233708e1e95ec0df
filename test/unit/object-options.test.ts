/**
 * --object and --image-opts parsing: qemu's keyval and QemuOpts syntax (escapes,
 * implied keys, repeated keys), the secret object's value (raw, base64, file=,
 * keyid=/iv= decryption) and qemu's messages for every refusal; the secrets store
 * is emptied when a command ends.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { createCipheriv, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SecretStore } from '../../src/core/secrets.js';
import {
  OBJECT_LIST_HELP,
  SECRET_HELP,
  addObject,
  addObjects,
  decodeBase64Buffer,
  maskSecretData,
  objectHelp,
  parseKeyval,
} from '../../src/cli/object-options.js';
import { displayName, parseQemuOpts } from '../../src/cli/commands/image-opts.js';
import { withObjects } from '../../src/cli/commands/common.js';
import { tempDir } from '../helpers/qemu.js';

const tmp = tempDir('qimg-objopts-');
afterAll(() => tmp.cleanup());

/** The secret `def` defines (after `before`), as text. */
function secretOf(def: string, before: string[] = []): string {
  const store = new SecretStore();
  addObjects(store, [...before, def]);
  const id = /(?:^|,)id=([^,]*)/.exec(def)![1];
  return store.get(id).toString('latin1');
}

function refusal(defs: string[]): string {
  const store = new SecretStore();
  try {
    addObjects(store, defs);
  } catch (err) {
    return (err as Error).message;
  } finally {
    store.destroy();
  }
  throw new Error(`accepted: ${defs.join(' ')}`);
}

describe('keyval syntax (--object)', () => {
  it('an implied first key, ,, for a comma, dotted keys nesting, the last repeated key winning', () => {
    const kv = parseKeyval('secret,id=s0,data=a,,b,,,,c,x.y=1,x.z=2,data=last', 'qom-type');
    expect(kv.dict.get('qom-type')).toBe('secret');
    expect(kv.dict.get('data')).toBe('last');
    expect(kv.dict.get('x')).toEqual(new Map([['y', '1'], ['z', '2']]));
    expect(parseKeyval('secret,id=s0,data=a,,b', 'qom-type').dict.get('data')).toBe('a,b');
    expect(parseKeyval('qom-type=secret,id=a', 'qom-type').dict.get('qom-type')).toBe('secret');
    expect(parseKeyval('secret,id=a,', 'qom-type').dict.size).toBe(2);
  });

  it('help and ? anywhere ask for help', () => {
    expect(parseKeyval('help', 'qom-type').help).toBe(true);
    expect(parseKeyval('secret,?', 'qom-type').help).toBe(true);
    expect(parseKeyval('secret,id=x,help', 'qom-type').help).toBe(true);
    expect(parseKeyval('secret,id=help', 'qom-type').help).toBe(false);
  });

  it("refuses bad keys with qemu's messages", () => {
    expect(() => parseKeyval('secret,,x,id=a', 'qom-type')).toThrow("Invalid parameter ''");
    expect(() => parseKeyval('secret,id=a,1x=1', 'qom-type')).toThrow("Invalid parameter '1x'");
    expect(() => parseKeyval('secret,id=a,x', 'qom-type')).toThrow("Expected '=' after parameter 'x'");
    expect(() => parseKeyval('help,secret', 'qom-type')).toThrow("Expected '=' after parameter 'secret'");
    expect(() => parseKeyval('secret,a=1,a.b=2', 'qom-type')).toThrow("Parameters 'a.*' used inconsistently");
    expect(() => parseKeyval(`secret,${'k'.repeat(128)}=1`, 'qom-type')).toThrow(`Parameter '${'k'.repeat(128)}' is too long`);
  });

  it('masks what follows an unescaped comma in data= (a piece of the secret)', () => {
    expect(() => parseKeyval('secret,id=a,data=pass,word', 'qom-type')).toThrow("Expected '=' after parameter '***'");
    expect(refusal(['secret,id=a,data=pass,word=x'])).toBe("Parameter '***' is unexpected");
    expect(maskSecretData('--objects=secret,id=a,data=pa,,ss,format=raw')).toBe('--objects=secret,id=a,data=***,format=raw');
  });
});

describe('secret objects', () => {
  it('data= as given, format=base64 decoded (glib: partial quartets dropped, newlines skipped)', () => {
    expect(secretOf('secret,id=s0,data=hunter2')).toBe('hunter2');
    expect(secretOf('secret,id=s0,data=a,,b,format=raw')).toBe('a,b');
    expect(secretOf('secret,id=s0,data=')).toBe('');
    expect(secretOf('secret,id=s0,data=aHVudGVyMg==,format=base64')).toBe('hunter2');
    expect(decodeBase64Buffer(Buffer.from('YWJ')).length).toBe(0);
    expect(decodeBase64Buffer(Buffer.from('YW\nJj\n')).toString()).toBe('abc');
    expect(decodeBase64Buffer(Buffer.from('YQ==YWJj')).toString()).toBe('aabc');
  });

  it('file= is the whole file, trailing newline included; base64 files decoded', () => {
    const plain = join(tmp.path, 'plain');
    writeFileSync(plain, 'from a file\n');
    expect(secretOf(`secret,id=f,file=${plain}`)).toBe('from a file\n');
    const b64 = join(tmp.path, 'b64');
    writeFileSync(b64, Buffer.from('bin\x00ary').toString('base64') + '\n');
    expect(secretOf(`secret,id=f,file=${b64},format=base64`)).toBe('bin\x00ary');
    const nul = join(tmp.path, 'nul');
    writeFileSync(nul, 'YWJj\x00');
    expect(refusal([`secret,id=f,file=${nul},format=base64`])).toBe('Base64 data contains embedded NUL characters');
    expect(refusal([`secret,id=f,file=${join(tmp.path, 'none')}`])).toBe(
      `Unable to read ${join(tmp.path, 'none')}: Failed to open file \u201c${join(tmp.path, 'none')}\u201d: No such file or directory`,
    );
    expect(refusal([`secret,id=f,file=${tmp.path}`])).toBe(`Unable to read ${tmp.path}: Error reading file \u201c${tmp.path}\u201d: Is a directory`);
  });

  it('keyid= and iv= decrypt AES-256-CBC under another secret (a vector made with node:crypto)', () => {
    const key = randomBytes(32);
    const iv = randomBytes(16);
    const cipher = createCipheriv('aes-256-cbc', key, iv);
    const ct = Buffer.concat([cipher.update('the real passphrase'), cipher.final()]);
    const master = `secret,id=master,data=${key.toString('base64')},format=base64`;
    expect(secretOf(`secret,id=sec0,data=${ct.toString('base64')},format=base64,keyid=master,iv=${iv.toString('base64')}`, [master])).toBe(
      'the real passphrase',
    );
    // raw ciphertext from a file
    const ctFile = join(tmp.path, 'ct');
    writeFileSync(ctFile, ct);
    expect(secretOf(`secret,id=sec1,file=${ctFile},keyid=master,iv=${iv.toString('base64')}`, [master])).toBe('the real passphrase');
    // qemu only checks the last padding byte
    const noPad = createCipheriv('aes-256-cbc', key, iv).setAutoPadding(false);
    const block = Buffer.concat([noPad.update(Buffer.from('0123456789abcd\x07\x02')), noPad.final()]);
    expect(secretOf(`secret,id=p,data=${block.toString('base64')},format=base64,keyid=master,iv=${iv.toString('base64')}`, [master])).toBe(
      '0123456789abcd',
    );
  });

  it("refuses bad decryption input with qemu's messages", () => {
    const k32 = 'k'.repeat(32);
    const iv0 = 'AAAAAAAAAAAAAAAAAAAAAA==';
    expect(refusal(['secret,id=a,data=1', `secret,id=b,data=x,keyid=a,iv=${iv0}`])).toBe('Key should be 32 bytes in length');
    expect(refusal([`secret,id=a,data=${k32}`, 'secret,id=b,data=x,keyid=a'])).toBe('IV is required to decrypt secret');
    expect(refusal([`secret,id=a,data=${k32}`, 'secret,id=b,data=x,keyid=a,iv=AAAA'])).toBe('IV should be 16 bytes in length not 3');
    expect(refusal([`secret,id=a,data=${k32}`, 'secret,id=b,data=x,keyid=a,iv=%%'])).toBe('Base64 data contains invalid characters');
    expect(refusal([`secret,id=a,data=${k32}`, `secret,id=b,data=x,keyid=a,iv=${iv0}`])).toBe('Length 1 must be a multiple of block size 16');
    expect(refusal([`secret,id=a,data=${k32}`, `secret,id=b,data=${'x'.repeat(16)},keyid=a,iv=${iv0}`])).toBe(
      'Incorrect number of padding bytes (163) found on decrypted data',
    );
    expect(refusal(['secret,id=b,data=x,keyid=k'])).toBe("No secret with id 'k'");
  });

  it("refuses bad objects with qemu's messages, in qemu's order", () => {
    expect(refusal(['foo,id=s0'])).toBe("Parameter 'qom-type' does not accept value 'foo'");
    expect(refusal(['Secret,id=a'])).toBe("Parameter 'qom-type' does not accept value 'Secret'");
    expect(refusal(['id=s0,data=a'])).toBe("Parameter 'qom-type' is missing");
    expect(refusal([''])).toBe("Parameter 'qom-type' is missing");
    expect(refusal(['secret'])).toBe("Parameter 'id' is missing");
    expect(refusal(['secret,data=1,bogus=1'])).toBe("Parameter 'id' is missing");
    expect(refusal(['iothread,id=x'])).toBe('invalid object type: iothread');
    expect(refusal(['iothread'])).toBe("Parameter 'id' is missing");
    expect(refusal(['memory-backend-ram,id=x'])).toBe("Parameter 'size' is missing");
    expect(refusal(['memory-backend-ram,id=x,size=1'])).toBe('invalid object type: memory-backend-ram');
    expect(refusal(['authz-listfile,id=x,filename=f'])).toBe('invalid object type: authz-listfile');
    expect(refusal(['throttle-group,id=x'])).toMatch(/^object type 'throttle-group' is not supported by qimg/);
    expect(refusal(['tls-creds-x509,id=x'])).toMatch(/^object type 'tls-creds-x509' is not supported by qimg/);
    expect(refusal(['secret,id=s0'])).toBe("Either 'file' or 'data' must be provided");
    expect(refusal(['secret,id=s0,data=a,file=/etc/hostname'])).toBe("'file' and 'data' are mutually exclusive");
    expect(refusal(['secret,id=s0,bogus=1'])).toBe("Parameter 'bogus' is unexpected");
    expect(refusal(['secret,id=a,bogus.x=1,data=1'])).toBe("Parameter 'bogus' is unexpected");
    expect(refusal(['secret,id=a,data.x=1'])).toBe("Parameters 'data.*' are unexpected");
    expect(refusal(['secret,id=s0,data=a,format=hex'])).toBe("Parameter 'format' does not accept value 'hex'");
    expect(refusal(['secret,id=s0,data=%%%,format=base64'])).toBe('Base64 data contains invalid characters');
    expect(refusal(['secret,id=s0,data=abc,loaded=on'])).toBe("Property 'secret.loaded' is not writable");
    expect(refusal(['secret,id=1s,data=abc'])).toBe(
      "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
    );
    expect(refusal(['secret,id=1x,bogus=1'])).toBe("Parameter 'bogus' is unexpected");
    expect(refusal(['secret,id=a,data=x', 'secret,id=a,file=/nonexistent'])).toBe("attempt to add duplicate property 'a' to object (type 'container')");
    // an iv without keyid is ignored, as in qemu
    expect(secretOf('secret,id=s.0,data=abc,iv=k')).toBe('abc');
  });

  it('answers help requests as qemu-img (listing only what qimg creates)', () => {
    expect(objectHelp('help')).toBe(OBJECT_LIST_HELP);
    expect(objectHelp('?')).toBe(OBJECT_LIST_HELP);
    expect(objectHelp('foo,help')).toBe(OBJECT_LIST_HELP);
    expect(objectHelp('iothread,help')).toBe(OBJECT_LIST_HELP);
    expect(objectHelp('secret,help')).toBe(SECRET_HELP);
    expect(objectHelp('qom-type=secret,id=x,data=y,help')).toBe(SECRET_HELP);
    expect(objectHelp('throttle-group,help')).toBeUndefined();
    expect(objectHelp('secret,id=x,data=y')).toBeUndefined();
    expect(objectHelp('secret,1x=1,help')).toBeUndefined();
  });

  it('the store refuses a second object with the same id and is empty once the command ends', async () => {
    let seen: SecretStore | undefined;
    await withObjects(['secret,id=a,data=x'], async (s) => {
      seen = s;
      expect(s.get('a').toString()).toBe('x');
    });
    expect(seen!.has('a')).toBe(false);
    await expect(
      withObjects(['secret,id=b,data=y'], async (s) => {
        seen = s;
        throw new Error('boom');
      }),
    ).rejects.toThrow('boom');
    expect(seen!.has('b')).toBe(false);
    const store = new SecretStore();
    addObject(store, 'secret,id=a,data=x');
    expect(() => addObject(store, 'secret,id=a,data=y')).toThrow("attempt to add duplicate property 'a' to object (type 'container')");
  });
});

describe('QemuOpts syntax (--image-opts)', () => {
  const parse = (text: string) => {
    const warnings: string[] = [];
    return { opts: parseQemuOpts(text, 'file', (w) => warnings.push(w)), warnings };
  };

  it('key=value with ,, escapes; an implied first key "file"; repeated keys kept in order', () => {
    expect(parse('driver=qcow2,file.filename=a,,b.qcow2,encrypt.key-secret=s0').opts).toEqual([
      ['driver', 'qcow2'],
      ['file.filename', 'a,b.qcow2'],
      ['encrypt.key-secret', 's0'],
    ]);
    expect(parse('x.qcow2').opts).toEqual([['file', 'x.qcow2']]);
    expect(parse('a,,b,driver=raw').opts).toEqual([
      ['file', 'a,b'],
      ['driver', 'raw'],
    ]);
    expect(parse('driver=qcow2,driver=raw,').opts).toEqual([
      ['driver', 'qcow2'],
      ['driver', 'raw'],
    ]);
    expect(parse('driver=qcow2,,x').opts).toEqual([['driver', 'qcow2,x']]);
  });

  it('bare names are deprecated flags (x=on, nox=x=off) with qemu\'s warning; help is not warned about', () => {
    expect(parse('driver=raw,x')).toEqual({ opts: [['driver', 'raw'], ['x', 'on']], warnings: ["short-form boolean option 'x' deprecated\nPlease use x=on instead"] });
    expect(parse('driver=raw,nox').warnings).toEqual(["short-form boolean option 'nox' deprecated\nPlease use x=off instead"]);
    expect(parse('driver=raw,help')).toEqual({ opts: [['driver', 'raw'], ['help', 'on']], warnings: [] });
  });

  it("names an image with strong options as qemu's json: (members in QDict order)", () => {
    expect(displayName('q1.qcow2', 'qcow2', {})).toBe('q1.qcow2');
    expect(displayName('q1.qcow2', 'qcow2', { 'encrypt.format': 'luks' })).toBe('q1.qcow2');
    expect(displayName('/tmp/e1.qcow2', 'qcow2', { 'encrypt.key-secret': 'nope' })).toBe(
      'json:{"encrypt.key-secret": "nope", "driver": "qcow2", "file": {"driver": "file", "filename": "/tmp/e1.qcow2"}}',
    );
    expect(displayName('l1.luks', 'luks', { 'key-secret': 's0' })).toBe('json:{"driver": "luks", "file": {"driver": "file", "filename": "l1.luks"}, "key-secret": "s0"}');
  });
});
