"""e2e fixtures: the installed console script, started as a user starts it."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def console_script(name: str) -> str:
    """The console script installed beside this interpreter."""
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed beside {sys.executable}"
    return found


class RunningServer:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [console_script("entity-llm-server"), "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        if not match:
            self.process.kill()
            raise AssertionError(f"server did not start: {line!r} {self.process.stderr.read()!r}")  # type: ignore[union-attr]
        self.target = match.group(1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


@pytest.fixture(scope="session")
def console_server() -> Iterator[RunningServer]:
    """`entity-llm-server` on the embedded default model, shared by the session."""
    server = RunningServer("--max-new-tokens", "32")
    yield server
    assert server.stop() == 0
