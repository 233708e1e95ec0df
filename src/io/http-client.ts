/**
 * The HTTP(S) client under HttpFile: keep-alive connections (a few in parallel),
 * redirects followed up to a limit, transient failures (5xx, resets, timeouts) retried
 * with a short backoff, and every answer checked before its bytes are used: a range
 * request must come back as 206 with exactly the range asked for and exactly its
 * length of body. Failure reasons are worded as curl words them, since qemu-img's
 * messages for HTTP sources carry curl's text.
 */
import type * as http from 'node:http';
import type * as Https from 'node:https';
import { parseHttpUrl, type HttpTarget } from './http-url.js';
import { trustedCertificates } from './tls-trust.js';

export interface HttpTuning {
  /** connect and idle timeout of one request, in milliseconds */
  timeoutMs: number;
  /** longest a whole request may take, in milliseconds (a server that trickles bytes) */
  requestTimeoutMs: number;
  /** further attempts after a transient failure */
  retries: number;
  /** first backoff pause, doubled for each further attempt */
  backoffMs: number;
  /** redirects followed per request (libcurl's default limit) */
  maxRedirects: number;
  /** connections kept to the server */
  maxSockets: number;
}

/** The defaults, with the timeout and retry count overridable from the environment (tests). */
export function httpTuning(env: NodeJS.ProcessEnv = process.env): HttpTuning {
  const seconds = Number(env.QIMG_HTTP_TIMEOUT);
  const timeoutMs = Number.isFinite(seconds) && seconds > 0 ? Math.round(seconds * 1000) : 30_000;
  const retries = Number(env.QIMG_HTTP_RETRIES);
  return {
    timeoutMs,
    requestTimeoutMs: timeoutMs * 10,
    retries: Number.isInteger(retries) && retries >= 0 && retries <= 10 ? retries : 3,
    backoffMs: 100,
    maxRedirects: 30,
    maxSockets: 4,
  };
}

/** One failed exchange; `transient` failures are worth another attempt. */
export class HttpFailure extends Error {
  constructor(
    /** curl's wording of what went wrong */
    readonly reason: string,
    readonly transient: boolean,
    readonly status?: number,
    /** the server went silent (retried once only: a dead server should not cost minutes) */
    readonly timedOut = false,
  ) {
    super(reason);
    this.name = 'HttpFailure';
  }
}

/** What a HEAD tells about the resource. */
export interface HeadAnswer {
  status: number;
  /** Content-Length, when present and a safe integer */
  length?: number;
  /** the Content-Length header as sent (to tell a missing length from an absurd one) */
  lengthHeader?: string;
  acceptsRanges: boolean;
}

/** What a ranged GET answered. */
export type RangeAnswer =
  | { kind: 'partial'; start: number; end: number; total?: number; body: Buffer }
  /** 200: the server sent the whole resource instead (not read) */
  | { kind: 'whole'; length?: number }
  /** 416: the range lies past the end; `total` from `Content-Range: bytes *\/N` */
  | { kind: 'unsatisfiable'; total?: number };

/** node:http and node:https, loaded on first use: most commands never touch a URL (start-up time). */
const httpModule = (): typeof http => process.getBuiltinModule('node:http');
const httpsModule = (): typeof Https => process.getBuiltinModule('node:https');

const REDIRECTS = new Set([301, 302, 303, 307, 308]);
/** Bodies of errors and redirects up to this size are drained to keep the connection. */
const DRAIN_LIMIT = 64 * 1024;

/** Bytes seen and the timeout (if one struck) of one exchange, for its failure message. */
interface Exchange {
  res: http.IncomingMessage;
  received: number;
  timeout?: HttpFailure;
}

export class HttpClient {
  private readonly target: HttpTarget;
  private readonly agents = new Map<string, http.Agent>();
  private closed = false;
  /** where the URL last redirected to, when that answered */
  private redirected?: { href: string; target: HttpTarget };

  constructor(
    readonly url: string,
    private readonly tuning: HttpTuning = httpTuning(),
  ) {
    this.target = parseHttpUrl(url);
  }

