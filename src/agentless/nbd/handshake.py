"""The client side of NBD negotiation: fixed newstyle handshake up to the transmission phase,
or up to the export list.

Reference: the NBD protocol specification (``doc/proto.md`` of NetworkBlockDevice/nbd),
"Fixed newstyle negotiation", "TLS support", "Option types"::

    S: NBDMAGIC IHAVEOPT handshake-flags       C: client flags (FIXED_NEWSTYLE, NO_ZEROES)
    C: NBD_OPT_STARTTLS            -> ACK, then the TLS handshake    (nbds:// only)
    C: NBD_OPT_STRUCTURED_REPLY    -> ACK | ERR_UNSUP                (unsupported: simple replies)
    C: NBD_OPT_SET_META_CONTEXT    -> META_CONTEXT* ACK              (only with structured replies)
    C: NBD_OPT_GO + BLOCK_SIZE, NAME, DESCRIPTION requests
                                   -> INFO* ACK       enter transmission
                                   -> ERR_UNSUP       old server: NBD_OPT_EXPORT_NAME instead
                                   -> ERR_*           NegotiationError

:func:`negotiate` runs that sequence on a :class:`.connection.Connection` and returns the
:class:`Negotiated` parameters of the export; :func:`negotiate_list` asks for NBD_OPT_LIST
instead. A refusal raises :class:`NegotiationError`; anything the server sends against the
protocol raises :class:`ProtocolError` and drops the connection.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from . import tls
from .connection import Connection
from .errors import ConnectionLost, NbdError, NegotiationError
from .protocol import (
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_TYPE,
    MAX_OPTION_SIZE,
    META_CONTEXT_ID,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_LIST,
    NBD_OPT_REPLY_MAGIC,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_SHUTDOWN,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_UNSUP,
    NBD_REP_FLAG_ERROR,
    NBD_REP_INFO,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    NBDMAGIC,
    OPTION,
    OPTION_NAMES,
    OPTION_REPLY,
    REPLY_NAMES,
    UINT16,
    UINT32,
)
from .uri import NbdUri, shown_export

__all__ = ["NO_LIMIT", "Negotiated", "negotiate", "negotiate_list"]

log = logging.getLogger(__name__)

# A maximum block size of 0xffffffff: no limit of the server's own.
NO_LIMIT = 0xFFFFFFFF
# Oldstyle negotiation's second magic ("cliserv_magic"), recognised only to refuse it.
_CLISERV_MAGIC = 0x00420281861253


@dataclasses.dataclass
class Negotiated:
    """What the negotiation settled about the export: its ``size``, ``transmission_flags``
    and ``export_name``, the ``description`` and ``block_sizes`` (minimum, preferred,
    maximum) when the server sent them, whether ``structured`` replies were negotiated, and
    the negotiated meta ``contexts`` (name -> id)."""

    size: int
    transmission_flags: int
    export_name: str
    description: str | None
    block_sizes: tuple[int, int, int] | None
    structured: bool
    contexts: dict[str, int]


def negotiate(
    conn: Connection,
    target: NbdUri,
    *,
    tls_cert: str | bytes | None,
    meta_contexts: Sequence[str],
    structured_replies: bool,
) -> Negotiated:
    """Negotiate the export of *target* on *conn* up to the transmission phase: TLS pinned
    to *tls_cert* for ``nbds://`` (which needs it), structured replies if wanted and
    offered, *meta_contexts* with structured replies, then NBD_OPT_GO (NBD_OPT_EXPORT_NAME
    for servers without it or without fixed newstyle)."""
    handshake = _Handshake(conn)
    fixed = handshake.greeting()
    if target.tls:
        assert tls_cert is not None
        handshake.starttls(tls_cert)
    if fixed and structured_replies:
        handshake.negotiate_structured()
    if handshake.structured and meta_contexts:
        handshake.set_meta_contexts(target.export, meta_contexts)
    if fixed:
        return handshake.go(target.export)
    return handshake.send_export_name(target.export)


def negotiate_list(
    conn: Connection, target: NbdUri, *, tls_cert: str | bytes | None
) -> list[tuple[str, str]]:
    """(name, description) of the exports the server of *conn* lists (NBD_OPT_LIST), after
    TLS pinned to *tls_cert* for ``nbds://``. NegotiationError if it refuses to list."""
    handshake = _Handshake(conn)
    if not handshake.greeting():
        raise NegotiationError(f"{target.shown()}: the server does not speak fixed newstyle; no export list")
    if target.tls:
        assert tls_cert is not None
        handshake.starttls(tls_cert)
    return handshake.list()


