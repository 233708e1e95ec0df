/**
 * HTTP(S) sources against a real web server: nginx serves a raw image, a qcow2 chain
 * with relative backing names, and VMDKs; qemu-img's curl driver reading the same URLs
 * is the oracle for info, map, measure and check, and local copies are the oracle for
 * the bytes (convert, compare).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { ok, qemuAvailable, qemuImg, qemuIo, qimg, sha256File, tempDir } from '../helpers/qemu.js';
import { nginxAvailable, qemuCurlAvailable, selfSignedCert, startNginx, type Nginx } from '../helpers/http.js';

const enabled = qemuAvailable() && nginxAvailable() && qemuCurlAvailable();
const tmp = tempDir('qimg-http-');
const www = join(tmp.path, 'www');
let nginx: Nginx | undefined;
let http = '';
let https = '';
let caEnv: NodeJS.ProcessEnv = {};

/** qemu 7.2's map has no "compressed" member; later versions (and qimg) print it. */
function mapJson(text: string): unknown {
  return (JSON.parse(text) as Record<string, unknown>[]).map(({ compressed: _, ...rest }) => rest);
}

function qemuOut(args: string[]): string {
  return ok(qemuImg(args), `qemu-img ${args.join(' ')}`).stdout;
}

function qimgOut(args: string[], env?: NodeJS.ProcessEnv): string {
  return ok(qimg(args, env ? { env } : {}), `qimg ${args.join(' ')}`).stdout;
}

/** One qimg error line with qemu-img's program name, for comparing messages. */
function asQemuLine(stderr: string): string {
  return stderr.replace(/^qimg: /, 'qemu-img: ');
}

