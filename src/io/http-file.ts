/**
 * An image's bytes behind an http(s) URL, read-only, by range requests. Each miss
 * fetches whole 256 KiB chunks (qemu's curl read-ahead) into a small LRU cache, so the
 * many small metadata reads of a format driver cost few round trips; a large read is
 * split into several requests that run on parallel keep-alive connections.
 */
import { QimgError } from '../core/errors.js';
import type { HostFile } from './host.js';
import { ReadOnlyHost } from './read-only-host.js';
import type { FileRun } from './sparse.js';
import { HttpClient, HttpFailure, httpTuning, type HttpTuning } from './http-client.js';

/** Bytes fetched per cache entry (qemu's curl readahead default). */
export const HTTP_CHUNK = 256 * 1024;
/** Cached chunks: 8 MiB. */
const CACHE_CHUNKS = 32;
/** Chunks fetched by one request at most (larger reads become parallel requests). */
const CHUNKS_PER_REQUEST = 4;

export class HttpFile extends ReadOnlyHost implements HostFile {
  readonly remote = true;
  /** fetched chunks, least recently used first (Map keeps insertion order) */
  private readonly cache = new Map<number, Buffer>();
  /** chunks being fetched, shared by every read that needs them */
  private readonly pending = new Map<number, Promise<Buffer>>();

  private constructor(
    readonly path: string,
    readonly size: number,
    private readonly client: HttpClient,
  ) {
    super();
  }

  /**
   * Opens `url`: its size from a HEAD (Content-Length with `Accept-Ranges: bytes`, as
   * qemu's curl driver asks), or, where a HEAD is refused or says too little (a
   * presigned URL signed for GET only), from a one-byte range GET's Content-Range.
   */
  static async open(url: string, opts: { writable?: boolean; tuning?: HttpTuning } = {}): Promise<HttpFile> {
    if (opts.writable) throw new QimgError(`Could not open '${url}': curl driver does not support writes`, { file: url });
    const client = new HttpClient(url, opts.tuning ?? httpTuning());
    try {
      return new HttpFile(url, await discoverSize(client), client);
    } catch (err) {
      client.close();
      if (err instanceof HttpFailure) throw new QimgError(`Could not open '${url}': CURL: Error opening file: ${err.reason}`, { file: url, cause: err });
      throw err;
    }
  }

  async read(buf: Buffer, pos: number): Promise<void> {
    const end = Math.min(pos + buf.length, this.size);
    if (end <= pos) {
      buf.fill(0);
      return;
    }
    if (end - pos < buf.length) buf.fill(0, end - pos);
    const first = Math.floor(pos / HTTP_CHUNK);
    const last = Math.floor((end - 1) / HTTP_CHUNK);
    let chunks: Buffer[];
    try {
      chunks = await Promise.all(this.chunks(first, last));
    } catch (err) {
      if (err instanceof HttpFailure) throw new QimgError(`error while reading at byte ${pos}: ${err.reason}`, { file: this.path, cause: err });
      throw err;
    }
    for (let i = 0; i < chunks.length; i++) {
      const chunkStart = (first + i) * HTTP_CHUNK;
      const from = Math.max(pos, chunkStart);
      const to = Math.min(end, chunkStart + chunks[i].length);
      chunks[i].copy(buf, from - pos, from - chunkStart, to - chunkStart);
    }
  }

  /** A web server does not tell how much storage a resource takes. */
  async allocatedSize(): Promise<undefined> {
    return undefined;
  }

  /** No holes are known over HTTP: everything up to the end is data. */
  runAt(pos: number, length: number): FileRun {
    const max = Math.max(0, Math.min(length, this.size - pos));
    if (max === 0) return { data: false, length: 0, eof: true };
    return { data: true, length: max, eof: pos + max >= this.size };
  }

  async close(): Promise<void> {
    this.cache.clear();
    this.client.close();
  }

