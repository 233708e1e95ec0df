/**
 * Warnings raised below the CLI (a driver opening an image it can read only in part),
 * as qemu prints them: `qimg: warning: ...` on stderr. The CLI sends them through its
 * own printer (coloured on a terminal); this default is what the library prints.
 */
import { programName } from './program-name.js';

type WarningSink = (message: string) => void;

const plain: WarningSink = (message) => {
  process.stderr.write(`${programName()}: warning: ${message}\n`);
};

let sink = plain;

export function emitWarning(message: string): void {
  sink(message);
}

/** Where warnings go from now on (null: back to the plain line on stderr). */
export function setWarningSink(fn: WarningSink | null): void {
  sink = fn ?? plain;
}
