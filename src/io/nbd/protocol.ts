/**
 * The NBD wire protocol's numbers (NetworkBlockDevice/nbd doc/proto.md), shared by the
 * client (src/io/nbd) and the server (src/serve). Names follow the document.
 */

/** "NBDMAGIC", the first eight bytes a newstyle server sends */
export const NBDMAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": the newstyle magic, and the prefix of every option request */
export const IHAVEOPT = 0x49484156454f5054n;
/** the magic of every option reply */
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;

/** handshake flags (server) */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
/** client flags */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

/** options */
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

/** option reply types; errors have bit 31 set */
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = 0x80000001;
export const NBD_REP_ERR_POLICY = 0x80000002;
export const NBD_REP_ERR_INVALID = 0x80000003;
export const NBD_REP_ERR_PLATFORM = 0x80000004;
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const NBD_REP_ERR_TOO_BIG = 0x80000009;
export const NBD_REP_ERR_EXT_HEADER_REQD = 0x8000000a;

/** NBD_REP_INFO types (also the information requests of NBD_OPT_INFO/GO) */
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

/** transmission flags */
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;
export const NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12;

/** request and reply magics */
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;

/** header sizes in bytes */
export const REQUEST_HEADER_SIZE = 28;
export const EXTENDED_REQUEST_HEADER_SIZE = 32;
export const SIMPLE_REPLY_HEADER_SIZE = 16;
export const STRUCTURED_REPLY_HEADER_SIZE = 20;
export const EXTENDED_REPLY_HEADER_SIZE = 32;

/** commands */
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_CMD_RESIZE = 8;

/** command flags */
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;
export const NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5;

/** structured reply flags and chunk types */
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;
export const NBD_REPLY_TYPE_ERROR_BIT = 1 << 15;

/** error values on the wire (Linux numbers, as the document fixes them) */
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** metadata contexts */
export const BASE_ALLOCATION = 'base:allocation';
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
export const QEMU_ALLOCATION_DEPTH = 'qemu:allocation-depth';
export const QEMU_DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';
export const NBD_STATE_DIRTY = 1 << 0;

/** limits both ends keep to (the document's recommendations) */
export const NBD_MAX_STRING = 4096;
export const NBD_DEFAULT_PORT = 10809;
/** the largest payload qimg sends or accepts in one request (qemu-nbd's limit) */
export const NBD_MAX_PAYLOAD = 32 * 1024 * 1024;

/** A readable name for an NBD error number (for messages). */
export function nbdErrorText(code: number): string {
  switch (code) {
    case NBD_EPERM: return 'Operation not permitted';
    case NBD_EIO: return 'Input/output error';
    case NBD_ENOMEM: return 'Cannot allocate memory';
    case NBD_EINVAL: return 'Invalid argument';
    case NBD_ENOSPC: return 'No space left on device';
    case NBD_EOVERFLOW: return 'Value too large for defined data type';
    case NBD_ENOTSUP: return 'Operation not supported';
    case NBD_ESHUTDOWN: return 'Cannot send after transport endpoint shutdown';
    default: return `error ${code}`;
  }
}
