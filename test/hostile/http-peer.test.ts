/**
 * Hostile and broken HTTP servers: a fake server inside the test answers each path in
 * its own wrong way (no ranges, errors, endless redirects, lying lengths, the wrong
 * range, a size that changes, silence, absurd headers). qimg must end each case with
 * a non-zero exit and one `qimg: ...` line within seconds, never read an unbounded body,
 * and ride out transient failures (a 503, a reset connection) by retrying.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers/qemu.js';
import { freePort, qimgAsync } from '../helpers/http.js';

const SIZE = 4 * 1024 * 1024;
const CHUNK = 256 * 1024;
/** Every 4-byte word differs: shifted or zeroed data cannot pass for the real thing. */
const data = Buffer.alloc(SIZE);
for (let i = 0; i < SIZE / 4; i++) data.writeUInt32LE(Math.imul(i + 1, 2654435761) >>> 0, i * 4);

interface Hit {
  method: string;
  path: string;
  range?: [number, number];
  port: number;
}

const tmp = tempDir('qimg-http-peer-');
const hits: Hit[] = [];
/** bytes a streaming answer managed to send before qimg hung up */
const streamed = new Map<string, number>();
let server: http.Server;
let base = '';
let flakyGets = 0;
let signatures = 0;
const signatureUses = new Map<string, number>();

/** The env every run gets: short timeouts, so that silence fails fast. */
const env = (): NodeJS.ProcessEnv => {
  const e: NodeJS.ProcessEnv = { ...process.env, QIMG_HTTP_TIMEOUT: '0.5' };
  delete e.FORCE_COLOR;
  return e;
};

function parseRange(header: string | undefined): [number, number] | undefined {
  const m = /^bytes=(\d+)-(\d+)$/.exec(header ?? '');
  return m ? [Number(m[1]), Math.min(Number(m[2]), SIZE - 1)] : undefined;
}

/** A correct answer: HEAD with length and ranges, 206 with the range asked for. */
function serve(req: http.IncomingMessage, res: http.ServerResponse, range = parseRange(req.headers.range)): void {
  if (req.method === 'HEAD' || !range) {
    res.writeHead(200, { 'Accept-Ranges': 'bytes', 'Content-Length': SIZE });
    res.end(req.method === 'HEAD' ? undefined : data);
    return;
  }
  const [start, end] = range;
  res.writeHead(206, { 'Accept-Ranges': 'bytes', 'Content-Range': `bytes ${start}-${end}/${SIZE}`, 'Content-Length': end - start + 1 });
  res.end(data.subarray(start, end + 1));
}

/** Streams `total` bytes of zeros while the client listens, counting what got out. */
function stream(res: http.ServerResponse, key: string, total: number, headers: http.OutgoingHttpHeaders, status = 200): void {
  res.writeHead(status, headers);
  const block = Buffer.alloc(64 * 1024);
  let sent = 0;
  const pump = (): void => {
    while (sent < total && !res.destroyed) {
      sent += block.length;
      streamed.set(key, sent);
      if (!res.write(block)) {
        res.once('drain', pump);
        return;
      }
    }
    if (!res.destroyed) res.end();
  };
  pump();
}

