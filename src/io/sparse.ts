/**
 * Where a file has data and where it has holes, from SEEK_DATA/SEEK_HOLE. This is the
 * answer qemu's file protocol gives for block status; without native support every
 * byte is reported as data (correct reads, only less sparse).
 */
import { native, SEEK_DATA, SEEK_HOLE, ENXIO } from './native.js';

export interface FileRun {
  /** true: the range holds data; false: it is a hole (reads as zeros). */
  data: boolean;
  length: number;
  /** the run reaches the end of the file */
  eof: boolean;
}

/**
 * The run starting at `offset`, at most `length` bytes, clipped to the file size.
 * At or past the end of the file: a zero-length run with eof set.
 */
export function fileRunAt(fd: number, fileSize: number, offset: number, length: number): FileRun {
  if (offset >= fileSize) return { data: false, length: 0, eof: true };
  const max = Math.min(length, fileSize - offset);
  const lib = native();
  if (!lib) return { data: true, length: max, eof: offset + max >= fileSize };
  const data = lib.lseek(fd, offset, SEEK_DATA);
  if (data === -ENXIO) {
    // trailing hole
    return { data: false, length: max, eof: offset + max >= fileSize };
  }
  if (data < 0) return { data: true, length: max, eof: offset + max >= fileSize };
  if (data === offset) {
    const hole = lib.lseek(fd, offset, SEEK_HOLE);
    const end = hole < 0 ? fileSize : hole;
    const len = Math.min(end - offset, max);
    return { data: true, length: len, eof: offset + len >= fileSize };
  }
  const len = Math.min(data - offset, max);
  return { data: false, length: len, eof: offset + len >= fileSize };
}
