"""What the source's phases wait for: the destination's answers, and trouble.

Each answer the destination sends resolves a named future from the engine's event
callback (on the loop): ``SetupAck``, ``Ready``, ``Running``, ``Complete``, the answer to
a resumed MAIN (``ReceivedBitmap``, ``Ready`` or ``Complete``) and each
``PrecopyRoundAck``.  The *trouble* future is resolved by whatever must end any wait —
the link lost, an ``Error`` received, the operator's cancel — with the exception to
raise.  :meth:`Answers.until` waits for one answer or the trouble, whichever comes
first, so no phase can miss a failure while it waits.
"""

from __future__ import annotations

import asyncio
from typing import Any

from migrated.errors import LinkLost, MigratedError

__all__ = ["Answers"]


class Answers:
    """The futures of one outgoing migration.  Loop-only; made inside the loop."""

    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[Any]] = {}
        self._trouble: asyncio.Future[MigratedError] | None = None

    def future(self, name: str) -> asyncio.Future[Any]:
        fut = self._futures.get(name)
        if fut is None:
            fut = self._futures[name] = asyncio.get_running_loop().create_future()
        return fut

    @property
    def setup_ack(self) -> asyncio.Future[Any]:
        return self.future("setup-ack")

    @property
    def ready(self) -> asyncio.Future[Any]:
        return self.future("ready")

    @property
    def running(self) -> asyncio.Future[Any]:
        return self.future("running")

    @property
    def complete(self) -> asyncio.Future[Any]:
        return self.future("complete")

    @property
    def resumed(self) -> asyncio.Future[Any]:
        """The answer to a resumed MAIN (recovery)."""
        return self.future("resumed")

    def ack_arrived(self) -> asyncio.Future[Any]:
        """A future for the next PrecopyRoundAck (a fresh one once the last arrived)."""
        fut = self.future("ack")
        if fut.done():
            del self._futures["ack"]
            fut = self.future("ack")
        return fut

    def resolve(self, name: str, value: Any) -> None:
        fut = self.future(name)
        if not fut.done():
            fut.set_result(value)

    def new_trouble(self) -> None:
        """A fresh trouble future (after recovery: the old trouble is dealt with), and
        a fresh wait for the answer to the next resumed MAIN."""
        self._trouble = asyncio.get_running_loop().create_future()
        self._trouble.add_done_callback(lambda f: f.cancelled() or f.result())
        self._futures.pop("resumed", None)

    def raise_trouble(self, exc: MigratedError) -> None:
        """Make every wait raise ``exc`` (the first trouble wins)."""
        if self._trouble is not None and not self._trouble.done():
            self._trouble.set_result(exc)

    def trouble(self) -> MigratedError | None:
        """The trouble that arrived, if any."""
        assert self._trouble is not None
        return self._trouble.result() if self._trouble.done() else None

    async def until(
        self, fut: asyncio.Future[Any], *, timeout_s: float | None = None, what: str = ""
    ) -> Any:
        """Wait for ``fut``; raises the trouble that came first (link lost, Error,
        cancel), or after ``timeout_s`` LinkLost naming ``what`` (without ``what``:
        returns None)."""
        assert self._trouble is not None
        trouble = self._trouble
        await asyncio.wait([fut, trouble], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if fut.done():
            return fut.result()
        if trouble.done():
            raise trouble.result()
        if what:
            raise LinkLost(
                f"no answer from the destination: gave up waiting for {what} after {timeout_s:g} s"
            )
        return None
