/**
 * HTTP(S) names as qimg takes them: the request target is sent as the user wrote it
 * (a presigned object-store URL's query string carries a signature over its exact
 * bytes, so it is never re-encoded or reordered); only the path's dot segments are
 * removed, as curl does before sending.
 */
import { QimgError } from '../core/errors.js';

export interface HttpTarget {
  protocol: 'http:' | 'https:';
  hostname: string;
  port: number;
  /** scheme://host:port with the default port left out (the URL's origin) */
  origin: string;
  /** path and query as sent in the request line */
  requestPath: string;
  /** user:password from the authority, for Basic authentication */
  auth?: string;
}

const URL_PARTS = /^(https?):\/\/([^/?#]*)([^#]*)/i;

/** Splits an http(s) URL into what a request needs; throws a QimgError for a malformed one. */
export function parseHttpUrl(name: string): HttpTarget {
  const m = URL_PARTS.exec(name);
  if (!m) throw new QimgError(`Could not open '${name}': CURL: Error opening file: URL using bad/illegal format or missing URL`, { file: name });
  const scheme = m[1].toLowerCase() as 'http' | 'https';
  let authority = m[2];
  let auth: string | undefined;
  const at = authority.lastIndexOf('@');
  if (at >= 0) {
    auth = decodeURIComponentSafe(authority.slice(0, at));
    authority = authority.slice(at + 1);
  }
  let parsed: URL;
  try {
    parsed = new URL(`${scheme}://${authority}/`);
  } catch {
    throw new QimgError(`Could not open '${name}': CURL: Error opening file: URL using bad/illegal format or missing URL`, { file: name });
  }
  if (parsed.hostname === '') throw new QimgError(`Could not open '${name}': CURL: Error opening file: No host part in the URL`, { file: name });
  const { path, query } = splitQuery(m[3]);
  const requestPath = encodeUnsafe(removeDotSegments(path === '' ? '/' : path)) + (query === undefined ? '' : '?' + encodeUnsafe(query));
  const port = parsed.port === '' ? (scheme === 'https' ? 443 : 80) : Number(parsed.port);
  // the URL class brackets IPv6 literals; the socket layer wants them bare
  const hostname = parsed.hostname.replace(/^\[(.*)\]$/, '$1');
  return { protocol: `${scheme}:`, hostname, port, origin: parsed.origin, requestPath, auth };
}

/** scheme://host[:port] of an http(s) URL, or undefined for anything else. */
export function httpOrigin(name: string): string | undefined {
  try {
    return parseHttpUrl(name).origin;
  } catch {
    return undefined;
  }
}

/**
 * The base a relative name in an image at `url` combines with: the URL up to the last
 * '/' of its path. The query string and fragment belong to the image itself and are
 * never part of the base (qemu's plain string combination would cut a signature
 * containing '/' in the middle).
 */
export function httpDirectoryOf(url: string): string {
  const m = URL_PARTS.exec(url);
  if (!m) return url;
  const prefix = url.slice(0, m[1].length + 3 + m[2].length);
  const { path } = splitQuery(m[3]);
  const slash = path.lastIndexOf('/');
  return prefix + (slash < 0 ? '/' : path.slice(0, slash + 1));
}

function splitQuery(pathAndQuery: string): { path: string; query?: string } {
  const q = pathAndQuery.indexOf('?');
  return q < 0 ? { path: pathAndQuery } : { path: pathAndQuery.slice(0, q), query: pathAndQuery.slice(q + 1) };
}

/** RFC 3986 5.2.4: "a/./b" → "a/b", "a/b/../c" → "a/c" (never above the root). */
function removeDotSegments(path: string): string {
  const out: string[] = [];
  const segments = path.split('/');
  for (let i = 0; i < segments.length; i++) {
    const seg = segments[i];
    const last = i === segments.length - 1;
    if (seg === '.') {
      if (last) out.push('');
    } else if (seg === '..') {
      if (out.length > 1) out.pop();
      if (last) out.push('');
    } else {
      out.push(seg);
    }
  }
  const joined = out.join('/');
  return joined.startsWith('/') ? joined : '/' + joined;
}

/**
 * Characters that cannot travel in a request line (spaces, controls, non-ASCII) are
 * percent-encoded, as curl does; everything else, existing escapes included, is kept.
 */
function encodeUnsafe(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\x00-\x20\x7f-\u{10ffff}]/gu, (c) => {
    try {
      return encodeURIComponent(c);
    } catch {
      return '%EF%BF%BD'; // a lone surrogate: the replacement character
    }
  });
}

function decodeURIComponentSafe(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}
