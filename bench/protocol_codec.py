"""Benchmark: framing cost of the wire protocol for page data.

Moves 1 GiB of page data in 256 KiB ``Pages`` frames from a source ``Connection`` to a
destination ``Connection`` in memory, for each variant:

* ``sink``: the destination installs a payload sink (zero-copy receive: the I/O layer
  writes straight into the target through ``payload_target()``/``payload_written()``);
* ``nosink``: bytes arrive as ``bytes`` chunks through ``receive_data`` (the way
  ``asyncio.Protocol.data_received`` delivers them) and the connection hands out views;

each with checksum none / xxh3 / crc32.  The one copy a real transfer needs anyway (the
kernel's copy from the socket into memory) is simulated by a memoryview slice assignment
and measured separately as ``memcpy_s``.  All times are process CPU seconds.

``framing_only_*`` is the framing work alone: the sink path with the payload copy
skipped and no checksum (encode header, decode header, validate, sink bookkeeping,
event objects).  Per variant, ``other_s_per_gib`` = cpu - memcpy - checksum: for the
sink path that is framing again (noisier, as a difference of large numbers); for the
no-sink path it also includes the reassembly copy a payload split across two socket
reads needs, which is why the sink path exists.
The budget the issue sets: framing CPU well under 10 % of moving 1 GiB at 3 GB/s
(0.358 s), i.e. far below 33 ms per GiB.

Usage: ``python bench/protocol_codec.py [--gib N] [--frame-kib K]``; prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrated.protocol import (
    NEED_DATA,
    ChannelRole,
    MemoryLayout,
    MemoryRegion,
    Pages,
)
from migrated.protocol.loopback import Loopback

PAGE = 4096
SOURCE_NBYTES = 64 << 20  # source "guest memory" cycled over to reach the total
LINE_RATE_BYTES_PER_S = 3e9


def _pair(checksum: str | None, frame_nbytes: int) -> Loopback:
    layout = MemoryLayout((MemoryRegion(0, SOURCE_NBYTES, PAGE),))
    lb = Loopback(ChannelRole.BULK, layout=layout, max_frame_payload=frame_nbytes)
    features = frozenset() if checksum is None else frozenset({f"checksum-{checksum}"})
    lb.handshake(b"\x07" * 16, source_features=features, dest_features=features)
    assert lb.source.checksum == checksum
    return lb


def run_sink(
    checksum: str | None, total_nbytes: int, frame_nbytes: int, copy: bool = True
) -> float:
    """Source send() → header bytes via receive_data, payload via payload_target().

    With ``copy=False`` the payload bytes are not moved (the receiver is told they
    were written): what remains is the framing work alone.
    """
    lb = _pair(checksum, frame_nbytes)
    src_mem = memoryview(bytearray(b"\xa5" * SOURCE_NBYTES))
    dst_mem = memoryview(bytearray(SOURCE_NBYTES))
    lb.dest.set_payload_sink(lambda h: dst_mem[h.gpa : h.gpa + h.npages * PAGE])
    npages = frame_nbytes // PAGE
    src, dst = lb.source, lb.dest
    received = 0
    t0 = time.process_time()
    gpa = 0
    while received < total_nbytes:
        header, payload = src.send(Pages(gpa, npages, src_mem[gpa : gpa + frame_nbytes]))
        dst.receive_data(header)
        assert dst.next_event() is NEED_DATA
        target = dst.payload_target()
        assert target is not None
        if copy:
            target[:] = payload  # stands in for sock.recv_into(target)
        dst.payload_written(len(target))
        event = dst.next_event()
        received += event.data.nbytes
        gpa = (gpa + frame_nbytes) % SOURCE_NBYTES
    return time.process_time() - t0


def run_nosink(checksum: str | None, total_nbytes: int, frame_nbytes: int) -> float:
    """Source send() → a byte stream cut into 256 KiB bytes chunks → receive_data."""
    lb = _pair(checksum, frame_nbytes)
    src_mem = memoryview(bytearray(b"\x5a" * SOURCE_NBYTES))
    npages = frame_nbytes // PAGE
    src, dst = lb.source, lb.dest
    received = 0
    # Chunks not aligned to frames: each payload straddles two socket reads.
    t0 = time.process_time()
    gpa = 0
    pending: list[bytes] = []
    while received < total_nbytes:
        header, payload = src.send(Pages(gpa, npages, src_mem[gpa : gpa + frame_nbytes]))
        # Stands in for the kernel copy into the bytes objects recv() returns.
        cut = frame_nbytes // 2
        pending = [b"".join((header, payload[:cut])), payload[cut:].tobytes()]
        for chunk in pending:
            dst.receive_data(chunk)
            while True:
                event = dst.next_event()
                if event is NEED_DATA:
                    break
                received += event.data.nbytes
        gpa = (gpa + frame_nbytes) % SOURCE_NBYTES
    return time.process_time() - t0


def memcpy_baseline(total_nbytes: int, frame_nbytes: int, as_bytes: bool) -> float:
    """The copy a transfer needs anyway, in the same frame-sized pieces."""
    src_mem = memoryview(bytearray(b"\xa5" * SOURCE_NBYTES))
    dst_mem = memoryview(bytearray(SOURCE_NBYTES))
    t0 = time.process_time()
    done = 0
    gpa = 0
    while done < total_nbytes:
        if as_bytes:
            cut = frame_nbytes // 2
            _ = (
                src_mem[gpa : gpa + cut].tobytes(),
                src_mem[gpa + cut : gpa + frame_nbytes].tobytes(),
            )
        else:
            dst_mem[gpa : gpa + frame_nbytes] = src_mem[gpa : gpa + frame_nbytes]
        done += frame_nbytes
        gpa = (gpa + frame_nbytes) % SOURCE_NBYTES
    return time.process_time() - t0


def checksum_cost(checksum: str | None, total_nbytes: int, frame_nbytes: int) -> float:
    """Checksumming every payload twice (sender and receiver)."""
    if checksum is None:
        return 0.0
    fn = xxhash.xxh3_64_intdigest if checksum == "xxh3" else zlib.crc32
    src_mem = memoryview(bytearray(b"\xa5" * SOURCE_NBYTES))
    t0 = time.process_time()
    done = 0
    gpa = 0
    while done < total_nbytes:
        fn(src_mem[gpa : gpa + frame_nbytes])
        fn(src_mem[gpa : gpa + frame_nbytes])
        done += frame_nbytes
        gpa = (gpa + frame_nbytes) % SOURCE_NBYTES
    return time.process_time() - t0


def best_of(n: int, fn, *args) -> float:  # type: ignore[no-untyped-def]
    return min(fn(*args) for _ in range(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--frame-kib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = parser.parse_args()
    total = int(args.gib * (1 << 30))
    frame = args.frame_kib * 1024
    budget_s = (1 << 30) / LINE_RATE_BYTES_PER_S
    per_gib = (1 << 30) / total
    result: dict[str, object] = {
        "total_nbytes": total,
        "frame_nbytes": frame,
        "frames": total // frame,
        "line_rate_budget_s_per_gib": round(budget_s, 4),
    }
    framing_only = best_of(args.repeat, run_sink, None, total, frame, False) * per_gib
    result["framing_only_s_per_gib"] = round(framing_only, 4)
    result["framing_only_us_per_frame"] = round(framing_only / ((1 << 30) / frame) * 1e6, 2)
    result["framing_only_fraction_of_3gbps"] = round(framing_only / budget_s, 4)
    variants = {}
    for mode, runner in (("sink", run_sink), ("nosink", run_nosink)):
        copy_s = best_of(args.repeat, memcpy_baseline, total, frame, mode == "nosink")
        for checksum in (None, "xxh3", "crc32"):
            seconds = best_of(args.repeat, runner, checksum, total, frame)
            sum_s = best_of(args.repeat, checksum_cost, checksum, total, frame)
            rest_s = max(seconds - copy_s - sum_s, 0.0) * per_gib
            variants[f"{mode}/{checksum or 'none'}"] = {
                "cpu_s": round(seconds, 4),
                "gb_per_s": round(total / seconds / 1e9, 2),
                "memcpy_s": round(copy_s, 4),
                "checksum_s": round(sum_s, 4),
                "other_s_per_gib": round(rest_s, 4),
                "other_fraction_of_3gbps": round(rest_s / budget_s, 4),
                "checksum_fraction_of_3gbps": round(sum_s * per_gib / budget_s, 4),
            }
    result["variants"] = variants
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