describe.skipIf(!enabled)('http(s) sources (nginx, qemu-img curl driver as oracle)', () => {
  beforeAll(async () => {
    mkdirSync(join(www, 'sub'), { recursive: true });
    const w = (name: string) => join(www, name);
    ok(qemuImg(['create', '-q', '-f', 'raw', w('disk.raw'), '3M']));
    ok(qemuIo(['-f', 'raw', '-c', 'write -P 0x5a 0 700k', '-c', 'write -P 0x33 2M 300k', w('disk.raw')]));
    ok(qemuImg(['create', '-q', '-f', 'qcow2', w('base.qcow2'), '4M']));
    ok(qemuIo(['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x12 3M 64k', w('base.qcow2')]));
    ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', w('top.qcow2')]));
    ok(qemuIo(['-f', 'qcow2', '-c', 'write -P 0x22 1M 512k', '-c', 'write -z 3M 64k', w('top.qcow2')]));
    ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', '../top.qcow2', '-F', 'qcow2', w('sub/rel.qcow2')]));
    ok(qemuIo(['-f', 'qcow2', '-c', 'write -P 0x44 2M 128k', w('sub/rel.qcow2')]));
    ok(qemuImg(['convert', '-f', 'qcow2', '-O', 'vmdk', w('top.qcow2'), w('disk.vmdk')]));
    ok(qemuImg(['convert', '-f', 'qcow2', '-O', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', w('top.qcow2'), w('split.vmdk')]));
    // a backing name on the same file server under another origin (host spelled differently)
    // and an absolute local path, which stays local under a URL (as in qemu)
    ok(qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'http://localhost:1/base.qcow2', '-F', 'qcow2', w('elsewhere.qcow2'), '4M']));
    ok(qemuImg(['create', '-q', '-f', 'qcow2', '-b', w('base.qcow2'), '-F', 'qcow2', w('abs.qcow2')]));
    const tls = selfSignedCert(tmp.path);
    caEnv = { ...process.env, NODE_EXTRA_CA_CERTS: tls.cert };
    delete caEnv.FORCE_COLOR;
    nginx = await startNginx(tmp.path, www, tls);
    http = `http://127.0.0.1:${nginx.port}`;
    https = `https://127.0.0.1:${nginx.tlsPort}`;
  });

  afterAll(() => {
    nginx?.stop();
    tmp.cleanup();
  });

  it('info (human and JSON) and map (human and JSON) equal qemu-img over the same URL', () => {
    for (const name of ['disk.raw', 'top.qcow2', 'sub/rel.qcow2', 'disk.vmdk', 'abs.qcow2']) {
      const url = `${http}/${name}`;
      expect(qimgOut(['info', url]), name).toBe(qemuOut(['info', url]));
      expect(JSON.parse(qimgOut(['info', '--output=json', url])), name).toEqual(JSON.parse(qemuOut(['info', '--output=json', url])));
      expect(qimgOut(['info', '--backing-chain', url]), name).toBe(qemuOut(['info', '--backing-chain', url]));
      expect(mapJson(qimgOut(['map', '--output=json', url])), name).toEqual(mapJson(qemuOut(['map', '--output=json', url])));
      expect(qimgOut(['map', url]), name).toBe(qemuOut(['map', url]));
    }
    // the names qemu prints: the URL, the relative name and its combination (unnormalised)
    const info = JSON.parse(qimgOut(['info', '--output=json', `${http}/sub/rel.qcow2`]));
    expect(info.filename).toBe(`${http}/sub/rel.qcow2`);
    expect(info['backing-filename']).toBe('../top.qcow2');
    expect(info['full-backing-filename']).toBe(`${http}/sub/../top.qcow2`);
    expect(info['actual-size']).toBeUndefined();
    expect(qimgOut(['info', `${http}/disk.raw`])).toContain('disk size: unavailable\n');
  });

  it("--image-opts with qemu's curl driver (file.driver=http, file.url)", () => {
    const url = `${http}/sub/rel.qcow2`;
    for (const opts of [`driver=qcow2,file.driver=http,file.url=${url}`, `file.driver=http,file.url=${url}`]) {
      expect(JSON.parse(qimgOut(['info', '--output=json', '--image-opts', opts])), opts).toEqual(JSON.parse(qemuOut(['info', '--output=json', '--image-opts', opts])));
      expect(mapJson(qimgOut(['map', '--output=json', '--image-opts', opts])), opts).toEqual(mapJson(qemuOut(['map', '--output=json', '--image-opts', opts])));
    }
    for (const opts of ['driver=qcow2,file.driver=http', `driver=qcow2,file.driver=http,file.filename=${url}`, `driver=qcow2,file.driver=https,file.url=${url}`]) {
      const a = qimg(['info', '--image-opts', opts]);
      const b = qemuImg(['info', '--image-opts', opts]);
      expect(a.status, opts).toBe(1);
      // (qemu 7.2 adds GLib assertion noise before its line)
      expect(asQemuLine(a.stderr), opts).toBe(b.stderr.split('\n').filter((l) => l !== '' && !l.includes('GLib')).join('\n') + '\n');
    }
    // curl's tuning options are refused, not ignored
    const r = qimg(['info', '--image-opts', `driver=qcow2,file.driver=http,file.url=${url},file.sslverify=off`]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/qimg does not support the option 'sslverify' of the 'http' driver\n$/);
  });

  it('measure and check equal qemu-img over the URL', () => {
    for (const name of ['top.qcow2', 'sub/rel.qcow2', 'disk.raw']) {
      const url = `${http}/${name}`;
      expect(qimgOut(['measure', '-O', 'qcow2', url]), name).toBe(qemuOut(['measure', '-O', 'qcow2', url]));
      expect(JSON.parse(qimgOut(['measure', '--output=json', '-O', 'qcow2', url])), name).toEqual(JSON.parse(qemuOut(['measure', '--output=json', '-O', 'qcow2', url])));
    }
    for (const name of ['top.qcow2', 'disk.vmdk']) {
      const url = `${http}/${name}`;
      const a = qimg(['check', url]);
      const b = qemuImg(['check', url]);
      expect(a.status, name).toBe(b.status);
      expect(a.stdout, name).toBe(b.stdout);
    }
  });

  it('convert from a URL (through its backing chain) equals the local source; compare URL LOCAL', () => {
    const out = join(tmp.path, 'out');
    mkdirSync(out, { recursive: true });
    for (const [name, fmt] of [
      ['sub/rel.qcow2', 'qcow2'],
      ['disk.vmdk', 'vmdk'],
      ['disk.raw', 'raw'],
      ['split.vmdk', 'vmdk'], // extents opened over http too (qemu-img opens them as local files and fails)
    ]) {
      const target = join(out, name.replace('/', '-') + '.qcow2');
      ok(qimg(['convert', '-O', 'qcow2', `${http}/${name}`, target]), `convert ${name}`);
      const same = qemuImg(['compare', '-f', fmt, '-F', 'qcow2', join(www, name), target]);
      expect(same.stdout, name).toBe('Images are identical.\n');
      const cmp = qimg(['compare', `${http}/${name}`, join(www, name)]);
      expect(cmp.status, name).toBe(0);
      expect(cmp.stdout).toBe('Images are identical.\n');
    }
    const raw = join(out, 'disk.raw');
    ok(qimg(['convert', '-f', 'raw', '-O', 'raw', `${http}/disk.raw`, raw]));
    expect(sha256File(raw)).toBe(sha256File(join(www, 'disk.raw')));
    // different content: exit 1 with qemu-img's line
    const diff = qimg(['compare', `${http}/top.qcow2`, `${http}/base.qcow2`]);
    expect(diff.status).toBe(1);
    expect(diff.stdout).toBe(qemuImg(['compare', `${http}/top.qcow2`, `${http}/base.qcow2`]).stdout);
  });

  it('a local overlay on a URL backing file reads through it', () => {
    const overlay = join(tmp.path, 'overlay.qcow2');
    ok(qimg(['create', '-q', '-f', 'qcow2', '-b', `${http}/top.qcow2`, '-F', 'qcow2', overlay]));
    ok(qemuIo(['-f', 'qcow2', '-c', 'write -P 0x77 64k 64k', overlay]));
    expect(JSON.parse(qimgOut(['info', '--output=json', '--backing-chain', overlay]))).toEqual(JSON.parse(qemuOut(['info', '--output=json', '--backing-chain', overlay])));
    expect(mapJson(qimgOut(['map', '--output=json', overlay]))).toEqual(mapJson(qemuOut(['map', '--output=json', overlay])));
    const flat = join(tmp.path, 'overlay-flat.raw');
    ok(qimg(['convert', '-O', 'raw', overlay, flat]));
    expect(qemuImg(['compare', '-F', 'raw', overlay, flat]).status).toBe(0);
  });

  it('--untrusted refuses backing names leaving the URL origin and keeps same-origin chains', () => {
    for (const name of ['elsewhere.qcow2', 'abs.qcow2']) {
      const r = qimg(['--untrusted', 'map', `${http}/${name}`]);
      expect(r.status, name).toBe(1);
      expect(r.stdout).toBe('');
      expect(r.stderr).toMatch(new RegExp(`^qimg: .*backing file '.*' lies outside the image's origin ${http.replace(/\./g, '\\.')} \\(refused for untrusted images\\)\\n$`));
      expect(qimg(['map', `${http}/${name}`], { env: { ...process.env, QIMG_UNTRUSTED: '1' } }).status).toBe(1);
    }
    expect(qimg(['--untrusted', 'map', `${http}/sub/rel.qcow2`]).status).toBe(0);
    // a local image naming a URL leaves its directory
    const local = join(tmp.path, 'names-url.qcow2');
    ok(qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', `${http}/base.qcow2`, '-F', 'qcow2', local, '4M']));
    const r = qimg(['--untrusted', 'map', local]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/lies outside the image's directory/);
    // trusted: the absolute local backing name of an image behind a URL stays local (qemu's rule)
    expect(qimgOut(['map', `${http}/abs.qcow2`])).toBe(qemuOut(['map', `${http}/abs.qcow2`]));
  });

  it('https with a CA from NODE_EXTRA_CA_CERTS; an unknown CA is one clear error', () => {
    const url = `${https}/sub/rel.qcow2`;
    const viaHttp = JSON.parse(qemuOut(['info', '--output=json', '--backing-chain', `${http}/sub/rel.qcow2`]).split(http).join(https));
    expect(JSON.parse(qimgOut(['info', '--output=json', '--backing-chain', url], caEnv))).toEqual(viaHttp);
    const target = join(tmp.path, 'from-https.qcow2');
    ok(qimg(['convert', '-O', 'qcow2', url, target], { env: caEnv }));
    expect(qemuImg(['compare', '-F', 'qcow2', join(www, 'sub/rel.qcow2'), target]).status).toBe(0);
    const r = qimg(['info', url]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^qimg: Could not open 'https:\/\/127\.0\.0\.1:\d+\/sub\/rel\.qcow2': CURL: Error opening file: SSL certificate problem: .*\n$/);
    // a system bundle named by SSL_CERT_FILE (where a company CA would be) is trusted too
    const bundleEnv: NodeJS.ProcessEnv = { ...caEnv, SSL_CERT_FILE: caEnv.NODE_EXTRA_CA_CERTS };
    delete bundleEnv.NODE_EXTRA_CA_CERTS;
    expect(qimg(['info', url], { env: bundleEnv }).status).toBe(0);
    // the certificate names 127.0.0.1 only
    const wrongHost = qimg(['info', url.replace('127.0.0.1', 'localhost')], { env: caEnv });
    expect(wrongHost.status).toBe(1);
    expect(wrongHost.stderr).toMatch(/^qimg: Could not open '[^']*': CURL: Error opening file: SSL certificate problem: .*altnames.*\n$/);
  });

  it('a presigned-style URL keeps its query string exactly; backing names resolve against the path only', () => {
    const plainQuery = `${http}/top.qcow2?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=300&X-Amz-Signature=0123abcd`;
    // without a '/' in the query qemu's combination agrees
    expect(JSON.parse(qimgOut(['info', '--output=json', plainQuery]))).toEqual(JSON.parse(qemuOut(['info', '--output=json', plainQuery])));
    expect(mapJson(qimgOut(['map', '--output=json', plainQuery]))).toEqual(mapJson(qemuOut(['map', '--output=json', plainQuery])));
    // a signature with '/' and escapes: never a base for the backing name, never re-encoded
    const signed = `${http}/sub/rel.qcow2?X-Amz-Credential=AKIA%2F20260101%2Fus-east-1&X-Amz-Signature=ab/cd+ef%3D&x='y'`;
    const info = JSON.parse(qimgOut(['info', '--output=json', signed]));
    expect(info.filename).toBe(signed);
    expect(info['full-backing-filename']).toBe(`${http}/sub/../top.qcow2`);
    const target = join(tmp.path, 'presigned.qcow2');
    ok(qimg(['convert', '-O', 'qcow2', signed, target]));
    expect(qemuImg(['compare', '-F', 'qcow2', join(www, 'sub/rel.qcow2'), target]).status).toBe(0);
  });

  it('writes and creation are refused with qemu-img messages; missing resources with its 404 line', () => {
    for (const args of [
      ['resize', `${http}/disk.raw`, '4M'],
      ['commit', `${http}/top.qcow2`],
      ['check', '-r', 'all', `${http}/top.qcow2`],
    ]) {
      const a = qimg(args);
      const b = qemuImg(args);
      expect(a.status, args.join(' ')).toBe(1);
      expect(asQemuLine(a.stderr), args.join(' ')).toBe(b.stderr);
    }
    // nothing is created at a URL (nor as a local file named like one)
    const create = ['create', '-f', 'qcow2', `${http}/new.qcow2`, '1M'];
    const a1 = qimg(create);
    const b1 = qemuImg(create);
    expect(a1.status).toBe(1);
    expect(a1.stdout).toBe(b1.stdout);
    expect(asQemuLine(a1.stderr)).toBe(b1.stderr);
    const conv = qimg(['convert', '-O', 'raw', join(www, 'disk.raw'), `${http}/new.raw`]);
    expect(conv.status).toBe(1);
    expect(conv.stderr).toMatch(/^qimg: .*Protocol driver 'http' does not support image creation\n$/);
    const missing = `${http}/nothing.qcow2`;
    const a = qimg(['info', missing]);
    expect(a.status).toBe(1);
    expect(asQemuLine(a.stderr)).toBe(qemuImg(['info', missing]).stderr);
  });
});
