"""The server side of NBD negotiation: fixed newstyle, from the greeting to the chosen export.

Reference: the NBD protocol specification (``doc/proto.md`` of NetworkBlockDevice/nbd),
"Fixed newstyle negotiation", "TLS support", "Option types", "Metadata querying"::

    S: NBDMAGIC IHAVEOPT (FIXED_NEWSTYLE | NO_ZEROES)     C: client flags
    C: option ─▶ TLS required and not yet on? ─▶ ERR_TLS_REQD (EXPORT_NAME: dropped)
                 over MAX_OPTION_SIZE?        ─▶ skipped, ERR_TOO_BIG (EXPORT_NAME: dropped)
       NBD_OPT_STARTTLS           ─▶ ACK, TLS handshake; what was agreed in the clear is forgotten
       NBD_OPT_STRUCTURED_REPLY   ─▶ ACK (once)
       NBD_OPT_LIST               ─▶ SERVER* ACK
       NBD_OPT_LIST_META_CONTEXT  ─▶ META_CONTEXT* ACK (ids 0)
       NBD_OPT_SET_META_CONTEXT   ─▶ META_CONTEXT* ACK (ids 1, 2...; needs structured replies)
       NBD_OPT_INFO               ─▶ INFO* ACK
       NBD_OPT_GO                 ─▶ INFO* ACK                 ══▶ transmission
       NBD_OPT_EXPORT_NAME        ─▶ size, flags (+124 zeros)  ══▶ transmission
       NBD_OPT_ABORT              ─▶ ACK, connection ends
       anything else              ─▶ ERR_UNSUP

The contract of :class:`Negotiation`: it receives the accepted connection's
:class:`.channel.Channel`, how to find exports by name and list them, and the TLS context
a client must upgrade with (None: plain NBD). :meth:`Negotiation.run` returns an
:class:`Agreement` – the chosen export and its name, structured replies on or off, the
meta contexts by id, whether the client skips the 124 zero bytes – once the client sent
NBD_OPT_GO or NBD_OPT_EXPORT_NAME and every reply was sent. After NBD_OPT_STARTTLS the
channel itself is the TLS-upgraded stream (``Agreement.tls``). It raises
:class:`Disconnect` when the connection must end without transmission (NBD_OPT_ABORT, a
client that breaks the protocol, an unknown NBD_OPT_EXPORT_NAME, which has no error
reply) and lets the channel's errors through (``IncompleteReadError``,
``ConnectionError``, ``ssl.SSLError``). It is not bounded in time: the caller is.
"""

from __future__ import annotations

import dataclasses
import ssl
import struct
from collections.abc import Callable, Mapping

from . import protocol as p
from .channel import Channel
from .exports import Export

__all__ = [
    "PREFERRED_BLOCK_SIZE",
    "Agreement",
    "Disconnect",
    "ExportLister",
    "ExportResolver",
    "Negotiation",
    "transmission_flags",
]

# name -> export (or None if unknown); lets a host map grant tokens to exports
ExportResolver = Callable[[str], Export | None]
# (name, description) of every export NBD_OPT_LIST shows
ExportLister = Callable[[], list[tuple[str, str]]]

PREFERRED_BLOCK_SIZE = 4096


class Disconnect(Exception):
    """End this connection quietly (abort, protocol violation, EOF)."""


@dataclasses.dataclass(frozen=True)
class Agreement:
    """What a negotiation agreed on, for the transmission phase."""

    export: Export
    name: str
    structured: bool  # structured replies (NBD_OPT_STRUCTURED_REPLY)
    contexts: Mapping[int, str]  # id -> meta context, negotiated for this export
    no_zeroes: bool  # the client set NBD_FLAG_C_NO_ZEROES
    tls: bool  # the channel was upgraded by NBD_OPT_STARTTLS


def transmission_flags(export: Export, structured: bool) -> int:
    """The transmission flags advertised for *export* (NBD_FLAG_SEND_DF only with
    structured replies, which carry the unfragmented read)."""
    flags = (
        p.NBD_FLAG_HAS_FLAGS
        | p.NBD_FLAG_SEND_FLUSH
        | p.NBD_FLAG_SEND_FUA
        | p.NBD_FLAG_SEND_TRIM
        | p.NBD_FLAG_SEND_WRITE_ZEROES
        | p.NBD_FLAG_SEND_CACHE
        | p.NBD_FLAG_SEND_FAST_ZERO
    )
    if structured:
        flags |= p.NBD_FLAG_SEND_DF
    if export.read_only:
        flags |= p.NBD_FLAG_READ_ONLY
    if export.multi_conn:
        flags |= p.NBD_FLAG_CAN_MULTI_CONN
    return flags


def _parse_name(data: bytes, what: str) -> tuple[str, int]:
    """A length-prefixed string at the start of *data*, and the bytes it took; ValueError
    when it does not fit or exceeds NBD_MAX_STRING."""
    if len(data) < 4:
        raise ValueError(f"{what}: truncated")
    (n,) = p.UINT32.unpack_from(data)
    if n > p.MAX_NAME_SIZE or 4 + n > len(data):
        raise ValueError(f"{what}: bad name length {n}")
    return data[4 : 4 + n].decode("utf-8", errors="replace"), 4 + n


