"""e2e fixtures: the installed console script, started as a user starts it."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
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
    """`entity-llm-server` in a subprocess; its log goes to a file, never a full pipe."""

    def __init__(self, *args: str) -> None:
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115  # closed by __exit__
        self.process = subprocess.Popen(
            [console_script("entity-llm-server"), "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        if not match:
            self.process.kill()
            self.stop()
            raise AssertionError(f"server did not start: {line!r}\n{self.stderr()}")
        self.target = match.group(1)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log.close()

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


@pytest.fixture(scope="session")
def console_server() -> Iterator[RunningServer]:
    """`entity-llm-server` on the embedded default model, shared by the session."""
    with RunningServer("--max-new-tokens", "32") as server:
        yield server
        assert server.stop() == 0, server.stderr()