function route(req: http.IncomingMessage, res: http.ServerResponse): void {
  const path = (req.url ?? '').split('?')[0];
  const range = parseRange(req.headers.range);
  hits.push({ method: req.method ?? '', path, range, port: req.socket.remotePort ?? 0 });
  switch (path) {
    case '/good.raw':
      return serve(req, res);
    case '/flaky.raw':
      // the first HEAD gets a 503; every third GET a 503 or a reset connection
      if (req.method === 'HEAD' && hits.filter((h) => h.path === path && h.method === 'HEAD').length === 1) {
        res.writeHead(503).end();
        return;
      }
      if (req.method === 'GET' && ++flakyGets % 3 === 1) {
        if (flakyGets % 2 === 1) res.writeHead(503).end();
        else req.socket.destroy();
        return;
      }
      return serve(req, res);
    case '/norange.raw':
      // no Accept-Ranges, and a GET gets the whole (1 GiB) resource
      if (req.method === 'HEAD') {
        res.writeHead(200, { 'Content-Length': 1024 ** 3 }).end();
        return;
      }
      return stream(res, path, 1024 ** 3, { 'Content-Length': 1024 ** 3 });
    case '/norange-later.raw':
      // claims ranges at open, then ignores them
      if (req.method === 'HEAD') return serve(req, res);
      return stream(res, path, SIZE, { 'Content-Length': SIZE });
    case '/404.raw':
      res.writeHead(404).end('not here');
      return;
    case '/500.raw':
      res.writeHead(500).end('broken');
      return;
    case '/loop.raw':
      res.writeHead(302, { Location: '/loop.raw?again' }).end();
      return;
    case '/short.raw':
      // the right headers, half the body, then the connection closes
      if (req.method === 'HEAD' || !range) return serve(req, res);
      res.writeHead(206, { 'Content-Range': `bytes ${range[0]}-${range[1]}/${SIZE}`, 'Content-Length': range[1] - range[0] + 1 });
      res.write(data.subarray(range[0], range[0] + (range[1] - range[0] + 1) / 2));
      setTimeout(() => req.socket.destroy(), 20);
      return;
    case '/long.raw':
      // Content-Length longer than the range
      if (req.method === 'HEAD' || !range) return serve(req, res);
      res.writeHead(206, { 'Content-Range': `bytes ${range[0]}-${range[1]}/${SIZE}`, 'Content-Length': range[1] - range[0] + 1 + 100 });
      res.end(Buffer.concat([data.subarray(range[0], range[1] + 1), Buffer.alloc(100)]));
      return;
    case '/long-chunked.raw':
      // no Content-Length, and far more body than the range
      if (req.method === 'HEAD' || !range) return serve(req, res);
      return stream(res, path, 256 * 1024 * 1024, { 'Content-Range': `bytes ${range[0]}-${range[1]}/${SIZE}` }, 206);
    case '/wrong-range.raw':
      // the data of another range (shifted by a sector), labelled as such
      if (req.method === 'HEAD' || !range) return serve(req, res);
      return serve(req, res, [range[0] + 512, Math.min(range[1] + 512, SIZE - 1)]);
    case '/grows.raw':
      // HEAD says 4 MiB, later answers say 8 MiB
      if (req.method === 'HEAD' || !range) return serve(req, res);
      res.writeHead(206, { 'Content-Range': `bytes ${range[0]}-${range[1]}/${2 * SIZE}`, 'Content-Length': range[1] - range[0] + 1 });
      res.end(data.subarray(range[0], range[1] + 1));
      return;
    case '/silent.raw':
      // opens fine, then never answers a read
      if (req.method === 'HEAD') return serve(req, res);
      return;
    case '/mute.raw':
      // never answers at all
      return;
    case '/huge-size.raw':
      // 2^63 - 1: a valid header, past what qimg (or qemu) can address
      res.writeHead(200, { 'Accept-Ranges': 'bytes', 'Content-Length': '9223372036854775807' }).end();
      return;
    case '/overflow-size.raw':
      res.writeHead(200, { 'Accept-Ranges': 'bytes', 'Content-Length': '99999999999999999999999' }).end();
      return;
    case '/huge-range.raw':
      // HEAD not allowed; the range GET's Content-Range names an absurd total
      if (req.method === 'HEAD') {
        res.writeHead(405).end();
        return;
      }
      res.writeHead(206, { 'Content-Range': 'bytes 0-0/9223372036854775807', 'Content-Length': 1 }).end('x');
      return;
    case '/huge-header.raw':
      res.writeHead(200, { 'Accept-Ranges': 'bytes', 'Content-Length': SIZE, 'X-Padding': 'x'.repeat(100 * 1024) }).end();
      return;
    case '/release.raw': {
      // a release download: redirects to a signed location that expires after three uses
      res.writeHead(302, { Location: `${base}/signed.raw?sig=${++signatures}` }).end();
      return;
    }
    case '/signed.raw': {
      const sig = (req.url ?? '').split('sig=')[1] ?? '';
      const uses = (signatureUses.get(sig) ?? 0) + 1;
      signatureUses.set(sig, uses);
      if (uses > 3) {
        res.writeHead(403).end('expired');
        return;
      }
      return serve(req, res);
    }
    case '/head-refused.raw':
      // a presigned GET-only URL: HEAD is forbidden, ranged GETs work
      if (req.method === 'HEAD') {
        res.writeHead(403).end();
        return;
      }
      return serve(req, res);
    default:
      res.writeHead(404).end();
  }
}