  /** HEAD on the URL (redirects followed, transient failures retried). */
  async head(): Promise<HeadAnswer> {
    return this.withRetries(async () => {
      const { res } = await this.follow('HEAD');
      const answer: HeadAnswer = { status: res.statusCode ?? 0, acceptsRanges: /\bbytes\b/i.test(headerText(res.headers['accept-ranges'])) };
      const length = parseLength(res.headers['content-length']);
      if (length !== undefined) answer.length = length;
      if (res.headers['content-length'] !== undefined) answer.lengthHeader = headerText(res.headers['content-length']);
      discard(res, 'HEAD');
      if (isTransientStatus(answer.status)) throw statusFailure(answer.status);
      return answer;
    });
  }

  /**
   * GET of the bytes [start, end] (inclusive, as the Range header counts). A 206 must
   * name exactly that range and carry exactly its length; anything else is a failure
   * (a server that lies must never turn into silent zeros or shifted data).
   */
  async getRange(start: number, end: number): Promise<RangeAnswer> {
    return this.withRetries(async () => {
      const ex = await this.follow('GET', `bytes=${start}-${end}`);
      const { res } = ex;
      const status = res.statusCode ?? 0;
      if (status === 206) return readPartial(ex, start, end, this.target);
      discard(res);
      if (status === 200) return { kind: 'whole', length: parseLength(res.headers['content-length']) };
      if (status === 416) return { kind: 'unsatisfiable', total: parseContentRange(res.headers['content-range'])?.total };
      throw statusFailure(status);
    });
  }

  /** Ends every connection; requests still running fail. */
  close(): void {
    this.closed = true;
    for (const agent of this.agents.values()) agent.destroy();
    this.agents.clear();
  }

  private async withRetries<T>(attempt: () => Promise<T>): Promise<T> {
    for (let n = 0; ; n++) {
      try {
        return await attempt();
      } catch (err) {
        const failure = asFailure(err, this.target);
        const limit = failure.timedOut ? Math.min(1, this.tuning.retries) : this.tuning.retries;
        if (!failure.transient || n >= limit || this.closed) throw failure;
        await sleep(this.tuning.backoffMs * 2 ** n);
      }
    }
  }

  /**
   * One request, redirects followed; resolves with the final response (body unread).
   * Where the URL redirected before, the request goes straight to where it led (a
   * release download that redirects to object storage costs one round trip per read,
   * not two); should that place refuse (a signed location expired: 4xx), the URL is
   * followed afresh.
   */
  private async follow(method: 'HEAD' | 'GET', range?: string): Promise<Exchange> {
    const shortcut = this.redirected;
    if (shortcut) {
      const ex = await this.followFrom(shortcut.href, shortcut.target, method, range);
      const status = ex.res.statusCode ?? 0;
      if (status < 400 || status >= 500) return ex;
      discard(ex.res, method);
      if (this.redirected === shortcut) this.redirected = undefined;
    }
    return this.followFrom(this.url, this.target, method, range);
  }

  private async followFrom(href: string, target: HttpTarget, method: 'HEAD' | 'GET', range?: string): Promise<Exchange> {
    for (let hops = 0; ; hops++) {
      const ex = await this.send(target, method, range);
      const status = ex.res.statusCode ?? 0;
      const location = headerText(ex.res.headers.location);
      if (!REDIRECTS.has(status) || location === '') {
        if (hops > 0 && status >= 200 && status < 300) this.redirected = { href, target };
        return ex;
      }
      discard(ex.res, method);
      if (hops >= this.tuning.maxRedirects) throw new HttpFailure(`Maximum (${this.tuning.maxRedirects}) redirects followed`, false);
      href = redirectTarget(location, href);
      try {
        target = parseHttpUrl(href);
      } catch {
        throw new HttpFailure(`redirect to an invalid location '${location}'`, false);
      }
    }
  }

  /** Keep-alive connections per scheme (a redirect may change it). */
  private agentFor(protocol: 'http:' | 'https:'): http.Agent {
    let agent = this.agents.get(protocol);
    if (!agent) {
      const options = { keepAlive: true, maxSockets: this.tuning.maxSockets, maxFreeSockets: this.tuning.maxSockets };
      agent = protocol === 'https:' ? new (httpsModule().Agent)({ ...options, ca: trustedCertificates() }) : new (httpModule().Agent)(options);
      this.agents.set(protocol, agent);
    }
    return agent;
  }

