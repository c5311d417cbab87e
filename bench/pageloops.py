"""Micro-benchmarks of the bulk page loops: the C loops against today's Python paths.

    .venv/bin/python bench/pageloops.py [--gib 1] [--frame-kib 1024] [--repeat 3]

Two processes on 127.0.0.1, BULK connections with the real handshake and the
engine's socket settings, page reporting off and memory warmed (bench/hostprep.py):

* ``recv``: a sender process pushes ``--gib`` of non-zero pages in ``Pages`` frames
  (always with the C push loop, so the sender is the same for both); the receiver
  installs them into userfaultfd-registered memory with
  - ``c``: :class:`migrated.kernel.AcceleratedReceiver` (C loop, GIL released),
  - ``python``: the engine's ``BulkReceiver`` decoding through the Connection (its
    path over TLS or with checksums: UFFDIO_COPY per frame from Python).
* ``push``: the sender pushes ``--gib`` of guest RAM (``--zero-percent`` of it zero
  pages; with ``--source-thp`` also from RAM on transparent huge pages, variants
  ``*-thp``) to a receiver process that only drains the socket, with
  - ``c``: :class:`migrated.kernel.PushLoop`,
  - ``python``: the engine's push through the Connection (its TLS/checksum path:
    claim, zero scan, Connection.send, sendmsg from Python).

For each: wall seconds, GB/s, CPU seconds of the measured process (all its threads)
and of its peer.  Prints one JSON object.  Not a test: no assertions on figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.hostprep import (
    describe,
    disable_page_reporting,
    load_1m,
    restore_page_reporting,
    warm_host_memory,
)
from migrated.engine.destination.bulk import BulkReceiver
from migrated.engine.destination.pages import PageStore
from migrated.engine.ram import GuestRam
from migrated.engine.source.push import PushCounters, PushCursor, _push_python
from migrated.engine.stats import Pacer
from migrated.engine.threads import Worker
from migrated.kernel import (
    AcceleratedReceiver,
    GuestMemory,
    MappedRegion,
    PageBitmap,
    PageMap,
    ProtocolHooks,
    PushLoop,
    Reason,
    TxEvent,
    Userfaultfd,
)
from migrated.protocol import (
    MAX_HEADER_NBYTES,
    MIN_PROTOCOL_VERSION,
    NEED_DATA,
    PROTOCOL_VERSION,
    ChannelRole,
    ConnectionClosed,
    Hello,
    MemoryLayout,
    MemoryRegion,
    Pages,
    Role,
    ZeroPages,
    negotiate,
)
from migrated.protocol.connection import Connection
from migrated.protocol.session import Session
from migrated.protocol.state import MigrationState
from migrated.transport.blocking import BlockingChannel
from migrated.transport.net import tune_socket

PAGE = 4096
HOOKS = ProtocolHooks(Pages, ZeroPages, NEED_DATA, ConnectionClosed, MAX_HEADER_NBYTES)
SID = b"\x42" * 16


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def layout_of(nbytes: int) -> MemoryLayout:
    return MemoryLayout((MemoryRegion(0, nbytes, PAGE),))


def hello() -> Hello:
    return Hello(PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, ChannelRole.BULK, SID, frozenset(), False)


def source_handshake(sock: socket.socket, layout: MemoryLayout, frame: int) -> Connection:
    conn = Connection(Role.SOURCE, ChannelRole.BULK, layout=layout, max_frame_payload=frame)
    for b in conn.send(hello()):
        sock.sendall(b)
    while (ev := conn.next_event()) is NEED_DATA:
        conn.receive_data(sock.recv(4096))
    assert type(ev).__name__ == "Welcome", ev
    return conn


def dest_handshake(sock: socket.socket, layout: MemoryLayout, frame: int) -> Connection:
    conn = Connection(Role.DESTINATION, ChannelRole.BULK, layout=layout, max_frame_payload=frame)
    buf = bytearray()
    while True:
        ev = conn.next_event()
        if ev is not NEED_DATA:
            break
        # Read byte by byte: no byte of the stream after Hello may be consumed here.
        chunk = sock.recv(1)
        buf += chunk
        conn.receive_data(chunk)
    for b in conn.send(negotiate(ev, frozenset())):
        sock.sendall(b)
    return conn


def filled_memory(nbytes: int, zero_percent: int, thp: bool = False) -> GuestMemory:
    """Guest RAM whose pages are non-zero except ``zero_percent`` of them (spread);
    on transparent huge pages with ``thp`` (as QEMU's source RAM is here)."""
    mem = GuestMemory.create(nbytes, transparent_huge_pages=thp)
    view = mem.view
    stride = max(1, 100 // zero_percent) if zero_percent else 0
    for i in range(nbytes // PAGE):
        if not stride or i % stride:
            view[i * PAGE] = 1 + (i & 0x7F)
            view[i * PAGE + PAGE - 1] = 0xA5
    return mem


# --- the peer processes -------------------------------------------------------------------


def role_sender(port: int, nbytes: int, frame: int) -> None:
    """Push nbytes of non-zero pages with the C loop (the recv benchmark's peer)."""
    mem = filled_memory(nbytes, 0)
    sock = socket.create_connection(("127.0.0.1", port))
    tune_socket(sock, bulk=True)
    layout = layout_of(nbytes)
    source_handshake(sock, layout, frame)
    sent = PageBitmap(nbytes // PAGE)
    pm = PageMap([MappedRegion(0, nbytes, PAGE, mem.address)], sent)
    c0 = cpu_s()
    with PushLoop(sock.fileno(), pm, max_frame_pages=frame // PAGE) as loop:
        while loop.run(batch_nbytes=0, timeout_s=30) is not TxEvent.DONE:
            pass
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
    print(json.dumps({"cpu_s": round(cpu_s() - c0, 3)}))


def role_sink(port_file: str, nbytes: int, frame: int) -> None:
    """Accept, answer the handshake, drain everything (the push benchmark's peer)."""
    srv = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(srv.getsockname()[1]))
    sock, _ = srv.accept()
    tune_socket(sock, bulk=True)
    dest_handshake(sock, layout_of(nbytes), frame)
    buf = memoryview(bytearray(1 << 20))
    got, c0 = 0, cpu_s()
    t0 = None
    while n := sock.recv_into(buf):
        if t0 is None:
            t0 = time.perf_counter()
        got += n
    wall = time.perf_counter() - (t0 or time.perf_counter())
    print(json.dumps({"bytes": got, "cpu_s": round(cpu_s() - c0, 3), "wall_s": round(wall, 4)}))


# --- receive ---------------------------------------------------------------------------------


def registered(nbytes: int) -> tuple[GuestMemory, Userfaultfd]:
    mem = GuestMemory.create(nbytes)
    uffd = Userfaultfd.open()
    uffd.register(mem.address, nbytes)
    return mem, uffd


def recv_c(sock: socket.socket, conn: Connection, nbytes: int) -> dict[str, Any]:
    mem, uffd = registered(nbytes)
    pm = PageMap([MappedRegion(0, nbytes, PAGE, mem.address)], PageBitmap(nbytes // PAGE), uffd)
    rx = AcceleratedReceiver(sock, conn, pm, HOOKS)
    installed = 0
    while True:
        r = rx.receive(batch_nbytes=16 << 20, timeout_s=30)
        installed += sum(n for _, n in r.runs)
        if r.reason is Reason.EOF:
            break
    st = rx.loop.stats
    rx.close()
    uffd.unregister(mem.address, nbytes)
    uffd.close()
    mem.close()
    return {
        "installed_pages": installed,
        "install_s": round(st.install_s, 4),
        "wait_s": round(st.wait_s, 4),
        "python_frames": rx.python_frames,
    }


def bench_session(role: Role, conn: Connection, nbytes: int) -> Session:
    """A Session holding ``conn`` as its BULK connection, in postcopy (the state the
    engine's BULK paths run in)."""
    session = Session(role, SID, layout=layout_of(nbytes))
    session._register(conn, ChannelRole.BULK, time.monotonic())
    session.table.state = MigrationState.POSTCOPY_ACTIVE
    return session


def recv_python(sock: socket.socket, conn: Connection, nbytes: int, frame: int) -> dict[str, Any]:
    """The engine's BULK receiver decoding in Python (its TLS/checksum path)."""
    mem, uffd = registered(nbytes)
    store = PageStore(GuestRam([(0, mem)]))
    store.seal(uffd)
    session = bench_session(Role.DESTINATION, conn, nbytes)

    async def run() -> dict[str, Any]:
        bc = BlockingChannel(
            socket.socket(fileno=os.dup(sock.fileno())), conn, session, name="bulk"
        )
        installed = [0]

        def on_installed(runs: list[tuple[int, int]]) -> None:
            installed[0] += sum(n for _, n in runs)

        rx = BulkReceiver(bc, store, on_installed, max_frame_nbytes=frame, accelerated=False)
        rx.worker.start()
        await rx.worker.join()
        await asyncio.sleep(0)  # the last on_installed callbacks
        bc.close()
        return {"installed_pages": installed[0], "install_s": round(store.install_s, 4)}

    out = asyncio.run(run())
    uffd.unregister(mem.address, nbytes)
    uffd.close()
    mem.close()
    return out


def bench_recv(variant: str, nbytes: int, frame: int, warm: bool) -> dict[str, Any]:
    if warm:
        warm_host_memory(nbytes + (256 << 20))
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    peer = subprocess.Popen(
        [sys.executable, __file__, "--role", "sender", "--port", str(port),
         "--bytes", str(nbytes), "--frame", str(frame)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    sock, _ = srv.accept()
    tune_socket(sock, bulk=True)
    conn = dest_handshake(sock, layout_of(nbytes), frame)
    load = load_1m()
    t0, c0 = time.perf_counter(), cpu_s()
    if variant == "c":  # noqa: SIM108
        extra = recv_c(sock, conn, nbytes)
    else:
        extra = recv_python(sock, conn, nbytes, frame)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    sock.close()
    out, _ = peer.communicate(timeout=60)
    return {
        "variant": variant,
        "wall_s": round(wall, 4),
        "GB_per_s": round(nbytes / wall / 1e9, 3),
        "cpu_s": round(cpu, 3),
        "peer_cpu_s": json.loads(out.strip().splitlines()[-1])["cpu_s"],
        "loadavg_1m_before": round(load, 2),
        **extra,
    }


# --- push -----------------------------------------------------------------------------------


def push_c(sock: socket.socket, mem: GuestMemory, nbytes: int, frame: int) -> dict[str, Any]:
    source_handshake(sock, layout_of(nbytes), frame)
    pm = PageMap([MappedRegion(0, nbytes, PAGE, mem.address)], PageBitmap(nbytes // PAGE))
    with PushLoop(sock.fileno(), pm, max_frame_pages=frame // PAGE) as loop:
        batches = 0
        while loop.run(batch_nbytes=16 << 20, timeout_s=30) is not TxEvent.DONE:
            batches += 1
        st = loop.stats
    return {
        "batches": batches,
        "scan_s": round(st.scan_s, 4),
        "send_s": round(st.send_s, 4),
        "wait_s": round(st.wait_s, 4),
        "zero_pages": st.zero_pages,
    }


def push_python(port: int, mem: GuestMemory, nbytes: int, frame: int) -> dict[str, Any]:
    """The engine's BULK push through the Connection (its TLS/checksum path)."""
    ram = GuestRam([(0, mem)])
    sock = socket.create_connection(("127.0.0.1", port))
    tune_socket(sock, bulk=True)
    conn = source_handshake(sock, layout_of(nbytes), frame)
    session = bench_session(Role.SOURCE, conn, nbytes)
    counters = PushCounters()

    async def run() -> None:
        bc = BlockingChannel(sock, conn, session, name="bulk")
        cursor = PushCursor(nbytes // PAGE)
        worker = Worker(
            "bench-push",
            lambda w: _push_python(w, bc, ram, cursor, frame // PAGE, Pacer(0), counters),
        )
        worker.start()
        await worker.join()
        bc.close()

    asyncio.run(run())
    return {"zero_pages": counters.zero_pages}


def bench_push(
    variant: str, nbytes: int, frame: int, zero_percent: int, warm: bool
) -> dict[str, Any]:
    thp = variant.endswith("-thp")
    mem = filled_memory(nbytes, zero_percent, thp)
    if warm:
        warm_host_memory(nbytes + (256 << 20))
    port_file = f"/dev/shm/migrated-bench-{os.getpid()}.port"
    peer = subprocess.Popen(
        [sys.executable, __file__, "--role", "sink", "--port-file", port_file,
         "--bytes", str(nbytes), "--frame", str(frame)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    while not os.path.exists(port_file) or not Path(port_file).read_text():
        time.sleep(0.01)
    port = int(Path(port_file).read_text())
    os.unlink(port_file)
    load = load_1m()
    t0, c0 = time.perf_counter(), cpu_s()
    if variant.startswith("c"):
        sock = socket.create_connection(("127.0.0.1", port))
        tune_socket(sock, bulk=True)
        extra = push_c(sock, mem, nbytes, frame)
        sock.shutdown(socket.SHUT_WR)
    else:
        extra = push_python(port, mem, nbytes, frame)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    out, _ = peer.communicate(timeout=60)
    if variant.startswith("c"):
        sock.close()
    mem.close()
    sink = json.loads(out.strip().splitlines()[-1])
    return {
        "variant": variant,
        "wall_s": round(wall, 4),
        "GB_per_s": round(nbytes / wall / 1e9, 3),
        "cpu_s": round(cpu, 3),
        "peer_cpu_s": sink["cpu_s"],
        "wire_bytes": sink["bytes"],
        "loadavg_1m_before": round(load, 2),
        **extra,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in sorted({r["variant"] for r in runs}):
        mine = [r for r in runs if r["variant"] == v]
        best = max(mine, key=lambda r: r["GB_per_s"])
        out[v] = {"best_GB_per_s": best["GB_per_s"], "cpu_s_of_best": best["cpu_s"]}
    out["c_over_python_GB_per_s"] = round(
        out["c"]["best_GB_per_s"] / out["python"]["best_GB_per_s"], 2
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--frame-kib", type=int, default=1024)
    p.add_argument("--zero-percent", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--what", choices=["recv", "push", "both"], default="both")
    p.add_argument("--source-thp", action="store_true", help="push also from guest RAM on THP")
    p.add_argument("--host-warmup", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--role", choices=["sender", "sink"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--frame", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "sender":
        role_sender(args.port, args.bytes, args.frame)
        return
    if args.role == "sink":
        role_sink(args.port_file, args.bytes, args.frame)
        return
    nbytes, frame = int(args.gib * (1 << 30)) // PAGE * PAGE, args.frame_kib << 10
    old = disable_page_reporting() if args.host_warmup else None
    out: dict[str, Any] = {
        "benchmark": "pageloops",
        "config": {k: v for k, v in vars(args).items() if v is not None and k != "role"},
    }
    try:
        if args.what in ("recv", "both"):
            runs = [
                bench_recv(v, nbytes, frame, args.host_warmup)
                for _ in range(args.repeat)
                for v in ("c", "python")
            ]
            out["recv"] = {"summary": summarize(runs), "runs": runs}
        if args.what in ("push", "both"):
            variants = (
                ("c", "python", "c-thp", "python-thp") if args.source_thp else ("c", "python")
            )
            runs = [
                bench_push(v, nbytes, frame, args.zero_percent, args.host_warmup)
                for _ in range(args.repeat)
                for v in variants
            ]
            out["push"] = {"summary": summarize(runs), "runs": runs}
    finally:
        restore_page_reporting(old)
    out["host_page_reporting"] = describe(old)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
