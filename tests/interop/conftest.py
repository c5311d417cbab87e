"""Fixtures of the interoperability tests: a :class:`~tests.integration.pair.Pair` whose
processes (and work directory) are cleaned up also when a test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..integration.pair import Pair, workdir


@pytest.fixture
def pair() -> Iterator[Pair]:
    with workdir("migrated-interop-") as d:
        p = Pair(Path(d))
        try:
            yield p
        finally:
            p.close()
