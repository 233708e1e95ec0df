/**
 * The NBD names qimg opens (src/io/nbd/uri.ts): URLs and qemu's legacy `nbd:` syntax,
 * and the refusals worded as qemu-img words them (checked against qemu-img 7.2:
 * `qemu-img info NAME` on each bad name).
 */
import { describe, expect, it } from 'vitest';
import { parseNbdName, describeNbdAddress } from '../../src/io/nbd/uri.js';
import { isNbdName, isRemoteName } from '../../src/io/remote.js';

describe('NBD names', () => {
  it('parses nbd:// and nbd+tcp:// URLs with the default port and export', () => {
    expect(parseNbdName('nbd://localhost')).toEqual({ transport: 'tcp', host: 'localhost', port: 10809, exportName: '' });
    expect(parseNbdName('nbd://127.0.0.1:10900/disk')).toEqual({ transport: 'tcp', host: '127.0.0.1', port: 10900, exportName: 'disk' });
    expect(parseNbdName('nbd+tcp://host:1/a/b')).toEqual({ transport: 'tcp', host: 'host', port: 1, exportName: 'a/b' });
    expect(parseNbdName('nbd://[::1]:2000/x')).toEqual({ transport: 'tcp', host: '::1', port: 2000, exportName: 'x' });
    expect(parseNbdName('nbd://%41/my%20disk')).toEqual({ transport: 'tcp', host: 'A', port: 10809, exportName: 'my disk' });
    expect(parseNbdName('nbd://h:/')).toEqual({ transport: 'tcp', host: 'h', port: 10809, exportName: '' });
  });

  it('parses nbd+unix:// URLs with their socket', () => {
    expect(parseNbdName('nbd+unix:///exp?socket=/tmp/s.sock')).toEqual({ transport: 'unix', socket: '/tmp/s.sock', exportName: 'exp' });
    expect(parseNbdName('nbd+unix://?socket=/run/a%20b')).toEqual({ transport: 'unix', socket: '/run/a b', exportName: '' });
  });

  it("parses qemu's legacy nbd: syntax", () => {
    expect(parseNbdName('nbd:localhost:10809')).toEqual({ transport: 'tcp', host: 'localhost', port: 10809, exportName: '' });
    expect(parseNbdName('nbd:h:1:exportname=disk')).toEqual({ transport: 'tcp', host: 'h', port: 1, exportName: 'disk' });
    expect(parseNbdName('nbd:[::1]:99')).toEqual({ transport: 'tcp', host: '::1', port: 99, exportName: '' });
    expect(parseNbdName('nbd:unix:/tmp/s.sock')).toEqual({ transport: 'unix', socket: '/tmp/s.sock', exportName: '' });
    expect(parseNbdName('nbd:unix:/tmp/s.sock:exportname=e:x')).toEqual({ transport: 'unix', socket: '/tmp/s.sock', exportName: 'e:x' });
  });

  it('refuses malformed names as qemu-img does', () => {
    const bad: Array<[string, string]> = [
      ['nbd://', 'No valid URL specified'],
      ['nbd://localhost:abc', 'No valid URL specified'],
      ['nbd://localhost:99999/x', 'No valid URL specified'],
      ['nbd+unix:///exp', 'No valid URL specified'],
      ['nbd+unix://host/exp?socket=/x', 'No valid URL specified'],
      ['nbd://h/e?socket=/x', 'No valid URL specified'],
      ['nbd+unix:///e?socket=/x&foo=1', 'No valid URL specified'],
      ['nbd:', 'NBD server address missing'],
      ['nbd:localhost', "error parsing address 'localhost'"],
      ['nbds://localhost', "Unknown protocol 'nbds'"],
      ['nbd+foo://x', "Unknown protocol 'nbd+foo'"],
      // names read from images may hold anything: no address has control characters
      ['nbd+unix:///x?socket=/s\0junk', 'No valid URL specified'],
      ['nbd://a\tb', 'No valid URL specified'],
    ];
    for (const [name, message] of bad) {
      expect(() => parseNbdName(name), name).toThrow(`Could not open '${name}': ${message}`);
    }
  });

  it('names addresses as qemu prints them in connection errors', () => {
    expect(describeNbdAddress(parseNbdName('nbd://127.0.0.1:1/x'))).toBe('127.0.0.1:1');
    expect(describeNbdAddress(parseNbdName('nbd://[::1]:1/x'))).toBe('::1:1');
    expect(describeNbdAddress(parseNbdName('nbd:unix:/tmp/s'))).toBe('/tmp/s');
  });

  it('tells NBD names from local paths', () => {
    for (const n of ['nbd://h', 'NBD://h', 'nbd+unix:///?socket=/s', 'nbd:h:1', 'nbd+tcp://h']) expect(isNbdName(n), n).toBe(true);
    for (const n of ['nbd.img', './nbd:x', '/tmp/nbd://x', 'disk.qcow2']) expect(isRemoteName(n), n).toBe(false);
  });
});