  /** The chunks first..last: cached, already on their way, or fetched now in runs. */
  private chunks(first: number, last: number): Promise<Buffer>[] {
    const out: Promise<Buffer>[] = [];
    for (let idx = first; idx <= last; idx++) {
      const cached = this.cache.get(idx);
      if (cached) {
        this.cache.delete(idx); // most recently used goes last
        this.cache.set(idx, cached);
        out.push(Promise.resolve(cached));
        continue;
      }
      let waiting = this.pending.get(idx);
      if (!waiting) {
        let runEnd = idx;
        while (runEnd < last && runEnd - idx + 1 < CHUNKS_PER_REQUEST && !this.cache.has(runEnd + 1) && !this.pending.has(runEnd + 1)) runEnd++;
        this.fetchRun(idx, runEnd);
        waiting = this.pending.get(idx)!;
      }
      out.push(waiting);
    }
    return out;
  }

  /** Starts one request for the chunks first..last and registers each as pending. */
  private fetchRun(first: number, last: number): void {
    const start = first * HTTP_CHUNK;
    const end = Math.min((last + 1) * HTTP_CHUNK, this.size) - 1;
    const run = this.fetch(start, end);
    for (let idx = first; idx <= last; idx++) {
      const offset = (idx - first) * HTTP_CHUNK;
      const chunk = run.then((body) => {
        const piece = body.subarray(offset, Math.min(offset + HTTP_CHUNK, body.length));
        this.remember(idx, piece);
        return piece;
      });
      chunk
        .catch(() => undefined) // each reader sees the failure through its own await
        .finally(() => this.pending.delete(idx));
      this.pending.set(idx, chunk);
    }
  }

  private async fetch(start: number, end: number): Promise<Buffer> {
    const answer = await this.client.getRange(start, end);
    if (answer.kind === 'whole') throw new HttpFailure(NO_RANGES, false);
    if (answer.kind === 'unsatisfiable') throw new HttpFailure(sizeChanged(this.size, answer.total), false);
    if (answer.total !== undefined && answer.total !== this.size) throw new HttpFailure(sizeChanged(this.size, answer.total), false);
    return answer.body;
  }

  private remember(idx: number, chunk: Buffer): void {
    this.cache.delete(idx);
    this.cache.set(idx, chunk);
    while (this.cache.size > CACHE_CHUNKS) this.cache.delete(this.cache.keys().next().value!);
  }
}

/** qemu's curl driver's words for a server that ignores Range. */
const NO_RANGES = "Server does not support 'range' (byte ranges).";

function sizeChanged(was: number, now: number | undefined): string {
  return `the resource changed size while open (was ${was} bytes, now ${now ?? 'unknown'})`;
}

/** The resource's length, and proof that the server honours ranges. */
async function discoverSize(client: HttpClient): Promise<number> {
  const head = await client.head();
  if (head.lengthHeader !== undefined && head.length === undefined && head.status >= 200 && head.status < 300) {
    throw new HttpFailure(`Server reported an unusable file size (Content-Length: ${head.lengthHeader.slice(0, 40)})`, false);
  }
  if (head.status >= 200 && head.status < 300 && head.acceptsRanges && head.length !== undefined) return head.length;
  // a missing resource stays missing: no second request to learn that again
  if (head.status === 404 || head.status === 410) throw new HttpFailure(`The requested URL returned error: ${head.status}`, false, head.status);
  const probe = await client.getRange(0, 0);
  switch (probe.kind) {
    case 'partial':
      if (probe.total === undefined) throw new HttpFailure("Server didn't report file size.", false);
      if (!Number.isSafeInteger(probe.total)) throw new HttpFailure(`Server reported an unusable file size (Content-Range total ${probe.total})`, false);
      return probe.total;
    case 'unsatisfiable':
      // only an empty resource has no byte 0
      if (probe.total === 0) return 0;
      throw new HttpFailure("Server didn't report file size.", false);
    case 'whole':
      if (probe.length === 0) return 0;
      throw new HttpFailure(NO_RANGES, false);
  }
}
