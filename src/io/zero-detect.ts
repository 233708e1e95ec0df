/** Whether a buffer holds only zero bytes (compared against a shared zero block, in pieces). */

const ZERO_BLOCK = Buffer.alloc(2 * 1024 * 1024);

export function isAllZero(data: Uint8Array): boolean {
  const b = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  for (let i = 0; i < b.length; i += ZERO_BLOCK.length) {
    const part = b.subarray(i, Math.min(b.length, i + ZERO_BLOCK.length));
    if (!part.equals(ZERO_BLOCK.subarray(0, part.length))) return false;
  }
  return true;
}