class _Handshake:
    """The negotiation on one connection, and what it has settled so far."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._no_zeroes = False
        self.structured = False
        self.contexts: dict[str, int] = {}
        self.export_name = ""
        self.description: str | None = None

    def greeting(self) -> bool:
        """Read the server's greeting, answer with the client flags; True for fixed newstyle."""
        magic, second, handshake_flags = GREETING.unpack(self._conn.recv(GREETING.size))
        if magic != NBDMAGIC:
            raise self._conn.violation(f"not an NBD server (magic {magic:#x})")
        if second == _CLISERV_MAGIC:
            raise NegotiationError("the server speaks oldstyle negotiation, which is not supported")
        if second != IHAVEOPT:
            raise self._conn.violation(f"bad newstyle magic {second:#x}")
        flags = 0
        fixed = bool(handshake_flags & NBD_FLAG_FIXED_NEWSTYLE)
        if fixed:
            flags |= NBD_FLAG_C_FIXED_NEWSTYLE
        if handshake_flags & NBD_FLAG_NO_ZEROES:
            flags |= NBD_FLAG_C_NO_ZEROES
            self._no_zeroes = True
        self._conn.send([CLIENT_FLAGS.pack(flags)])
        return fixed

    def starttls(self, pinned_pem: str | bytes) -> None:
        """NBD_OPT_STARTTLS, then the TLS handshake trusting exactly *pinned_pem*."""
        self._option(NBD_OPT_STARTTLS)
        reply, data = self._option_reply(NBD_OPT_STARTTLS)
        if reply != NBD_REP_ACK:
            raise self._unexpected(NBD_OPT_STARTTLS, reply, data)
        sock = self._conn.start_tls(tls.client_context(pinned_pem))
        tls.check_pinned(sock, pinned_pem)

    def negotiate_structured(self) -> None:
        """NBD_OPT_STRUCTURED_REPLY; a refusal leaves simple replies."""
        self._option(NBD_OPT_STRUCTURED_REPLY)
        reply, data = self._option_reply(NBD_OPT_STRUCTURED_REPLY)
        if reply == NBD_REP_ACK:
            self.structured = True
        elif not reply & NBD_REP_FLAG_ERROR:
            raise self._unexpected(NBD_OPT_STRUCTURED_REPLY, reply, data)

    def set_meta_contexts(self, export: str, queries: Sequence[str]) -> None:
        """NBD_OPT_SET_META_CONTEXT; ``contexts`` is what the server selected (may be none)."""
        name = export.encode()
        data = [UINT32.pack(len(name)), name, UINT32.pack(len(queries))]
        for query in queries:
            encoded = query.encode()
            data += [UINT32.pack(len(encoded)), encoded]
        self._option(NBD_OPT_SET_META_CONTEXT, b"".join(data))
        contexts: dict[str, int] = {}
        while True:
            reply, payload = self._option_reply(NBD_OPT_SET_META_CONTEXT)
            if reply == NBD_REP_META_CONTEXT:
                if len(payload) <= META_CONTEXT_ID.size:
                    raise self._conn.violation(f"NBD_REP_META_CONTEXT of {len(payload)} bytes")
                (context_id,) = META_CONTEXT_ID.unpack_from(payload)
                contexts[self._text(payload[META_CONTEXT_ID.size :])] = context_id
            elif reply == NBD_REP_ACK:
                break
            elif reply & NBD_REP_FLAG_ERROR:
                # the server selected nothing; "the client MUST disregard any context replies"
                log.debug("%s: NBD_OPT_SET_META_CONTEXT refused: %s", self._conn.where, _reply_name(reply))
                contexts = {}
                break
            else:
                raise self._unexpected(NBD_OPT_SET_META_CONTEXT, reply, payload)
        self.contexts = contexts

    def go(self, export: str) -> Negotiated:
        """NBD_OPT_GO asking for the block size, name and description; NBD_OPT_EXPORT_NAME
        when the server does not know NBD_OPT_GO."""
        name = export.encode()
        infos = (NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, NBD_INFO_DESCRIPTION)
        data = [UINT32.pack(len(name)), name, UINT16.pack(len(infos))]
        data += [UINT16.pack(info) for info in infos]
        self._option(NBD_OPT_GO, b"".join(data))
        export_info: tuple[int, int] | None = None
        block_sizes: tuple[int, int, int] | None = None
        self.export_name = export
        while True:
            reply, payload = self._option_reply(NBD_OPT_GO)
            if reply == NBD_REP_INFO:
                if len(payload) < INFO_TYPE.size:
                    raise self._conn.violation(f"NBD_REP_INFO of {len(payload)} bytes")
                (info,) = INFO_TYPE.unpack_from(payload)
                if info == NBD_INFO_EXPORT:
                    if len(payload) != INFO_EXPORT.size:
                        raise self._conn.violation(f"NBD_INFO_EXPORT of {len(payload)} bytes")
                    _, size, flags = INFO_EXPORT.unpack(payload)
                    export_info = (size, flags)
                elif info == NBD_INFO_BLOCK_SIZE:
                    if len(payload) != INFO_BLOCK_SIZE.size:
                        raise self._conn.violation(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
                    _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(payload)
                    block_sizes = (minimum, preferred, maximum)
                elif info == NBD_INFO_NAME:
                    self.export_name = self._text(payload[INFO_TYPE.size :])
                elif info == NBD_INFO_DESCRIPTION:
                    self.description = self._text(payload[INFO_TYPE.size :])
                # "The client MUST ignore information replies it does not understand."
            elif reply == NBD_REP_ACK:
                break
            elif reply == NBD_REP_ERR_UNSUP:
                # an old server: "clients SHOULD ... fall back to using NBD_OPT_EXPORT_NAME"
                log.debug("%s: NBD_OPT_GO unsupported, using NBD_OPT_EXPORT_NAME", self._conn.where)
                return self.send_export_name(export)
            else:
                raise self._unexpected(NBD_OPT_GO, reply, payload)
        if export_info is None:
            raise self._conn.violation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
        return self._negotiated(*export_info, block_sizes)

    def send_export_name(self, export: str) -> Negotiated:
        """NBD_OPT_EXPORT_NAME, which ends the negotiation (the server hangs up on an
        unknown export)."""
        self._option(NBD_OPT_EXPORT_NAME, export.encode())
        length = EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124)
        try:
            data = self._conn.recv(length)
        except ConnectionLost as e:
            # "If the chosen export does not exist ... the server MUST terminate the session."
            refused = f"the server refused export {shown_export(export)}"
            raise NegotiationError(f"{self._conn.where}: {refused}") from e
        size, flags = EXPORT_NAME_REPLY.unpack_from(data)
        self.export_name = export
        return self._negotiated(size, flags, None)

    def list(self) -> list[tuple[str, str]]:
        """NBD_OPT_LIST: (name, description) of each export."""
        self._option(NBD_OPT_LIST)
        exports = []
        while True:
            reply, data = self._option_reply(NBD_OPT_LIST)
            if reply == NBD_REP_SERVER:
                if len(data) < UINT32.size:
                    raise self._conn.violation(f"NBD_REP_SERVER of {len(data)} bytes")
                (length,) = UINT32.unpack_from(data)
                end = UINT32.size + length
                if end > len(data):
                    raise self._conn.violation(f"NBD_REP_SERVER name of {length} bytes in {len(data)}")
                exports.append((self._text(data[UINT32.size : end]), self._text(data[end:])))
            elif reply == NBD_REP_ACK:
                return exports
            else:
                raise self._unexpected(NBD_OPT_LIST, reply, data)

    def _negotiated(self, size: int, flags: int, block_sizes: tuple[int, int, int] | None) -> Negotiated:
        """The parameters to enter transmission with, once the block size constraints
        ("Block size constraints") are checked."""
        if block_sizes is not None:
            minimum, preferred, maximum = block_sizes
            if (
                not 0 < minimum <= 65536
                or minimum & (minimum - 1)
                or preferred < minimum
                or maximum < minimum
                or (maximum != NO_LIMIT and maximum % minimum)
            ):
                raise self._conn.violation(f"bad block size constraints {block_sizes}")
        return Negotiated(
            size=size,
            transmission_flags=flags,
            export_name=self.export_name,
            description=self.description,
            block_sizes=block_sizes,
            structured=self.structured,
            contexts=self.contexts,
        )

    def _option(self, option: int, data: bytes = b"") -> None:
        self._conn.send([OPTION.pack(IHAVEOPT, option, len(data)), data])

    def _option_reply(self, option: int) -> tuple[int, bytearray]:
        """One reply to *option*: (reply type, data). TLS_REQD and SHUTDOWN end the
        negotiation whatever the option."""
        magic, replied_to, reply, length = OPTION_REPLY.unpack(self._conn.recv(OPTION_REPLY.size))
        if magic != NBD_OPT_REPLY_MAGIC:
            raise self._conn.violation(f"bad option reply magic {magic:#x}")
        if replied_to != option:
            raise self._conn.violation(
                f"reply to option {replied_to} while waiting for {_option_name(option)}"
            )
        if length > MAX_OPTION_SIZE:
            raise self._conn.violation(f"option reply of {length} bytes")
        data = self._conn.recv(length)
        if reply in (NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_SHUTDOWN):
            raise _refusal(option, reply, data, self._conn.where)
        return reply, data

    def _unexpected(self, option: int, reply: int, data: bytes | bytearray) -> NbdError:
        """The error for a reply the caller does not accept: a refusal or a violation."""
        if reply & NBD_REP_FLAG_ERROR:
            return _refusal(option, reply, data, self._conn.where)
        return self._conn.violation(f"unexpected reply {reply} to {_option_name(option)}")

    def _text(self, data: bytes | bytearray) -> str:
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise self._conn.violation(f"a string that is not UTF-8: {bytes(data[:64])!r}") from None


def _refusal(option: int, reply: int, data: bytes | bytearray, where: str) -> NegotiationError:
    text = data.decode("utf-8", "replace")
    message = f"{where}: {_option_name(option)} refused with {_reply_name(reply)}"
    if reply == NBD_REP_ERR_TLS_REQD:
        message += " (the server requires TLS: use an nbds:// URI)"
    return NegotiationError(f"{message}: {text}" if text else message, reply)


def _option_name(option: int) -> str:
    return OPTION_NAMES.get(option, f"option {option}")


def _reply_name(reply: int) -> str:
    return REPLY_NAMES.get(reply, f"reply {reply:#x}")
