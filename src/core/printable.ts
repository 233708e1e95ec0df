/** Text from an image or the command line made safe for one error line. */

/** Control characters (and DEL) become \xNN: a message stays on one line and sends no terminal escapes. */
export function printable(s: string): string {
  // eslint-disable-next-line no-control-regex -- matching control characters is the point
  return s.replace(/[\x00-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}