  /** Sends one request; resolves when the response headers are in. */
  private send(target: HttpTarget, method: 'HEAD' | 'GET', range?: string): Promise<Exchange> {
    if (this.closed) return Promise.reject(new HttpFailure('connection closed', false));
    const { timeoutMs, requestTimeoutMs } = this.tuning;
    return new Promise((resolve, reject) => {
      const headers: http.OutgoingHttpHeaders = { 'User-Agent': 'qimg', Accept: '*/*' };
      if (range) headers.Range = range;
      const mod = target.protocol === 'https:' ? httpsModule() : httpModule();
      const req = mod.request({
        protocol: target.protocol,
        host: target.hostname,
        port: target.port,
        path: target.requestPath,
        method,
        headers,
        auth: target.auth,
        agent: this.agentFor(target.protocol),
      });
      // filled in as the exchange goes: the response, the bytes read, a timeout that struck
      const ex = { received: 0 } as Exchange;
      let started = performance.now();
      const timedOut = (): void => {
        const ms = Math.round(performance.now() - started);
        ex.timeout = new HttpFailure(`Operation timed out after ${ms} milliseconds with ${ex.received} bytes received`, true, undefined, true);
        req.destroy(ex.timeout);
      };
      // connect and idle timeout: no bytes moving for timeoutMs
      req.setTimeout(timeoutMs, timedOut);
      // the whole exchange, body included, from when a connection takes the request
      // (requests queued behind busy connections do not count down)
      let deadline: NodeJS.Timeout | undefined;
      req.once('socket', () => {
        started = performance.now();
        deadline = setTimeout(timedOut, requestTimeoutMs);
        deadline.unref();
      });
      req.once('close', () => clearTimeout(deadline));
      // `on`, not `once`: a second error (after a timeout destroyed the request) must not go unheard
      req.on('error', (err) => {
        clearTimeout(deadline);
        reject(err);
      });
      req.once('response', (res) => {
        res.on('error', () => undefined); // reported through the reader (or irrelevant once discarded)
        res.once('close', () => clearTimeout(deadline));
        ex.res = res;
        resolve(ex);
      });
      req.end();
    });
  }
}

/** Reads a 206 body into one buffer after checking its headers against the request. */
function readPartial(ex: Exchange, start: number, end: number, target: HttpTarget): Promise<RangeAnswer> {
  const { res } = ex;
  const want = end - start + 1;
  const range = parseContentRange(res.headers['content-range']);
  if (!range || range.start !== start || range.end !== end) {
    discard(res);
    const got = headerText(res.headers['content-range']) || 'none';
    throw new HttpFailure(`server answered the range ${start}-${end} with Content-Range '${got}'`, false);
  }
  const declared = parseLength(res.headers['content-length']);
  if (res.headers['content-length'] !== undefined && declared !== want) {
    discard(res);
    throw new HttpFailure(`server sent Content-Length ${headerText(res.headers['content-length'])} for a range of ${want} bytes`, false);
  }
  return new Promise((resolve, reject) => {
    const body = Buffer.allocUnsafe(want);
    let settled = false;
    const cut = (): HttpFailure => ex.timeout ?? new HttpFailure(`transfer closed with ${want - ex.received} bytes remaining to read`, true);
    const fail = (failure: HttpFailure): void => {
      if (settled) return;
      settled = true;
      res.destroy();
      reject(failure);
    };
    res.on('data', (chunk: Buffer) => {
      if (settled) return;
      if (ex.received + chunk.length > want) {
        fail(new HttpFailure(`server sent more than the ${want} bytes of the range ${start}-${end}`, false));
        return;
      }
      chunk.copy(body, ex.received);
      ex.received += chunk.length;
    });
    res.once('end', () => {
      if (ex.received !== want) fail(cut());
      else if (!settled) {
        settled = true;
        resolve({ kind: 'partial', start, end, total: range.total, body });
      }
    });
    res.on('error', (err) => fail(ex.timeout ?? asFailure(err, target, want - ex.received)));
    res.once('aborted', () => fail(cut()));
    res.once('close', () => {
      if (!settled) fail(cut());
    });
  });
}

/**
 * `Content-Range: bytes START-END/TOTAL` (TOTAL may be '*'), or `bytes *\/TOTAL`. A
 * TOTAL past 2^53 comes back as an inexact number: callers refuse it as a size.
 */
