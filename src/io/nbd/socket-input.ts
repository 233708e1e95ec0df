/**
 * The NBD client socket's receive side, through Node's `onread` hook: before each read
 * the current consumer names the buffer the kernel copies into, so a read reply's
 * payload lands straight in the caller's buffer (as qemu's recv into the request's
 * buffer) instead of queuing as 64 KiB chunks that are allocated, copied and freed.
 * The handshake's consumer is a queue (byte-reader.ts); the transmission phase's is the
 * reply parser (reply-parser.ts).
 */

export interface InputConsumer {
  /** Where the next read goes. */
  nextBuffer(): Buffer;
  /** `data` (the start of some buffer nextBuffer gave, perhaps an earlier consumer's)
   * arrived; false pauses the socket. */
  received(data: Buffer): boolean;
}

export class SocketInput {
  private consumer: InputConsumer;
  /** called whenever bytes arrive (the connection's silence timer) */
  onActivity: (() => void) | undefined;

  constructor(first: InputConsumer) {
    this.consumer = first;
  }

  /** From now on `consumer` gets the bytes (the read already posted may use the last consumer's buffer). */
  switchTo(consumer: InputConsumer): void {
    this.consumer = consumer;
  }

  /**
   * Bytes that arrived as a stream chunk rather than through `onread` (a TLS session's
   * plaintext): copied into the buffers the consumers name, as a read would fill them;
   * false when the socket should pause.
   */
  feed(chunk: Buffer): boolean {
    let more = true;
    for (let at = 0; at < chunk.length; ) {
      const buf = this.onread.buffer();
      const n = Math.min(buf.length, chunk.length - at);
      chunk.copy(buf, 0, at, at + n);
      at += n;
      if (!this.onread.callback(n, buf)) more = false;
    }
    return more;
  }

  /** The `onread` option of net.createConnection. */
  readonly onread = {
    buffer: (): Buffer => this.consumer.nextBuffer(),
    callback: (n: number, buf: Uint8Array): boolean => {
      this.onActivity?.();
      return this.consumer.received(Buffer.from(buf.buffer, buf.byteOffset, n));
    },
  };
}
