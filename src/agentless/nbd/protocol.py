"""The NBD wire protocol: constants named as in the specification, one struct per message.

Reference: the NBD protocol specification (``doc/proto.md`` of NetworkBlockDevice/nbd),
"fixed newstyle" negotiation and the transmission phase with simple and structured
replies. Every integer on the wire is big-endian (network order).

This module only describes bytes; :mod:`.server` and :mod:`.client` speak it.
"""

from __future__ import annotations

import errno
import struct

# --------------------------------------------------------------------------- magics

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes from the server
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle marker and option request magic
NBD_OPT_REPLY_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --------------------------------------------------------------------------- handshake flags

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# --------------------------------------------------------------------------- transmission flags

NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# --------------------------------------------------------------------------- options

NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10

OPTION_NAMES = {
    NBD_OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    NBD_OPT_ABORT: "NBD_OPT_ABORT",
    NBD_OPT_LIST: "NBD_OPT_LIST",
    NBD_OPT_STARTTLS: "NBD_OPT_STARTTLS",
    NBD_OPT_INFO: "NBD_OPT_INFO",
    NBD_OPT_GO: "NBD_OPT_GO",
    NBD_OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    NBD_OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    NBD_OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

# option reply types
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9

REPLY_NAMES = {
    NBD_REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP",
    NBD_REP_ERR_POLICY: "NBD_REP_ERR_POLICY",
    NBD_REP_ERR_INVALID: "NBD_REP_ERR_INVALID",
    NBD_REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM",
    NBD_REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD",
    NBD_REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN",
    NBD_REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    NBD_REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG",
}

# NBD_REP_INFO types
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# --------------------------------------------------------------------------- commands

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

COMMAND_NAMES = {
    NBD_CMD_READ: "NBD_CMD_READ",
    NBD_CMD_WRITE: "NBD_CMD_WRITE",
    NBD_CMD_DISC: "NBD_CMD_DISC",
    NBD_CMD_FLUSH: "NBD_CMD_FLUSH",
    NBD_CMD_TRIM: "NBD_CMD_TRIM",
    NBD_CMD_CACHE: "NBD_CMD_CACHE",
    NBD_CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS",
}

# command flags
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# --------------------------------------------------------------------------- replies

NBD_REPLY_FLAG_DONE = 1 << 0

NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) | 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# error values (the spec's subset of errno, with these exact numbers on the wire)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

ERROR_NAMES = {
    NBD_EPERM: "EPERM",
    NBD_EIO: "EIO",
    NBD_ENOMEM: "ENOMEM",
    NBD_EINVAL: "EINVAL",
    NBD_ENOSPC: "ENOSPC",
    NBD_EOVERFLOW: "EOVERFLOW",
    NBD_ENOTSUP: "ENOTSUP",
    NBD_ESHUTDOWN: "ESHUTDOWN",
}

# What a client can do about a failed request depends on its NBD error: a full storage
# (ENOSPC) will fail again until space is freed, a read-only one (EPERM) always; everything
# else an export's I/O raises is EIO. The same grouping as qemu-nbd's.
_ERRNO_TO_NBD = {
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EPERM: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.ENOMEM: NBD_ENOMEM,
}


def nbd_error(os_errno: int | None) -> int:
    """The NBD error to answer for an ``OSError`` with *os_errno* raised by an export."""
    return _ERRNO_TO_NBD.get(os_errno or 0, NBD_EIO)


# --------------------------------------------------------------------------- meta contexts

BASE_ALLOCATION = "base:allocation"
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"  # followed by the bitmap name
NBD_STATE_HOLE = 1 << 0  # base:allocation: not allocated
NBD_STATE_ZERO = 1 << 1  # base:allocation: reads as zeros
NBD_STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:*: changed

# --------------------------------------------------------------------------- limits

# Largest payload of one request; the spec's recommended maximum block size.
MAX_REQUEST_SIZE = 32 * 1024 * 1024
# Longest option data accepted during negotiation (names, queries).
MAX_OPTION_SIZE = 64 * 1024
MAX_NAME_SIZE = 4096

# --------------------------------------------------------------------------- structs

# server -> client: NBDMAGIC, IHAVEOPT, handshake flags
GREETING = struct.Struct(">QQH")
# client -> server: client flags
CLIENT_FLAGS = struct.Struct(">I")
# client -> server: IHAVEOPT, option, length of option data
OPTION = struct.Struct(">QII")
# server -> client: NBD_OPT_REPLY_MAGIC, option, reply type, length of reply data
OPTION_REPLY = struct.Struct(">QIII")
# reply to NBD_OPT_EXPORT_NAME: export size, transmission flags (then 124 zeros unless NO_ZEROES)
EXPORT_NAME_REPLY = struct.Struct(">QH")
# NBD_REP_INFO payloads: info type, then
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, export size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
INFO_TYPE = struct.Struct(">H")
# NBD_REP_META_CONTEXT payload: context id, then the context name
META_CONTEXT_ID = struct.Struct(">I")
UINT32 = struct.Struct(">I")
UINT16 = struct.Struct(">H")

# client -> server: NBD_REQUEST_MAGIC, command flags, type, cookie, offset, length
REQUEST = struct.Struct(">IHHQQI")
# server -> client: NBD_SIMPLE_REPLY_MAGIC, error, cookie
SIMPLE_REPLY = struct.Struct(">IIQ")
# server -> client: NBD_STRUCTURED_REPLY_MAGIC, reply flags, type, cookie, length of payload
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# chunk payloads
OFFSET_DATA = struct.Struct(">Q")  # offset, then the data
OFFSET_HOLE = struct.Struct(">QI")  # offset, hole size
BLOCK_STATUS = struct.Struct(">I")  # context id, then descriptors
BLOCK_DESCRIPTOR = struct.Struct(">II")  # extent length, status flags
ERROR = struct.Struct(">IH")  # error, message length, then message
ERROR_OFFSET = struct.Struct(">Q")  # after an ERROR payload's message: offset


def is_error_reply_type(reply_type: int) -> bool:
    """Structured reply chunk types with bit 15 set are errors."""
    return bool(reply_type & (1 << 15))
