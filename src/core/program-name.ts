/**
 * The name messages begin with: `qimg`, or `qemu-img` when qimg runs through a link of
 * that name, so that scripts which look for qemu-img's messages keep working.
 */
import { basename } from 'node:path';

let name = 'qimg';

export function programName(): string {
  return name;
}

/** Takes the name from the path the program was started as (process.argv[1]). */
export function setProgramName(invokedAs: string | undefined): void {
  name = invokedAs && basename(invokedAs) === 'qemu-img' ? 'qemu-img' : 'qimg';
}
