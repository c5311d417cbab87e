"""The real source and destination engines migrate a fake VM over loopback TCP.

No /dev/kvm and no userfaultfd: tests/unit/fakes.py stands in for the machine and for
userfaultfd (real anonymous guest RAM, a scripted fault stream).  Everything else —
sessions, channels, BULK threads, the push cursor, page store, fault service,
recovery — is the production code.  Waits are on the engines' own state events,
never on sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from migrated.engine import DestinationEngine, Mode, RecvOptions, SendOptions, SourceEngine
from migrated.engine.destination.restore import Backend
from migrated.errors import MigrationAborted, RemoteProtocolError
from migrated.protocol import ErrorCode
from migrated.protocol.state import MigrationState
from migrated.transport.faults import parse
from migrated.transport.security import Security
from migrated.vmm.machine import Runstate

from .fakes import PAGE, FakeMachine, FakePageMap, FakeRestored, FakeShell, FakeUffd

S = MigrationState
MiB = 1 << 20
pytestmark = pytest.mark.timeout(60)


class States:
    """The states an engine reported, with a way to wait for one."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.on_state: dict[str, Callable[[], None]] = {}
        self.on_event: dict[str, Callable[[], None]] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        hook = self.on_event.get(str(event.get("event")))
        if hook is not None:
            hook()
        if event.get("event") == "state":
            status = str(event["status"])
            self.seen.append(status)
            hook = self.on_state.pop(status, None)
            if hook is not None:
                hook()
        self._changed.set()

    async def reach(self, status: str) -> None:
        while status not in self.seen:
            self._changed.clear()
            await self._changed.wait()


