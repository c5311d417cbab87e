"""What TLS 1.3 costs on a migration-sized stream: plain TCP vs migrated's mutual
TLS (migrated.transport.tls_check with the Security that migrated.service.tls
builds), same run, loopback.  Two paths, as the engine uses them: asyncio (uvloop)
streams, and blocking sockets (the BULK push; the receiver in another process).
Prints JSON; never asserts.

    .venv/bin/python bench/tls_transport.py --gib 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import sys
import tempfile
import time
from pathlib import Path

import trustme
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migrated.service.tls import TlsSettings, build_security
from migrated.transport import tls_check
from migrated.transport.security import Security
from tests.service.certs import write_tls_dir

CHUNK = 1 << 20


def securities(tmp: Path) -> tuple[Security, Security]:
    ca = trustme.CA()
    a = write_tls_dir(tmp / "a", ca, "host-a", "127.0.0.1")
    b = write_tls_dir(tmp / "b", ca, "host-b", "127.0.0.1")
    return (
        build_security(TlsSettings(directory=str(a), allowed_peers=("host-b",))),
        build_security(TlsSettings(directory=str(b), allowed_peers=("host-a",))),
    )


async def asyncio_run(client: Security, server: Security, nbytes: int) -> float:
    done = asyncio.get_running_loop().create_future()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got = 0
        while got < nbytes:
            data = await r.read(CHUNK)
            if not data:
                break
            got += len(data)
        done.set_result(got)
        w.close()

    srv = await tls_check.serve_streams(sink, "127.0.0.1", 0, server, limit=4 * CHUNK)
    port = srv.sockets[0].getsockname()[1]
    payload = bytes(CHUNK)
    _r, w = await tls_check.open_stream("127.0.0.1", port, client)
    t0 = time.perf_counter()
    sent = 0
    while sent < nbytes:
        w.write(payload)
        sent += CHUNK
        await w.drain()
    await done
    elapsed = time.perf_counter() - t0
    w.close()
    srv.close()
    return elapsed


def blocking_run(client: Security, server: Security, nbytes: int) -> float:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    buf = bytearray(CHUNK)

    def sink() -> None:
        conn, _ = listener.accept()
        s = tls_check.wrap_accepted(conn, server)
        got = 0
        view = memoryview(buf)
        while got < nbytes:
            n = s.recv_into(view)
            if not n:
                break
            got += n
        s.close()

    # The receiver is another process, as on a real destination (no shared GIL).
    t = multiprocessing.get_context("fork").Process(target=sink)
    t.start()
    s = tls_check.wrap_connected(socket.create_connection(("127.0.0.1", port)), client, "127.0.0.1")
    payload = bytes(CHUNK)
    t0 = time.perf_counter()
    for _ in range(nbytes // CHUNK):
        s.sendall(payload)
    t.join()
    elapsed = time.perf_counter() - t0
    s.close()
    listener.close()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=1.0)
    args = p.parse_args()
    nbytes = int(args.gib * (1 << 30)) // CHUNK * CHUNK
    with tempfile.TemporaryDirectory() as tmp:
        a, b = securities(Path(tmp))
        plain = Security.plain()
        out = {"bytes": nbytes}
        for path, fn in (
            ("asyncio", lambda c, s: uvloop.run(asyncio_run(c, s, nbytes))),
            ("blocking", lambda c, s: blocking_run(c, s, nbytes)),
        ):
            t_plain = fn(plain, plain)
            t_tls = fn(a, b)
            out[path] = {
                "plain_GBps": round(nbytes / t_plain / 1e9, 2),
                "tls_GBps": round(nbytes / t_tls / 1e9, 2),
                "tls_slowdown": round(t_tls / t_plain, 2),
            }
        out["cipher"] = "TLS 1.3 (OpenSSL default suite; AES-GCM with AES-NI)"
        print(json.dumps(out))


if __name__ == "__main__":
    main()
