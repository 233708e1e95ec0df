/**
 * Failures of an NBD connection. The export file turns them into QimgErrors naming
 * the export; `fatal` ones (protocol violations, a dropped connection) end the
 * connection, the others (a server's error for one request) fail only that request.
 */
export class NbdError extends Error {
  constructor(
    message: string,
    readonly fatal = true,
  ) {
    super(message);
    this.name = 'NbdError';
  }
}