class Negotiation:
    """The option phase of one connection (see the module docstring for the contract).

    ``export_name`` is the chosen export's name from the moment it is chosen, so a server
    revoking access can find the connection before :meth:`run` has returned."""

    def __init__(
        self,
        channel: Channel,
        resolve: ExportResolver,
        listing: ExportLister,
        tls: ssl.SSLContext | None,
    ):
        self.channel = channel
        self._resolve = resolve
        self._listing = listing
        self.tls = tls
        self.tls_active = False
        self.structured = False
        self.no_zeroes = False
        self.export: Export | None = None
        self.export_name: str | None = None
        self.contexts: dict[int, str] = {}  # id -> name, for the negotiated export
        self._context_export: str | None = None

    async def run(self) -> Agreement:
        """Greet, then answer options until the client chose an export (see the module
        docstring)."""
        channel = self.channel
        channel.write(
            p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES)
        )
        await channel.drain()
        (flags,) = p.CLIENT_FLAGS.unpack(await channel.readexactly(4))
        if flags & ~(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES):
            raise Disconnect(f"unknown client flags 0x{flags:x}")
        self.no_zeroes = bool(flags & p.NBD_FLAG_C_NO_ZEROES)
        while self.export is None:
            magic, option, length = p.OPTION.unpack(await channel.readexactly(p.OPTION.size))
            if magic != p.IHAVEOPT:
                raise Disconnect("bad option magic")
            if length > p.MAX_OPTION_SIZE:
                if option == p.NBD_OPT_EXPORT_NAME:
                    raise Disconnect("oversized export name")
                await self._skip(length)
                self._reply_error(option, p.NBD_REP_ERR_TOO_BIG, "option data too long")
                await channel.drain()
                continue
            data = bytes(await channel.readexactly(length))
            if (
                self.tls is not None
                and not self.tls_active
                and option not in (p.NBD_OPT_STARTTLS, p.NBD_OPT_ABORT)
            ):
                if option == p.NBD_OPT_EXPORT_NAME:
                    raise Disconnect("NBD_OPT_EXPORT_NAME before TLS")
                self._reply_error(option, p.NBD_REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
                await channel.drain()
                continue
            await self._option(option, data)
            await channel.drain()
        assert self.export_name is not None
        return Agreement(
            export=self.export,
            name=self.export_name,
            structured=self.structured,
            contexts=dict(self.contexts),
            no_zeroes=self.no_zeroes,
            tls=self.tls_active,
        )

    # ------------------------------------------------------------------ replies

    def _reply_option(self, option: int, reply: int, data: bytes = b"") -> None:
        self.channel.write(p.OPTION_REPLY.pack(p.NBD_OPT_REPLY_MAGIC, option, reply, len(data)) + data)

    def _reply_error(self, option: int, reply: int, message: str) -> None:
        self._reply_option(option, reply, message.encode())

    async def _skip(self, n: int) -> None:
        while n:
            chunk = await self.channel.read(min(n, 65536))
            if not chunk:
                raise Disconnect("EOF in option data")
            n -= len(chunk)

    # ------------------------------------------------------------------ options

    async def _option(self, option: int, data: bytes) -> None:
        if option == p.NBD_OPT_EXPORT_NAME:
            self._export_name(data)
        elif option == p.NBD_OPT_ABORT:
            self._reply_option(option, p.NBD_REP_ACK)
            await self.channel.drain()
            raise Disconnect("client aborted")
        elif option == p.NBD_OPT_LIST:
            self._list(data)
        elif option == p.NBD_OPT_STARTTLS:
            await self._starttls(data)
        elif option in (p.NBD_OPT_INFO, p.NBD_OPT_GO):
            self._info_or_go(option, data)
        elif option == p.NBD_OPT_STRUCTURED_REPLY:
            if data:
                self._reply_error(option, p.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.structured:
                self._reply_error(option, p.NBD_REP_ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured = True
                self._reply_option(option, p.NBD_REP_ACK)
        elif option in (p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
        else:
            self._reply_error(option, p.NBD_REP_ERR_UNSUP, f"option {option} not supported")

    def _export_name(self, data: bytes) -> None:
        """NBD_OPT_EXPORT_NAME: the old way into transmission, with no way to refuse."""
        name = data.decode("utf-8", errors="replace")
        export = self._resolve(name)
        if export is None:
            raise Disconnect(f"unknown export {name!r}")  # no way to reply an error
        self._select(name, export)
        reply = p.EXPORT_NAME_REPLY.pack(export.size, transmission_flags(export, self.structured))
        self.channel.write(reply if self.no_zeroes else reply + bytes(124))

    def _list(self, data: bytes) -> None:
        option = p.NBD_OPT_LIST
        if data:
            self._reply_error(option, p.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        for name, description in self._listing():
            raw = name.encode()
            self._reply_option(option, p.NBD_REP_SERVER, p.UINT32.pack(len(raw)) + raw + description.encode())
        self._reply_option(option, p.NBD_REP_ACK)

    async def _starttls(self, data: bytes) -> None:
        option = p.NBD_OPT_STARTTLS
        if data:
            self._reply_error(option, p.NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        elif self.tls is None:
            self._reply_error(option, p.NBD_REP_ERR_UNSUP, "TLS is not configured")
        elif self.tls_active:
            self._reply_error(option, p.NBD_REP_ERR_INVALID, "TLS already negotiated")
        else:
            self._reply_option(option, p.NBD_REP_ACK)
            await self.channel.drain()
            await self.channel.start_tls(self.tls)
            self.tls_active = True
            # options negotiated in the clear do not survive the upgrade
            self.structured = False
            self.contexts = {}
            self._context_export = None

    def _info_or_go(self, option: int, data: bytes) -> None:
        try:
            name, pos = _parse_name(data, "export name")
            if pos + 2 > len(data):
                raise ValueError("truncated information request count")
            (count,) = p.UINT16.unpack_from(data, pos)
            pos += 2
            if pos + 2 * count != len(data):
                raise ValueError("information request list does not match its count")
            requests = struct.unpack_from(f">{count}H", data, pos)
        except ValueError as error:
            self._reply_error(option, p.NBD_REP_ERR_INVALID, str(error))
            return
        export = self._resolve(name)
        if export is None:
            self._reply_error(option, p.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        self._reply_option(
            option,
            p.NBD_REP_INFO,
            p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, export.size, transmission_flags(export, self.structured)),
        )
        if p.NBD_INFO_NAME in requests:
            self._reply_option(option, p.NBD_REP_INFO, p.INFO_TYPE.pack(p.NBD_INFO_NAME) + name.encode())
        if p.NBD_INFO_DESCRIPTION in requests and export.description:
            self._reply_option(
                option, p.NBD_REP_INFO, p.INFO_TYPE.pack(p.NBD_INFO_DESCRIPTION) + export.description.encode()
            )
        self._reply_option(
            option,
            p.NBD_REP_INFO,
            p.INFO_BLOCK_SIZE.pack(
                p.NBD_INFO_BLOCK_SIZE,
                export.min_block_size,
                max(PREFERRED_BLOCK_SIZE, export.min_block_size),
                p.MAX_REQUEST_SIZE,
            ),
        )
        self._reply_option(option, p.NBD_REP_ACK)
        if option == p.NBD_OPT_GO:
            self._select(name, export)

    def _select(self, name: str, export: Export) -> None:
        self.export = export
        self.export_name = name
        if self._context_export != name:
            self.contexts = {}  # contexts were negotiated for another export

    def _meta_context(self, option: int, data: bytes) -> None:
        setting = option == p.NBD_OPT_SET_META_CONTEXT
        if setting and not self.structured:
            self._reply_error(option, p.NBD_REP_ERR_INVALID, "negotiate structured replies first")
            return
        try:
            name, queries = _parse_meta_query(data)
        except ValueError as error:
            self._reply_error(option, p.NBD_REP_ERR_INVALID, str(error))
            return
        export = self._resolve(name)
        if export is None:
            self._reply_error(option, p.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        chosen = _match_contexts([p.BASE_ALLOCATION, *export.contexts()], queries, setting)
        if setting:
            self.contexts = {}
            self._context_export = name
        for index, context in enumerate(chosen, start=1):
            context_id = index if setting else 0
            if setting:
                self.contexts[context_id] = context
            self._reply_option(
                option, p.NBD_REP_META_CONTEXT, p.META_CONTEXT_ID.pack(context_id) + context.encode()
            )
        self._reply_option(option, p.NBD_REP_ACK)


def _parse_meta_query(data: bytes) -> tuple[str, list[str]]:
    """The export name and the queries of NBD_OPT_{LIST,SET}_META_CONTEXT; ValueError
    when the data does not hold exactly that."""
    name, pos = _parse_name(data, "export name")
    if pos + 4 > len(data):
        raise ValueError("truncated query count")
    (count,) = p.UINT32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        query, used = _parse_name(data[pos:], "query")
        queries.append(query)
        pos += used
    if pos != len(data):
        raise ValueError("trailing bytes after the queries")
    return name, queries


def _match_contexts(available: list[str], queries: list[str], setting: bool) -> list[str]:
    """The contexts of *available* the *queries* select, each once, in order: SET takes
    exact names only; LIST with no query lists all, and a namespace query (``base:``,
    ``qemu:``, anything ending in ``:``) lists the contexts under it."""
    if setting:
        return [c for c in dict.fromkeys(queries) if c in available]
    if not queries:
        return available
    chosen: list[str] = []
    for query in queries:
        if query.endswith(":") or query in ("base:", "qemu:"):
            chosen.extend(c for c in available if c.startswith(query))
        elif query in available:
            chosen.append(query)
    return list(dict.fromkeys(chosen))
