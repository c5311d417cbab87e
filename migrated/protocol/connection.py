"""Sans-IO endpoint of one TCP connection of a migration session.

The object owns no socket and no clock.  The I/O layer feeds it bytes
(:meth:`Connection.receive_data`, or :meth:`payload_target` + :meth:`payload_written`
for zero-copy payload reception), pulls events (:meth:`next_event`) and writes what
:meth:`send` returns.

What it enforces, per connection:

* framing and hostile-input limits (header ≤ 64 KiB, payload limits per message);
* the opening handshake: the source sends ``Hello`` first and nothing else until the
  destination's ``Welcome`` (or ``Error``); the destination sends nothing before it
  has received ``Hello`` and then answers ``Welcome`` or ``Error``; a resumed MAIN
  connection carries ``ReceivedBitmap`` right after ``Welcome``;
* which messages each role may send on each channel (:data:`CHANNEL_RULES`);
* page ranges against the memory layout (from ``Setup`` on MAIN, or
  :meth:`set_layout`) *before* an event or its payload is handed out;
* payload checksums when negotiated (``checksum-xxh3`` preferred over ``checksum-crc32``).

Session-level order (Setup before Pages, no Cancel after Running, ...) is the job of
:class:`~migrated.protocol.state.SessionState`, which sees events of all channels.

Errors: :meth:`next_event` raises ``RemoteProtocolError`` when the peer breaks a rule
and ``LocalProtocolError`` when our own sink misbehaves; after either, the receive side
is dead and every later call raises the same error (send an ``Error`` and close).
:meth:`send` raises ``LocalProtocolError`` and sends nothing.  Nothing else is raised.
After an ``Error`` was sent, only closing remains; after one was received, the peer may
send nothing more.

Deviation from the first design note: ``payload_target()`` drains bytes buffered inside
the decoder into the sink first, and returns ``None`` when that completed the payload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from migrated.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from migrated.protocol import codec
from migrated.protocol import events as ev
from migrated.protocol.events import ChannelRole, Role
from migrated.protocol.layout import MemoryLayout
from migrated.protocol.rules import CHANNEL_RULES, Phase, check_welcome
from migrated.protocol.rules import negotiate as negotiate  # re-exported

_RANGE_EVENTS = (ev.ZeroPages, ev.Discard, ev.PageRequest)
_RESUME_ANSWERS = frozenset({ev.ReceivedBitmap, ev.Ready, ev.Complete, ev.Error})
_PAGES_SPEC = codec.BY_CODE[codec.PAGES_CODE]
_EMPTY = memoryview(b"")
# Bytes fed to the msgpack decoder at a time while looking for the end of a header.
_HEADER_WINDOW = 512

PayloadSink = Callable[[Any], "memoryview | None"]


class Connection:
    """One endpoint of one TCP connection.  See the module docstring for the contract.

    ``role`` is this side's role (the source connects).  ``channel`` is what the
    connection carries; a destination that accepts connections does not know that
    yet and passes ``None``: the connection then adopts the role its ``Hello``
    announces.  ``layout`` may be given for URGENT/BULK connections and for
    resumed MAIN connections (a fresh MAIN connection learns it from ``Setup``).
    ``max_frame_payload`` bounds a ``Pages`` payload in bytes (≤ 16 MiB).
    """

    def __init__(
        self,
        role: Role,
        channel: ChannelRole | None = ChannelRole.MAIN,
        *,
        layout: MemoryLayout | None = None,
        max_frame_payload: int = ev.MAX_PAGES_PAYLOAD_NBYTES,
    ) -> None:
        if not 0 < max_frame_payload <= ev.MAX_PAGES_PAYLOAD_NBYTES:
            raise ValueError(f"max_frame_payload must be 1..{ev.MAX_PAGES_PAYLOAD_NBYTES}")
        if channel is None and role is not Role.DESTINATION:
            raise ValueError("only an accepting destination may leave the channel unknown")
        self.role = role
        self.channel = channel
        self.layout = layout
        self.max_frame_payload = max_frame_payload
        self.phase = Phase.START
        self.hello: ev.Hello | None = None
        self.welcome: ev.Welcome | None = None
        #: Negotiated checksum algorithm ("xxh3", "crc32" or None); set by the handshake.
        self.checksum: str | None = None
        self.error_sent = False
        self.error_received = False
        # Resumed MAIN: the destination's first frame after Welcome answers the resume.
        self._answer_due = False
        self._fast_send = self._fast_recv = False
        self._send_allowed: frozenset[type] = frozenset()
        self._recv_allowed: frozenset[type] = frozenset()
        if channel is not None:
            self._adopt_channel(channel)
        # Receive buffer: immutable chunks (views of bytes objects), consumed from _head.
        self._chunks: list[memoryview] = []
        self._head = 0
        self._navail = 0
        self._eof = False
        self._dead: ProtocolError | None = None
        self._unpacker = codec.new_unpacker()
        self._pack = codec.new_packer()
        self._tell0 = 0
        self._hdr_fed = 0
        # Current payload (valid while _pl_event is not None).
        self._sink: PayloadSink | None = None
        self._pl_event: Any = None
        self._pl_spec: codec.MessageSpec | None = None
        self._pl_nbytes = 0
        self._pl_filled = 0
        self._pl_checksum: int | None = None
        self._pl_target: memoryview | None = None
        self._pl_parts: list[memoryview] = []

    def _adopt_channel(self, channel: ChannelRole) -> None:
        self.channel = channel
        self._send_allowed = CHANNEL_RULES[(channel, self.role)]
        self._recv_allowed = CHANNEL_RULES[(channel, self.role.peer)]

    # --- configuration ---------------------------------------------------------------

    def set_layout(self, layout: MemoryLayout) -> None:
        """Give the layout to a connection that will not see ``Setup`` (URGENT, BULK,
        resumed MAIN).  Raises LocalProtocolError if a different layout is known."""
        if self.layout is not None and self.layout != layout:
            raise LocalProtocolError("this connection already has a different memory layout")
        self.layout = layout
        self._update_fast()

    def set_payload_sink(self, sink: PayloadSink | None) -> None:
        """Install ``sink(header_event) -> memoryview | None`` for zero-copy payloads.

        Called once per payload frame when its header has been validated, with the
        event whose ``data`` is None.  Return a writable contiguous buffer of exactly
        the payload length (the event's ``data`` will be that buffer), or None to let
        the connection assemble the payload itself.  A wrong buffer raises
        LocalProtocolError from ``next_event``.  ``None`` uninstalls the sink.
        """
        self._sink = sink

    # --- sending ---------------------------------------------------------------------

    def send(self, event: Any) -> list[bytes | memoryview]:
        """Encode ``event``; returns the buffers to write, in order: the header bytes,
        then the payload buffer itself (not copied: keep it unchanged until written).

        Raises LocalProtocolError (nothing is sent) if the event is invalid or not
        allowed now on this connection.
        """
        t = type(event)
        if t is ev.Pages and self._fast_send:
            fast = self._send_pages_fast(event)
            if fast is not None:
                return fast
        if self.error_sent:
            raise LocalProtocolError("this connection already sent Error; close it")
        if t is not ev.Error:
            self._check_send_allowed(event, t)
        spec, wire = codec.encode_fields(event)
        try:
            if spec.payload is codec.Payload.NONE:
                if t in _RANGE_EVENTS:
                    codec.check_event_ranges(event, self.layout)
                self._after_send(event, t)
                return [self._pack(wire)]
            trailer, view = codec.encode_trailer(
                spec, event, self.layout, self.max_frame_payload, self.checksum
            )
        except codec.FieldError as exc:
            raise LocalProtocolError(f"cannot send {t.__name__}: {exc}", code=exc.code) from None
        wire += trailer
        self._after_send(event, t)
        return [self._pack(wire), view]

    def _send_pages_fast(self, event: ev.Pages) -> list[bytes | memoryview] | None:
        """Pages on an open connection, hand-inlined; returns None to fall back to the
        table-driven path (which then raises the precise error).  Produces exactly the
        bytes the table path produces (a test checks)."""
        gpa, npages, data, request_id = event.gpa, event.npages, event.data, event.request_id
        layout = self.layout
        if (
            type(gpa) is not int
            or type(npages) is not int
            or type(request_id) is not int
            or type(data) is not memoryview
            or layout is None
            or not 0 < npages < 1 << 32
            or not 0 <= request_id < codec.U64_LIMIT
            or data.format != "B"
            or data.ndim != 1
            or not data.c_contiguous
        ):
            return None
        try:
            nbytes = layout.range_nbytes(gpa, npages)
        except RemoteProtocolError:
            return None
        if nbytes != data.nbytes or nbytes > self.max_frame_payload:
            return None
        algo = self.checksum
        checksum = None if algo is None else codec.CHECKSUMS[algo](data, gpa)
        return [self._pack([codec.PAGES_CODE, gpa, npages, request_id, checksum]), data]

    def _update_fast(self) -> None:
        """Recompute whether Pages may take the fast paths (open, layout known, ...)."""
        usable = self.phase is Phase.OPEN and self.layout is not None
        self._fast_send = usable and not self.error_sent and ev.Pages in self._send_allowed
        self._fast_recv = usable and not self.error_received and ev.Pages in self._recv_allowed

    def _check_send_allowed(self, event: Any, t: type) -> None:
        phase = self.phase
        if phase is Phase.OPEN:
            if t not in self._send_allowed:
                raise LocalProtocolError(
                    f"the {self.role.value} may not send {t.__name__} on the "
                    f"{self.channel.name if self.channel is not None else 'unknown'} channel",
                    code=ev.ErrorCode.UNEXPECTED,
                )
            if self.role is Role.DESTINATION:
                self._check_resume_answer(t, LocalProtocolError)
            return
        if phase is Phase.START and self.role is Role.SOURCE and t is ev.Hello:
            if event.role is not self.channel:
                raise LocalProtocolError(f"Hello.role {event.role!r} differs from this channel")
            return
        if phase is Phase.HANDSHAKE and self.role is Role.DESTINATION and t is ev.Welcome:
            self._check_welcome(event, LocalProtocolError)
            return
        raise LocalProtocolError(
            f"the {self.role.value} may not send {t.__name__} during the handshake "
            f"(phase {phase.value})",
            code=ev.ErrorCode.UNEXPECTED,
        )

    def _after_send(self, event: Any, t: type) -> None:
        if t is not ev.Pages and t is not ev.ZeroPages:
            self._after(event, t, sent=True)

    def _after(self, event: Any, t: type, *, sent: bool) -> None:
        """Connection bookkeeping after an event was sent or received."""
        if t is ev.Hello:
            if not sent and self.channel is None:
                self._adopt_channel(event.role)
            self.hello = event
            self.phase = Phase.HANDSHAKE
        elif t is ev.Welcome:
            self._open(event)
        elif t is ev.Error:
            if sent:
                self.error_sent = True
            else:
                self.error_received = True
            if self.phase is not Phase.OPEN:
                self.phase = Phase.CLOSED
        elif t is ev.Setup:
            self.layout = event.layout
        if self._answer_due and (self.role is Role.DESTINATION) == sent and t is not ev.Welcome:
            self._answer_due = False  # the destination has answered the resume
        self._update_fast()

    def _check_resume_answer(self, t: type, error: type[ProtocolError]) -> None:
        """A frame from the destination on an open connection: on a resumed MAIN the
        first one answers the resume (docs/protocol.md §7); ReceivedBitmap is never
        sent otherwise."""
        if self._answer_due and t not in _RESUME_ANSWERS:
            raise error(
                f"{t.__name__} before the answer to the resume (ReceivedBitmap, Ready or Complete)",
                code=ev.ErrorCode.UNEXPECTED,
            )
        if t is ev.ReceivedBitmap and not self._answer_due:
            raise error(
                "ReceivedBitmap is only the first frame after a resume Welcome",
                code=ev.ErrorCode.UNEXPECTED,
            )

    def _open(self, welcome: ev.Welcome) -> None:
        assert self.hello is not None
        self.welcome = welcome
        self.checksum = codec.choose_checksum(welcome.features)
        self.phase = Phase.OPEN
        self._answer_due = self.hello.resume and self.channel is ChannelRole.MAIN

    def _check_welcome(self, welcome: ev.Welcome, error: type[ProtocolError]) -> None:
        assert self.hello is not None
        check_welcome(self.hello, welcome, error)

    # --- receiving -------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the stream; ``b""`` means the peer closed it (EOF).

        ``bytes`` are kept by reference; mutable buffers are copied unless they go
        straight into a sink.  Raises LocalProtocolError if data follows EOF.
        """
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        if n == 0:
            self._eof = True
            return
        view = memoryview(data)
        if type(data) is not bytes and (view.format != "B" or view.ndim != 1):
            view = view.cast("B")
        target = self._pl_target
        if target is not None and self._navail == 0:
            take = min(n, self._pl_nbytes - self._pl_filled)
            target[self._pl_filled : self._pl_filled + take] = view[:take]
            self._pl_filled += take
            if take == n:
                return
            view = view[take:]
            n -= take
        if type(data) is not bytes:
            view = memoryview(view.tobytes())
        self._push(view)

    def _push(self, view: memoryview) -> None:
        self._chunks.append(view)
        self._navail += view.nbytes

    def payload_target(self) -> memoryview | None:
        """The unfilled part of the current sink buffer, or None when not inside a
        sinked payload (or when buffered bytes just completed it).  Write received
        bytes there and report them with :meth:`payload_written`."""
        if self._pl_target is None:
            return None
        if self._navail:
            self._drain_payload()
        if self._pl_filled == self._pl_nbytes:
            return None
        return self._pl_target[self._pl_filled :]

    def payload_written(self, nbytes: int) -> None:
        """Record ``nbytes`` written into the view from :meth:`payload_target`.

        Raises LocalProtocolError if no sinked payload is in progress or ``nbytes`` is
        not 1..remaining.
        """
        if self._pl_target is None or self._navail:
            raise LocalProtocolError("payload_written() without a current payload_target()")
        if not 0 < nbytes <= self._pl_nbytes - self._pl_filled:
            raise LocalProtocolError(f"payload_written({nbytes}) exceeds the payload")
        self._pl_filled += nbytes

    def poison(self, exc: ProtocolError) -> None:
        """Make the receive side dead with ``exc`` (the session refused an event this
        connection decoded): every later :meth:`next_event` raises it."""
        self._dead = exc

    @property
    def in_payload(self) -> bool:
        """True while a payload frame's header was read but its payload is incomplete."""
        return self._pl_event is not None

    def next_event(self) -> Any:
        """The next complete event, :data:`NEED_DATA`, or ``ConnectionClosed`` after a
        clean EOF at a frame boundary.  Raises as described in the module docstring."""
        if self._dead is not None:
            raise self._dead
        try:
            if self._pl_event is not None:
                return self._continue_payload()
            obj = self._read_header()
            if obj is ev.NEED_DATA:
                return self._at_need_data()
            if (
                self._fast_recv
                and type(obj) is list
                and len(obj) == 5
                and obj[0] == codec.PAGES_CODE
                and type(obj[0]) is int
            ):
                header = self._recv_pages_fast(obj)
                if header is not None:
                    if not self._navail and not self._eof:
                        return ev.NEED_DATA  # the usual case: the payload is still on the wire
                    return self._continue_payload()
            return self._decode(obj)
        except ProtocolError as exc:
            self._dead = exc
            raise

    def _at_need_data(self) -> Any:
        if not self._eof:
            return ev.NEED_DATA
        if self._navail or self._hdr_fed:
            raise RemoteProtocolError(
                "the stream ended inside a frame header", code=ev.ErrorCode.TRUNCATED
            )
        return ev.ConnectionClosed()

    def _decode(self, obj: Any) -> Any:
        """The table-driven path for every header."""
        spec, event, trailer = codec.decode_fields(obj)
        t = spec.cls
        if self.error_received:
            raise RemoteProtocolError(f"{t.__name__} after Error", code=ev.ErrorCode.UNEXPECTED)
        self._check_receive_allowed(event, t)
        try:
            if spec.payload is codec.Payload.NONE:
                if t in _RANGE_EVENTS:
                    codec.check_event_ranges(event, self.layout)
                self._after_receive(event, t)
                return event
            nbytes, checksum = codec.decode_trailer(
                spec, event, trailer, self.layout, self.max_frame_payload, self.checksum
            )
        except codec.FieldError as exc:
            raise RemoteProtocolError(f"invalid {t.__name__}: {exc}", code=exc.code) from None
        self._begin_payload(spec, event, nbytes, checksum)
        return self._continue_payload()

    def _recv_pages_fast(self, obj: list[Any]) -> ev.Pages | None:
        """A Pages header on an open connection, hand-inlined: validates it and starts
        its payload.  Returns None (nothing consumed or started) to let the
        table-driven path decide and raise; raises RemoteProtocolError ("bad-range")
        for a range outside the layout.  Accepts exactly what the table path accepts."""
        _, gpa, npages, request_id, checksum = obj
        if (
            type(gpa) is not int
            or gpa < 0
            or type(npages) is not int
            or type(request_id) is not int
            or not 0 < npages < 1 << 32
            or not 0 <= request_id < codec.U64_LIMIT
        ):
            return None
        if self.checksum is None:
            if checksum is not None:
                return None
        elif type(checksum) is not int or not 0 <= checksum < codec.U64_LIMIT:
            return None
        assert self.layout is not None
        nbytes = self.layout.range_nbytes(gpa, npages)
        if nbytes > self.max_frame_payload:
            return None
        header = ev.Pages(gpa, npages, None, request_id)
        self._pl_spec = _PAGES_SPEC
        self._pl_event = header
        self._pl_nbytes = nbytes
        self._pl_filled = 0
        self._pl_checksum = checksum
        self._pl_target = None
        if self._sink is not None:
            buf = self._sink(header)
            if buf is not None:
                if (
                    type(buf) is memoryview
                    and buf.nbytes == nbytes
                    and not buf.readonly
                    and buf.format == "B"
                    and buf.c_contiguous
                ):
                    self._pl_target = buf
                else:
                    self._pl_target = self._check_sink_buffer(buf, nbytes)
        return header

    def _read_header(self) -> Any:
        """Decode the next msgpack header from the buffered chunks, or NEED_DATA."""
        up = self._unpacker
        while True:
            if self._hdr_fed:
                try:
                    obj = up.unpack()
                    break
                except codec.OutOfData:
                    pass
                except Exception as exc:  # msgpack raises many types on garbage
                    raise RemoteProtocolError(
                        f"undecodable frame header: {exc}", code=ev.ErrorCode.BAD_FRAME
                    ) from None
            if not self._navail:
                return ev.NEED_DATA
            if self._hdr_fed >= ev.MAX_HEADER_NBYTES:
                raise RemoteProtocolError(
                    f"frame header longer than {ev.MAX_HEADER_NBYTES} bytes",
                    code=ev.ErrorCode.FRAME_TOO_LARGE,
                )
            chunk = self._chunks[self._head]
            take = min(chunk.nbytes, _HEADER_WINDOW, ev.MAX_HEADER_NBYTES - self._hdr_fed)
            up.feed(chunk if take == chunk.nbytes else chunk[:take])
            self._consume(chunk, take)
            self._hdr_fed += take
        tell = up.tell()
        leftover = self._hdr_fed - (tell - self._tell0)
        if leftover:
            # Give back the bytes fed past the header: they start the payload/next frame.
            self._unshift(memoryview(up.read_bytes(leftover)))
            tell += leftover
        self._tell0 = tell
        self._hdr_fed = 0
        return obj

    def _consume(self, chunk: memoryview, take: int) -> None:
        self._navail -= take
        if take == chunk.nbytes:
            if not self._navail:
                self._chunks.clear()
                self._head = 0
                return
            self._chunks[self._head] = _EMPTY
            self._head += 1
            if self._head == len(self._chunks):
                self._chunks.clear()
                self._head = 0
            elif self._head > 64:
                del self._chunks[: self._head]
                self._head = 0
        else:
            self._chunks[self._head] = chunk[take:]

    def _unshift(self, view: memoryview) -> None:
        if self._head:
            self._head -= 1
            self._chunks[self._head] = view
        else:
            self._chunks.insert(0, view)
        self._navail += view.nbytes

    def _check_receive_allowed(self, event: Any, t: type) -> None:
        phase = self.phase
        if phase is Phase.OPEN:
            if t not in self._recv_allowed:
                raise RemoteProtocolError(
                    f"the {self.role.peer.value} may not send {t.__name__} on the "
                    f"{self.channel.name if self.channel is not None else 'unknown'} channel",
                    code=ev.ErrorCode.UNEXPECTED,
                )
            if self.role is Role.SOURCE:
                self._check_resume_answer(t, RemoteProtocolError)
            return
        if t is ev.Error and phase is not Phase.CLOSED:
            return
        if phase is Phase.START and self.role is Role.DESTINATION and t is ev.Hello:
            if self.channel is None:
                return  # adopted in _after_receive
            if event.role is not self.channel:
                raise RemoteProtocolError(
                    f"Hello announces a {event.role.name} channel on a {self.channel.name} "
                    "connection",
                    code=ev.ErrorCode.UNEXPECTED,
                )
            return
        if phase is Phase.HANDSHAKE and self.role is Role.SOURCE and t is ev.Welcome:
            self._check_welcome(event, RemoteProtocolError)
            return
        raise RemoteProtocolError(
            f"unexpected {t.__name__} during the connection handshake (phase {phase.value})",
            code=ev.ErrorCode.UNEXPECTED,
        )

    def _after_receive(self, event: Any, t: type) -> None:
        if t is not ev.ZeroPages:
            self._after(event, t, sent=False)

    # --- payloads --------------------------------------------------------------------

    def _begin_payload(
        self, spec: codec.MessageSpec, event: Any, nbytes: int, checksum: int | None
    ) -> None:
        self._pl_spec = spec
        self._pl_event = event
        self._pl_nbytes = nbytes
        self._pl_filled = 0
        self._pl_checksum = checksum
        self._pl_target = None
        if self._sink is not None and nbytes:
            buf = self._sink(event)
            if buf is not None:
                self._pl_target = self._check_sink_buffer(buf, nbytes)

    @staticmethod
    def _check_sink_buffer(buf: Any, nbytes: int) -> memoryview:
        try:
            view = buf if type(buf) is memoryview else memoryview(buf)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
        except (TypeError, ValueError):
            raise LocalProtocolError("payload sink returned a non-contiguous buffer") from None
        if view.readonly or view.nbytes != nbytes:
            raise LocalProtocolError(
                f"payload sink must return a writable buffer of {nbytes} bytes, "
                f"got {view.nbytes} bytes (readonly={view.readonly})"
            )
        return view

    def _drain_payload(self) -> None:
        need = self._pl_nbytes - self._pl_filled
        target = self._pl_target
        while need and self._navail:
            chunk = self._chunks[self._head]
            take = min(chunk.nbytes, need)
            piece = chunk[:take] if take < chunk.nbytes else chunk
            if target is not None:
                target[self._pl_filled : self._pl_filled + take] = piece
            else:
                self._pl_parts.append(piece)
            self._pl_filled += take
            need -= take
            self._consume(chunk, take)

    def _continue_payload(self) -> Any:
        if self._navail:
            self._drain_payload()
        if self._pl_filled < self._pl_nbytes:
            if self._eof:
                raise RemoteProtocolError(
                    "the stream ended inside a payload", code=ev.ErrorCode.TRUNCATED
                )
            return ev.NEED_DATA
        data = self._pl_target
        if data is None:
            parts = self._pl_parts
            data = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
            self._pl_parts = []
        spec, header = self._pl_spec, self._pl_event
        assert spec is not None
        checksum = self._pl_checksum
        self._pl_event = self._pl_spec = self._pl_target = None
        if checksum is not None and self.checksum is not None:
            actual = codec.CHECKSUMS[self.checksum](data, codec.checksum_seed(header))
            if actual != checksum:
                raise RemoteProtocolError(
                    f"{spec.cls.__name__} payload checksum mismatch "
                    f"({self.checksum}: got {actual:#x}, header says {checksum:#x})",
                    code=ev.ErrorCode.CHECKSUM,
                )
        # The header event (the one the sink saw) becomes the complete event.  It is
        # frozen for callers; filling its payload here is the one exception.
        object.__setattr__(header, "data", data)
        t = spec.cls
        if t is not ev.Pages:
            self._after_receive(header, t)
        return header