beforeAll(async () => {
  server = http.createServer(route);
  server.keepAliveTimeout = 5000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
});

afterAll(async () => {
  server.closeAllConnections();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  tmp.cleanup();
});

/** One failing run: exit 1, exactly one `qimg:` line naming the URL, within seconds. */
async function fails(args: string[], message: RegExp): Promise<string> {
  const r = await qimgAsync(args, { env: env(), timeout: 20_000 });
  expect(r.status, r.stderr).toBe(1);
  expect(r.stdout).toBe('');
  expect(r.stderr).toMatch(/^qimg: [^\n]*\n$/);
  expect(r.stderr).toMatch(message);
  expect(r.ms).toBeLessThan(10_000);
  return r.stderr;
}

describe('http(s) peers that misbehave', () => {
  it('a correct server: convert reads the bytes exactly, by read-ahead chunks on several connections', async () => {
    const out = join(tmp.path, 'good.raw');
    const r = await qimgAsync(['convert', '-f', 'raw', '-O', 'raw', `${base}/good.raw`, out], { env: env() });
    expect(r.status, r.stderr).toBe(0);
    expect(readFileSync(out).equals(data)).toBe(true);
    const gets = hits.filter((h) => h.path === '/good.raw' && h.method === 'GET');
    expect(gets.length).toBeGreaterThan(0);
    for (const g of gets) expect(g.range![1] - g.range![0] + 1 >= CHUNK || g.range![1] === SIZE - 1).toBe(true);
    expect(new Set(gets.map((g) => g.port)).size).toBeGreaterThan(1);
    // small reads (probing, headers) cost one chunk fetch, not one request each
    const info = await qimgAsync(['info', '--output=json', `${base}/good.raw`], { env: env() });
    expect(JSON.parse(info.stdout)).toEqual({ 'virtual-size': SIZE, filename: `${base}/good.raw`, format: 'raw' });
  });

  it('a 503 and reset connections are retried and the copy is still exact', async () => {
    const out = join(tmp.path, 'flaky.raw');
    const r = await qimgAsync(['convert', '-f', 'raw', '-O', 'raw', `${base}/flaky.raw`, out], { env: env() });
    expect(r.status, r.stderr).toBe(0);
    expect(readFileSync(out).equals(data)).toBe(true);
    expect(flakyGets).toBeGreaterThan(3);
  });

  it("no range support: qemu-img's message, and the body is not read", async () => {
    await fails(['info', `${base}/norange.raw`], /^qimg: Could not open '[^']*\/norange\.raw': CURL: Error opening file: Server does not support 'range' \(byte ranges\)\.\n$/);
    expect(streamed.get('/norange.raw') ?? 0).toBeLessThan(64 * 1024 * 1024);
    await fails(['convert', '-f', 'raw', '-O', 'raw', `${base}/norange-later.raw`, join(tmp.path, 'x.raw')], /error while reading at byte \d+: Server does not support 'range' \(byte ranges\)\./);
  });

  it("4xx and 5xx: qemu-img's message; a 5xx is retried a bounded number of times", async () => {
    await fails(['info', `${base}/404.raw`], /^qimg: Could not open '[^']*\/404\.raw': CURL: Error opening file: The requested URL returned error: 404\n$/);
    await fails(['info', `${base}/500.raw`], /^qimg: Could not open '[^']*\/500\.raw': CURL: Error opening file: The requested URL returned error: 500\n$/);
    const tries = hits.filter((h) => h.path === '/500.raw').length;
    expect(tries).toBeGreaterThan(1);
    expect(tries).toBeLessThanOrEqual(5);
  });

  it('endless redirects end at the limit', async () => {
    await fails(['info', `${base}/loop.raw`], /CURL: Error opening file: Maximum \(\d+\) redirects followed\n$/);
    expect(hits.filter((h) => h.path === '/loop.raw').length).toBeLessThan(100);
  });

  it('lying lengths, the wrong range and a changing size are errors, never silent zeros', async () => {
    const read = (name: string) => ['convert', '-f', 'raw', '-O', 'raw', `${base}/${name}`, join(tmp.path, `${name}.out`)];
    await fails(read('short.raw'), /error while reading at byte \d+: transfer closed with \d+ bytes remaining to read/);
    await fails(read('long.raw'), /error while reading at byte \d+: server sent Content-Length \d+ for a range of \d+ bytes/);
    await fails(read('long-chunked.raw'), /error while reading at byte \d+: server sent more than the \d+ bytes of the range/);
    expect(streamed.get('/long-chunked.raw') ?? 0).toBeLessThan(64 * 1024 * 1024);
    await fails(read('wrong-range.raw'), /error while reading at byte \d+: server answered the range \d+-\d+ with Content-Range 'bytes \d+-\d+\/\d+'/);
    await fails(read('grows.raw'), /error while reading at byte \d+: the resource changed size while open \(was 4194304 bytes, now 8388608\)/);
  });

  it('a silent server times out (QIMG_HTTP_TIMEOUT) at open and at read', async () => {
    await fails(['info', `${base}/mute.raw`], /CURL: Error opening file: Operation timed out after \d+ milliseconds with 0 bytes received\n$/);
    await fails(['convert', '-f', 'raw', '-O', 'raw', `${base}/silent.raw`, join(tmp.path, 's.raw')], /error while reading at byte \d+: Operation timed out after \d+ milliseconds/);
  });

  it('nobody listening: one line, no retries', async () => {
    const port = await freePort();
    await fails(['info', `http://127.0.0.1:${port}/x.raw`], new RegExp(`CURL: Error opening file: Failed to connect to 127\\.0\\.0\\.1 port ${port}: Couldn't connect to server\\n$`));
  });

  it('absurd sizes and headers are refused', async () => {
    await fails(['info', `${base}/huge-size.raw`], /CURL: Error opening file: Server reported an unusable file size \(Content-Length: 9223372036854775807\)\n$/);
    await fails(['info', `${base}/huge-range.raw`], /CURL: Error opening file: Server reported an unusable file size/);
    await fails(['info', `${base}/overflow-size.raw`], /CURL: Error opening file: Weird server reply/);
    await fails(['info', `${base}/huge-header.raw`], /CURL: Error opening file: Too large response headers\n$/);
  });

  it('a redirect is remembered until its (signed) target expires, then followed afresh', async () => {
    const out = join(tmp.path, 'release.raw');
    const r = await qimgAsync(['convert', '-f', 'raw', '-O', 'raw', `${base}/release.raw`, out], { env: env() });
    expect(r.status, r.stderr).toBe(0);
    expect(readFileSync(out).equals(data)).toBe(true);
    const redirects = hits.filter((h) => h.path === '/release.raw').length;
    const reads = hits.filter((h) => h.path === '/signed.raw' && h.method === 'GET').length;
    expect(redirects).toBeGreaterThan(1); // expired signatures were replaced
    expect(redirects).toBeLessThan(reads); // but not every read paid for a redirect
  });

  it('a HEAD refused (a GET-only presigned URL) falls back to a one-byte range GET', async () => {
    const url = `${base}/head-refused.raw?X-Amz-Signature=abc%2F123`;
    const r = await qimgAsync(['info', '--output=json', url], { env: env() });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)['virtual-size']).toBe(SIZE);
    const out = join(tmp.path, 'presigned.raw');
    expect((await qimgAsync(['convert', '-f', 'raw', '-O', 'raw', url, out], { env: env() })).status).toBe(0);
    expect(readFileSync(out).equals(data)).toBe(true);
  });
});