class Migration:
    def __init__(
        self,
        mode: Mode,
        *,
        memory_bytes: int = 8 * MiB,
        src_fault: str | None = None,
        dst_fault: str | None = None,
        restore: Callable[[bytes, Any, Any, Any], Any] | None = None,
        prebuild: Callable[[Any, int], Any] | None = None,
        security: tuple[Security, Security] | None = None,
        recv: dict[str, Any] | None = None,
        **send: Any,
    ) -> None:
        self.src_security, dst_security = security or (None, None)
        self.machine = FakeMachine(memory_bytes)
        self.uffd = FakeUffd()
        self.src_states, self.dst_states = States(), States()
        self.restore = restore or (lambda data, memory, console, shell: FakeRestored(data, memory))
        self.dst = DestinationEngine(
            "127.0.0.1",
            0,
            RecvOptions(prefault=False, **(recv or {})),
            emit=self.dst_states,
            security=dst_security,
            fault=parse(dst_fault) if dst_fault else None,
            admit=lambda nbytes: None,
            backend=Backend(self.restore, lambda: self.uffd, FakePageMap, prebuild),  # type: ignore[arg-type]
        )
        self.send = SendOptions(mode=mode, connect_timeout_s=5, **send)
        self.src_fault = parse(src_fault) if src_fault else None
        self.src: SourceEngine | None = None

    async def start(self) -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
        port = await self.dst.listen()
        self.src = SourceEngine(
            self.machine,  # type: ignore[arg-type]
            "127.0.0.1",
            port,
            self.send,
            emit=self.src_states,
            fault=self.src_fault,
            security=self.src_security,
        )
        return asyncio.create_task(self.dst.run()), asyncio.create_task(self.src.run())

    async def run(self) -> Any:
        dst_task, src_task = await self.start()
        await src_task
        restored = await dst_task
        await self.dst.close()
        return restored

    def assert_same_memory(self, restored: FakeRestored) -> None:
        a, b = self.machine.memory.view, restored.memory.view
        bad = [
            p
            for p in range(len(a) // PAGE)
            if a[p * PAGE : (p + 1) * PAGE] != b[p * PAGE : (p + 1) * PAGE]
        ]
        assert not bad, f"{len(bad)} pages differ, first {bad[:5]}"


@pytest.mark.parametrize("mode", list(Mode))
async def test_a_fake_vm_migrates_in_every_mode(mode: Mode) -> None:
    m = Migration(mode)
    restored = await m.run()
    m.assert_same_memory(restored)
    assert m.src is not None
    assert m.src.state is S.COMPLETED and m.dst.state is S.COMPLETED
    assert m.machine.pauses == 1 and m.machine.runstate is Runstate.PAUSED
    assert "ready" in m.src_states.seen and "postcopy-active" in m.dst_states.seen
    assert m.src.stats.downtime_s > 0 and m.dst.stats.total_pages == m.machine.npages


async def test_the_vm_is_built_at_setup_loaded_by_ready_and_only_let_go_at_commit() -> None:
    """The downtime holds no VM creation and no vCPU loading: the destination builds
    the VM at Setup, restores into it at VmState with the vCPUs loaded and parked
    before Ready, and Commit only resumes them."""
    built: list[tuple[int, int]] = []
    shells: list[Any] = []
    restored: list[FakeRestored] = []

    def prebuild(memory: Any, vcpus: int) -> FakeShell:
        built.append((memory.nbytes, vcpus))
        return FakeShell(vcpus)

    def restore(data: bytes, memory: Any, console: Any, shell: Any) -> FakeRestored:
        shells.append(shell)
        vm = FakeRestored(data, memory)
        restored.append(vm)
        return vm

    m = Migration(Mode.POSTCOPY, restore=restore, prebuild=prebuild)
    at_ready: list[Runstate] = []
    m.src_states.on_state["ready"] = lambda: at_ready.append(restored[0].runstate)
    vm = await m.run()
    assert built == [(m.machine.memory.nbytes, 1)]
    assert len(shells) == 1 and isinstance(shells[0], FakeShell)
    assert at_ready == [Runstate.PAUSED]  # loaded, not run, when the source saw Ready
    assert vm.runstate is Runstate.RUNNING
    steps = m.dst.stats.downtime_breakdown_ms
    assert {"load-vcpus", "wait-commit", "start-vcpus", "running-sent"} <= set(steps), steps
    assert m.src is not None and "wait-running" in m.src.stats.downtime_breakdown_ms


async def test_a_shell_built_for_a_failed_migration_is_closed() -> None:
    shells: list[FakeShell] = []

    def prebuild(memory: Any, vcpus: int) -> FakeShell:
        shells.append(FakeShell(vcpus))
        return shells[-1]

    def refuse(data: bytes, memory: Any, console: Any, shell: Any) -> Any:
        raise RemoteProtocolError("cannot restore: test", code=ErrorCode.RESTORE_FAILED)

    m = Migration(Mode.POSTCOPY, restore=refuse, prebuild=prebuild)
    dst_task, src_task = await m.start()
    with pytest.raises(MigrationAborted, match="the VM is running on the source"):
        await src_task
    with pytest.raises(MigrationAborted):
        await dst_task
    assert len(shells) == 1 and shells[0].closed


async def test_guest_writes_during_precopy_are_resent_or_discarded() -> None:
    m = Migration(Mode.HYBRID, max_precopy_rounds=3)
    rounds = 0

    def write_some() -> None:
        # The guest runs on between rounds: what it writes is dirty, resent in the
        # next round or, after the last one, discarded at switchover and pushed.
        nonlocal rounds
        rounds += 1
        for page in range(rounds * 3, m.machine.npages, 97):
            m.machine.write(page, 1000 + rounds)

    m.src_states.on_state["active"] = write_some
    m.src_states.on_event["precopy-round"] = write_some
    restored = await m.run()
    m.assert_same_memory(restored)
    assert m.src is not None and m.src.stats.precopy_rounds >= 2 and rounds >= 2
    # What the guest wrote after it was sent went again: in a later round or, stale at
    # the switchover, as a discard followed by the push.
    st = m.src.stats
    assert sum(st.dirty_pages_per_round) + st.discarded_pages > 0


async def test_faults_are_served_while_the_push_runs() -> None:
    m = Migration(Mode.POSTCOPY, memory_bytes=16 * MiB, postcopy_bandwidth=40_000_000)
    touched: list[int] = []

    def touch_the_top() -> None:
        ram = m.dst.store.ram if m.dst.store else None
        assert ram is not None
        for page in range(ram.total_pages - 1, ram.total_pages - 200, -7):
            if m.uffd.touch(ram.host_address(page)):
                touched.append(page)

    m.dst_states.on_state["postcopy-active"] = touch_the_top
    restored = await m.run()
    m.assert_same_memory(restored)
    assert touched, "the push installed everything before the guest touched it"
    latency = m.dst.stats.fault_latency
    assert latency.count == len(touched), (latency.count, len(touched))
    assert m.src is not None and m.src.stats.postcopy_requests == len(touched)
    assert m.dst.stats.blocktime_s_per_vcpu.get(0, 0) > 0


async def test_a_link_lost_in_postcopy_pauses_both_and_recovers() -> None:
    m = Migration(Mode.POSTCOPY, postcopy_bandwidth=20_000_000)

    def cut() -> None:
        assert m.src is not None
        m.src.link.cut("test: link cut in postcopy")

    m.dst_states.on_state["postcopy-active"] = cut
    dst_task, src_task = await m.start()
    await m.src_states.reach("postcopy-paused")
    await m.dst_states.reach("postcopy-paused")
    assert m.src is not None
    assert m.src.session.lost_reason == "test: link cut in postcopy"
    m.src.recover_now()  # no backoff wait
    await src_task
    restored = await dst_task
    await m.dst.close()
    m.assert_same_memory(restored)
    assert m.src.stats.recoveries == 1 and m.dst.stats.recoveries == 1


async def test_cancel_in_precopy_resumes_the_vm_and_drops_the_destination() -> None:
    m = Migration(Mode.HYBRID, precopy_bandwidth=10_000_000)

    def cancel() -> None:
        assert m.src is not None
        assert m.src.cancel("test")

    m.src_states.on_state["active"] = cancel
    dst_task, src_task = await m.start()
    with pytest.raises(MigrationAborted, match="cancelled"):
        await src_task
    with pytest.raises(MigrationAborted, match="cancelled"):
        await dst_task
    assert m.machine.runstate is Runstate.RUNNING and m.machine.pauses == 0
    assert m.dst.state is S.CANCELLED


async def test_a_destination_that_cannot_restore_leaves_the_vm_on_the_source() -> None:
    def refuse(data: bytes, memory: Any, console: Any, shell: Any) -> Any:
        raise RemoteProtocolError("cannot restore: test", code=ErrorCode.RESTORE_FAILED)

    m = Migration(Mode.POSTCOPY, restore=refuse)
    dst_task, src_task = await m.start()
    with pytest.raises(MigrationAborted, match="the VM is running on the source"):
        await src_task
    with pytest.raises(MigrationAborted):
        await dst_task
    assert m.machine.runstate is Runstate.RUNNING and m.machine.pauses == 1
    assert m.src is not None and not m.src.session.point_of_no_return


async def test_a_link_lost_before_the_commit_is_withdrawn_from_the_waiting_destination() -> None:
    # The source never sees Ready: it resumes the VM; the destination holds the state
    # in doubt until the source withdraws it.
    m = Migration(Mode.POSTCOPY, src_fault="cut-before:recv:Ready")
    dst_task, src_task = await m.start()
    with pytest.raises(MigrationAborted):
        await src_task
    assert m.machine.runstate is Runstate.RUNNING
    await m.dst_states.reach("ready")
    assert m.dst.state is S.READY and not dst_task.done()
    assert m.src is not None and m.src.needs_withdraw
    assert await m.src.withdraw()
    with pytest.raises(MigrationAborted, match="cancelled"):
        await dst_task
    assert m.dst.state is S.CANCELLED


async def test_a_commit_lost_in_flight_is_sent_again_on_reconnect() -> None:
    m = Migration(Mode.POSTCOPY, dst_fault="cut-before:recv:Commit")
    dst_task, src_task = await m.start()
    await m.src_states.reach("postcopy-paused")
    assert m.dst.state is S.READY  # it never saw the Commit
    assert m.src is not None
    m.src.recover_now()
    await src_task
    restored = await dst_task
    await m.dst.close()
    m.assert_same_memory(restored)
    assert m.machine.runstate is Runstate.PAUSED  # never resumed here


async def test_no_frame_changes_a_page_the_guest_owns() -> None:
    """Issue: ZeroPages over installed pages zeroed them in the live guest."""
    from migrated.engine.destination.pages import PageStore
    from migrated.engine.ram import GuestRam
    from migrated.kernel import GuestMemory

    memory = GuestMemory.create(16 * PAGE)
    memory.view[0:8] = b"precopy!"
    uffd = FakeUffd()
    uffd.register(memory.address, memory.nbytes)
    store = PageStore(GuestRam([(0, memory)]), FakePageMap)  # type: ignore[arg-type]
    store.precopy_pages(0, 1)
    store.seal(uffd)  # type: ignore[arg-type]
    uffd.present.add(memory.address)  # page 0 was in place before registration
    assert store.install(0, 4, None) == [(1, 3)]  # a zero run over page 0..3
    assert bytes(memory.view[0:8]) == b"precopy!"
    memory.view[PAGE : PAGE + 4] = b"mine"  # the guest writes page 1
    assert store.install(1, 1, memoryview(bytes(PAGE))) == []  # a late push: ignored
    assert bytes(memory.view[PAGE : PAGE + 4]) == b"mine"
    assert store.duplicate_pages == 2
    memory.close()


async def test_a_page_lost_by_the_push_is_asked_for_after_all_sent() -> None:
    """The source believes it pushed page 100 (marked sent, never written): after
    AllSent, with BULK closed, the destination asks for what is still missing."""
    m = Migration(Mode.POSTCOPY)

    def lose_a_page() -> None:
        assert m.src is not None
        m.src.cursor.mark(100, 1)

    m.src_states.on_state["postcopy-active"] = lose_a_page
    restored = await m.run()
    m.assert_same_memory(restored)
    assert m.src is not None and m.src.stats.postcopy_requested_pages >= 1


def mutual_tls() -> tuple[Security, Security]:
    """(source, destination) security: a test CA, both sides with certificates."""
    import ssl

    import trustme

    ca = trustme.CA()
    server, client = (
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
        ssl.create_default_context(),
    )
    for ctx, cert in ((server, ca.issue_cert("127.0.0.1")), (client, ca.issue_cert("source"))):
        cert.configure_cert(ctx)
        ca.configure_trust(ctx)
    server.verify_mode = ssl.CERT_REQUIRED
    return Security(client=client), Security(server=server)


@pytest.mark.parametrize("buffers", [1, 2])
async def test_postcopy_over_mutual_tls_with_the_staging_ring_always_full(buffers: int) -> None:
    """Over TLS the destination's loop reads BULK and lends frames to the installer:
    with two staging buffers, BULK stops reading after every other frame until one
    comes back (it once never read again: the hold was released only for MAIN); with
    one, it never stops (nothing else in flight would ever release it)."""
    m = Migration(
        Mode.POSTCOPY,
        memory_bytes=64 * MiB,  # far more than the socket buffers hold
        security=mutual_tls(),
        recv={"install_buffers": buffers},
    )
    restored = await asyncio.wait_for(m.run(), 30)
    m.assert_same_memory(restored)
    assert m.src is not None and m.src.stats.push_channel == "bulk"
    assert m.dst.stats.postcopy_bytes > 0


async def test_a_link_lost_after_every_page_arrived_completes_on_reconnect() -> None:
    """The link goes after the last page was pushed but before the source learnt of
    the destination's Complete: the resumed MAIN is answered with Complete, and the
    source completes (it once waited for another answer, then retried for ever)."""
    m = Migration(Mode.POSTCOPY)

    def cut() -> None:
        assert m.src is not None
        m.src.link.cut("test: link cut after AllSent")

    m.src_states.on_event["all-sent"] = cut
    dst_task, src_task = await m.start()
    await m.src_states.reach("postcopy-paused")
    assert m.src is not None
    m.src.recover_now()
    await asyncio.wait_for(src_task, 20)
    restored = await dst_task
    await m.dst.close()
    m.assert_same_memory(restored)
    assert m.src.state is S.COMPLETED and m.dst.state is S.COMPLETED
