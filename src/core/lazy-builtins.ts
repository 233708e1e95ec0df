/**
 * Node built-ins that cost start-up time, loaded on first use: `node:crypto` alone
 * pulls in some twenty internal modules, and most commands need neither it nor zlib.
 */
import type * as Crypto from 'node:crypto';
import type * as Zlib from 'node:zlib';

export const crypto = (): typeof Crypto => process.getBuiltinModule('node:crypto');
export const zlib = (): typeof Zlib => process.getBuiltinModule('node:zlib');
