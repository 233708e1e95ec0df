/**
 * What qemu-img's getopt_long makes of arguments that commander reads otherwise.
 *
 * commander takes an argument that looks like a negative number ("-1", "-1.5") as a
 * positional argument; qemu-img's GNU getopt takes every argument that starts with
 * '-' as options, and no qemu-img option is a digit. So `create -f qcow2 x.qcow2 -1`
 * is an unknown option there, not a size. qemu-img 7.2 then prints
 * "unrecognized option 'ARG'" with ARG = argv[optind - 1]: the argument itself when
 * the digit ends it ("-1"), but the argument before it in getopt's permuted order
 * when characters follow ("-1k", "-1.5": getopt has not stepped past it yet), which
 * can be a file name or the subcommand. This module replays getopt's scan (with its
 * permutation of non-options) to find that argument.
 */
import type { Command } from 'commander';

/** How getopt sees a subcommand's options: which short letters and long names take a value. */
export interface OptionTable {
  short: Map<string, boolean>;
  long: Map<string, boolean>;
}

export function optionTable(cmd: Command): OptionTable {
  const short = new Map<string, boolean>();
  const long = new Map<string, boolean>();
  for (const o of cmd.options) {
    const takesValue = o.required || o.optional;
    if (o.short) short.set(o.short.slice(1), takesValue);
    if (o.long) long.set(o.long.slice(2), takesValue);
  }
  short.set('h', false);
  long.set('help', false);
  return { short, long };
}

/**
 * The argument qemu-img names when getopt meets a digit option in `args` (the
 * subcommand first, as qemu-img's argv), or undefined when the scan ends first: at the
 * end, after "--", or at an unknown letter or long option (commander reports those,
 * in the same order).
 */
export function digitOptionArgument(args: readonly string[], table: OptionTable): string | undefined {
  const argv = [...args];
  const argc = argv.length;
  let optind = 1;
  let first = 1;
  let last = 1;
  let next = '';
  const isNonOption = (a: string) => a[0] !== '-' || a.length === 1;
  /** getopt's exchange(): the non-options [first, last) move after the options [last, optind). */
  const exchange = () => {
    const nonOptions = argv.slice(first, last);
    const options = argv.slice(last, optind);
    argv.splice(first, optind - first, ...options, ...nonOptions);
    first += options.length;
    last = optind;
  };
  for (;;) {
    if (next === '') {
      if (last > optind) last = optind;
      if (first > optind) first = optind;
      if (first !== last && last !== optind) exchange();
      else if (last !== optind) first = optind;
      while (optind < argc && isNonOption(argv[optind])) optind++;
      last = optind;
      if (optind >= argc || argv[optind] === '--') return undefined;
      const arg = argv[optind];
      if (arg.startsWith('--')) {
        const eq = arg.indexOf('=');
        const name = arg.slice(2, eq < 0 ? undefined : eq);
        const takesValue = table.long.get(name);
        if (takesValue === undefined) return undefined;
        optind += takesValue && eq < 0 ? 2 : 1;
        continue;
      }
      next = arg.slice(1);
    }
    const c = next[0];
    next = next.slice(1);
    if (next === '') optind++;
    if (c >= '0' && c <= '9') return argv[optind - 1];
    const takesValue = table.short.get(c);
    if (takesValue === undefined) return undefined;
    if (takesValue) {
      // the value is the rest of this argument, or the next one: either way getopt steps past it
      optind++;
      next = '';
    }
    if (optind > argc) return undefined;
  }
}