export function parseContentRange(value: string | string[] | undefined): { start?: number; end?: number; total?: number } | undefined {
  const m = /^\s*bytes\s+(?:(\d+)-(\d+)|\*)\/(\d+|\*)\s*$/i.exec(headerText(value));
  if (!m) return undefined;
  const out: { start?: number; end?: number; total?: number } = {};
  if (m[1] !== undefined) {
    out.start = safeNumber(m[1]);
    out.end = safeNumber(m[2]);
    if (out.start === undefined || out.end === undefined || out.end < out.start) return undefined;
  }
  if (m[3] !== '*') out.total = Number(m[3]);
  return out;
}

/** A Content-Length as a number, or undefined when absent or not a safe integer. */
export function parseLength(value: string | string[] | undefined): number | undefined {
  const text = headerText(value).trim();
  return /^\d+$/.test(text) ? safeNumber(text) : undefined;
}

function safeNumber(digits: string): number | undefined {
  const n = Number(digits);
  return Number.isSafeInteger(n) ? n : undefined;
}

function headerText(value: string | string[] | undefined): string {
  return Array.isArray(value) ? value.join(', ') : (value ?? '');
}

function isTransientStatus(status: number): boolean {
  return status >= 500 || status === 408 || status === 429;
}

/** curl's wording for an HTTP error status (CURLOPT_FAILONERROR). */
export function statusFailure(status: number): HttpFailure {
  return new HttpFailure(`The requested URL returned error: ${status}`, isTransientStatus(status), status);
}

function redirectTarget(location: string, from: string): string {
  let next: URL;
  try {
    next = new URL(location, from);
  } catch {
    throw new HttpFailure(`redirect to an invalid location '${location}'`, false);
  }
  if (next.protocol !== 'http:' && next.protocol !== 'https:') {
    throw new HttpFailure(`Protocol "${next.protocol.replace(/:$/, '')}" not supported or disabled in libcurl`, false);
  }
  // an absolute http(s) Location is kept as sent (its query string may be signed)
  return /^https?:\/\//i.test(location) ? location : next.href;
}

/**
 * Throws the body away: drained when small (the connection stays usable for the next
 * request, which saves a TLS handshake), else cut. A HEAD answer has no body, whatever
 * its Content-Length says.
 */
function discard(res: http.IncomingMessage, method: 'HEAD' | 'GET' = 'GET'): void {
  const length = parseLength(res.headers['content-length']);
  if (method === 'HEAD' || (length !== undefined && length <= DRAIN_LIMIT)) res.resume();
  else res.destroy();
}

const TLS_CERT_CODES = new Set([
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_GET_ISSUER_CERT',
  'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

/** Turns a socket, TLS or parser error into a failure with curl's wording. */
function asFailure(err: unknown, target: HttpTarget, remaining?: number): HttpFailure {
  if (err instanceof HttpFailure) return err;
  const e = err as NodeJS.ErrnoException;
  const code = typeof e?.code === 'string' ? e.code : '';
  const message = err instanceof Error ? err.message : String(err);
  if (code === 'ECONNREFUSED') return new HttpFailure(`Failed to connect to ${target.hostname} port ${target.port}: Couldn't connect to server`, false);
  if (code === 'ENOTFOUND') return new HttpFailure(`Could not resolve host: ${target.hostname}`, false);
  if (code === 'EAI_AGAIN') return new HttpFailure(`Could not resolve host: ${target.hostname}`, true);
  if (code === 'EHOSTUNREACH' || code === 'ENETUNREACH') return new HttpFailure(`Failed to connect to ${target.hostname} port ${target.port}: No route to host`, true);
  if (TLS_CERT_CODES.has(code)) return new HttpFailure(`SSL certificate problem: ${message}`, false);
  if (code.startsWith('ERR_SSL') || code.startsWith('ERR_TLS') || (code === '' && /SSL|TLS/.test(message))) return new HttpFailure(`SSL connect error: ${message}`, false);
  if (code === 'HPE_HEADER_OVERFLOW') return new HttpFailure('Too large response headers', false);
  if (code.startsWith('HPE_')) return new HttpFailure(`Weird server reply (${message})`, false);
  if (code === 'ECONNRESET' || code === 'EPIPE' || code === 'ECONNABORTED' || code === 'ETIMEDOUT') {
    if (remaining !== undefined && remaining > 0) return new HttpFailure(`transfer closed with ${remaining} bytes remaining to read`, true);
    return new HttpFailure(code === 'ECONNRESET' && /hang up/.test(message) ? 'Empty reply from server' : 'Recv failure: Connection reset by peer', true);
  }
  return new HttpFailure(message, false);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
