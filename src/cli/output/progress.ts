/**
 * Progress for -p: a live bar with rate and ETA on a terminal (stderr, cli-progress),
 * qemu-img's "    (NN.NN/100%)" updates on stdout otherwise, or one JSON object per
 * update with --progress=json. Driven by bytes done, independent of the operation.
 */
import { createRequire } from 'node:module';
import type * as CliProgress from 'cli-progress';

/** cli-progress is loaded only when a terminal bar is drawn (keeps startup light). */
function loadCliProgress(): typeof CliProgress {
  return createRequire(import.meta.url)('cli-progress') as typeof CliProgress;
}

export type ProgressMode = 'off' | 'auto' | 'json';

export interface ProgressReporter {
  update(done: number, total: number): void;
  finish(): void;
}

const NONE: ProgressReporter = { update() {}, finish() {} };

function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function createProgress(mode: ProgressMode, opts: { stdoutTaken?: boolean } = {}): ProgressReporter {
  if (mode === 'off') return NONE;
  // when standard output carries the data (convert ... -), progress goes to stderr
  const text = opts.stdoutTaken ? process.stderr : process.stdout;
  const started = Date.now();
  if (mode === 'json') {
    let lastPct = -1;
    let last = { done: 0, total: 0 };
    const emit = (done: number, total: number) =>
      text.write(`${JSON.stringify({ done, total, elapsed: (Date.now() - started) / 1000 })}\n`);
    return {
      update(done, total) {
        last = { done, total };
        const pct = total > 0 ? Math.floor((done * 100) / total) : 100;
        if (pct !== lastPct) {
          lastPct = pct;
          emit(done, total);
        }
      },
      finish() {
        if (lastPct !== 100) emit(last.total, last.total);
      },
    };
  }
  if (process.stderr.isTTY) {
    const cliProgress = loadCliProgress();
    const bar = new cliProgress.SingleBar(
      {
        format: ' {bar} {percentage}% | {doneText}/{totalText} | {rate}/s | ETA {eta_formatted}',
        stream: process.stderr,
        hideCursor: true,
        clearOnComplete: false,
        etaBuffer: 50,
      },
      cliProgress.Presets.shades_classic,
    );
    let startedBar = false;
    return {
      update(done, total) {
        const secs = Math.max((Date.now() - started) / 1000, 0.001);
        const payload = { doneText: humanBytes(done), totalText: humanBytes(total), rate: humanBytes(done / secs) };
        if (!startedBar) {
          bar.start(Math.max(total, 1), done, payload);
          startedBar = true;
        } else bar.update(done, payload);
      },
      finish() {
        if (startedBar) bar.stop();
      },
    };
  }
  // qemu-img's format: updates on stdout separated by \r, a newline at the end.
  let lastShown = -1;
  const show = (pct: number) => text.write(`    (${pct.toFixed(2)}/100%)\r`);
  return {
    update(done, total) {
      const pct = total > 0 ? (done * 100) / total : 100;
      if (lastShown < 0 || pct - lastShown >= 1 || (pct === 100 && lastShown !== 100)) {
        lastShown = pct;
        show(pct);
      }
    },
    finish() {
      if (lastShown !== 100) show(100);
      text.write('\n');
    },
  };
}

/** -p / --progress=MODE on the command line, silenced by -q. */
export function progressMode(opts: { progress?: boolean | string; quiet?: boolean }): ProgressMode {
  if (opts.quiet || !opts.progress) return 'off';
  return opts.progress === 'json' ? 'json' : 'auto';
}
