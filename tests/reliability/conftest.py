"""The reliability suite: bad input, load, faults and a soak, in a quick mode (CI) and a long one.

`ENTITY_LLM_RELIABILITY=long` (what `nox -s soak` sets) selects the long
sizes. Each test records its figures; the run prints them at the end and
writes them to benchmarks/results/reliability_MODE.json (tests/conftest.py,
which gathers them from every pytest-xdist worker).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ..conftest import FIGURES, children

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A conftest's `pytestmark` marks nothing: every test of this tier gets the marker here.
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.reliability)


LONG = os.environ.get("ENTITY_LLM_RELIABILITY", "quick") == "long"


def size(quick: int, long: int) -> int:
    """The quick or the long size of a run."""
    return long if LONG else quick


def record(name: str, value: Any) -> None:
    """Keep a figure for the end-of-run report."""
    FIGURES[name] = value


def rss_mib(pid: int) -> float:
    """A process's resident set size, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def server_rss_mib(pid: int) -> tuple[float, float]:
    """(front end, engine process) resident set sizes of the console script, in MiB.

    The server must have its engine process (the default): the model, its KV
    cache and every request's state live there.
    """
    (engine,) = children(pid)
    return rss_mib(pid), rss_mib(engine)
