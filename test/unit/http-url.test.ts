/**
 * HTTP(S) names: what goes on the request line (the query kept byte for byte, dot
 * segments removed as curl does), how relative backing names combine with a URL
 * (qemu's rule, but never against the query string), and the --untrusted origin rule.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { httpDirectoryOf, httpOrigin, parseHttpUrl } from '../../src/io/http-url.js';
import { joinBackingName } from '../../src/core/open.js';
import { assertReferenceAllowed } from '../../src/core/open-policy.js';
import { parseContentRange, parseLength } from '../../src/io/http-client.js';

describe('parseHttpUrl', () => {
  it('keeps a presigned query string exactly and removes dot segments from the path only', () => {
    const t = parseHttpUrl("https://Bucket.s3.example.com/a/./b/../disk.qcow2?X-Amz-Credential=AK%2F1&X-Amz-Signature=ab/../cd+e%3D&x='y'#frag");
    expect(t.protocol).toBe('https:');
    expect(t.hostname).toBe('bucket.s3.example.com');
    expect(t.port).toBe(443);
    expect(t.origin).toBe('https://bucket.s3.example.com');
    expect(t.requestPath).toBe("/a/disk.qcow2?X-Amz-Credential=AK%2F1&X-Amz-Signature=ab/../cd+e%3D&x='y'");
  });

  it('ports, IPv6 literals, user info, an empty path, characters a request line cannot carry', () => {
    expect(parseHttpUrl('http://127.0.0.1:8080').requestPath).toBe('/');
    expect(parseHttpUrl('http://127.0.0.1:80/x').origin).toBe('http://127.0.0.1');
    const v6 = parseHttpUrl('http://[::1]:9000/img');
    expect(v6.hostname).toBe('::1');
    expect(v6.port).toBe(9000);
    const auth = parseHttpUrl('http://me:s%40cret@host/img');
    expect(auth.auth).toBe('me:s@cret');
    expect(auth.hostname).toBe('host');
    expect(parseHttpUrl('http://host/a b/ü.raw?q=a b').requestPath).toBe('/a%20b/%C3%BC.raw?q=a%20b');
    expect(() => parseHttpUrl('http:///nohost')).toThrow(/Could not open/);
    expect(() => parseHttpUrl('http://bad host/')).toThrow(/bad\/illegal format/);
  });
});

describe('relative backing names under a URL', () => {
  it("combine with the URL's path up to its last '/', as qemu prints them", () => {
    expect(joinBackingName('base.qcow2', 'http://h:1/top.qcow2')).toBe('http://h:1/base.qcow2');
    expect(joinBackingName('../base.qcow2', 'http://h/sub/rel.qcow2')).toBe('http://h/sub/../base.qcow2');
    expect(joinBackingName('base.qcow2', 'http://h')).toBe('http://h/base.qcow2');
  });

  it('never combine with the query string or the fragment', () => {
    expect(joinBackingName('base.qcow2', 'https://h/d/top.qcow2?sig=a/b/c')).toBe('https://h/d/base.qcow2');
    expect(joinBackingName('base.qcow2', 'https://h/d/top.qcow2#x/y')).toBe('https://h/d/base.qcow2');
    expect(httpDirectoryOf('HTTP://H:8080/a/b?x=/')).toBe('HTTP://H:8080/a/');
  });

  it('absolute paths stay local, URLs stay themselves (local bases included)', () => {
    expect(joinBackingName('/srv/base.qcow2', 'http://h/top.qcow2')).toBe('/srv/base.qcow2');
    expect(joinBackingName('https://o/b.qcow2', 'http://h/top.qcow2')).toBe('https://o/b.qcow2');
    expect(joinBackingName('http://o/b.qcow2', '/images/top.qcow2')).toBe('http://o/b.qcow2');
    expect(joinBackingName('b.qcow2', '/images/top.qcow2')).toBe('/images/b.qcow2');
  });
});

describe('--untrusted and URLs', () => {
  const saved = process.env.QIMG_UNTRUSTED;
  afterEach(() => {
    if (saved === undefined) delete process.env.QIMG_UNTRUSTED;
    else process.env.QIMG_UNTRUSTED = saved;
  });

  it('same origin only: scheme, host and port', () => {
    process.env.QIMG_UNTRUSTED = '1';
    const from = 'https://h:8443/d/top.qcow2?sig=x';
    expect(() => assertReferenceAllowed('https://h:8443/other/base.qcow2', from, 'backing file')).not.toThrow();
    expect(() => assertReferenceAllowed('https://H:8443/base.qcow2', from, 'backing file')).not.toThrow();
    for (const target of ['http://h:8443/base.qcow2', 'https://h/base.qcow2', 'https://evil:8443/base.qcow2', '/etc/passwd', 'nbd://h/x']) {
      expect(() => assertReferenceAllowed(target, from, 'backing file'), target).toThrow(/outside the image's origin https:\/\/h:8443/);
    }
    expect(() => assertReferenceAllowed('http://h/base.qcow2', '/images/top.qcow2', 'backing file')).toThrow(/outside the image's directory/);
    expect(httpOrigin('https://h:443/x')).toBe('https://h');
  });

  it('without the policy anything goes', () => {
    delete process.env.QIMG_UNTRUSTED;
    expect(() => assertReferenceAllowed('/etc/passwd', 'http://h/top.qcow2', 'backing file')).not.toThrow();
  });
});

describe('response headers', () => {
  it('Content-Range and Content-Length', () => {
    expect(parseContentRange('bytes 0-0/4096')).toEqual({ start: 0, end: 0, total: 4096 });
    expect(parseContentRange('bytes 10-20/*')).toEqual({ start: 10, end: 20 });
    expect(parseContentRange('bytes */77')).toEqual({ total: 77 });
    expect(parseContentRange('bytes 20-10/100')).toBeUndefined();
    expect(parseContentRange('items 0-1/2')).toBeUndefined();
    expect(Number.isSafeInteger(parseContentRange('bytes 0-0/9223372036854775807')!.total)).toBe(false);
    expect(parseLength('123')).toBe(123);
    expect(parseLength('99999999999999999999')).toBeUndefined();
    expect(parseLength('-1')).toBeUndefined();
    expect(parseLength(undefined)).toBeUndefined();
  });
});
