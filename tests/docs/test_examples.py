"""Every example of the docs site and the README runs, against a real server on the demo model.

`nox -s docs` runs this module (the `tests` session leaves it to that session). Examples that
start a server run first, each alone on its port; then one `entity-llm-server` on
127.0.0.1:50051, the address the examples name, serves all the others.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from entity_llm_client import LLMClient, UnavailableError

from ..conftest import RunningServer, wait_until
from .examples import Example, collect

EXAMPLES = collect()
# Servers first: they need the port the shared server takes afterwards.
ORDERED = sorted(EXAMPLES, key=lambda example: example.serves is None)
TIMEOUT = 180  # a hang guard, not a measurement

pytestmark = pytest.mark.docs


def environment() -> dict[str, str]:
    """The user's environment, with the session's console scripts first and no server settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ENTITY_LLM_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # As gRPC binds: a port whose last connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SharedServer:
    """`entity-llm-server` on 127.0.0.1:50051, started when an example first needs it."""

    def __init__(self) -> None:
        self.server: RunningServer | None = None

    def start(self) -> None:
        if self.server is None:
            assert port_is_free(50051), "port 50051 is taken: the docs' examples need it for their server"
            self.server = RunningServer("--port", "50051", "--max-batch-size", "8", "--log-level", "WARNING")

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            with server:
                assert server.stop() == 0, server.stderr()


@pytest.fixture(scope="module")
def shared() -> Iterator[SharedServer]:
    server = SharedServer()
    yield server
    server.stop()


def command(example: Example, folder: Path) -> list[str]:
    script = folder / ("example.py" if example.language == "python" else "example.sh")
    script.write_text(example.code, encoding="utf-8")
    if example.language == "python":
        return [sys.executable, str(script)]
    return ["bash", "-euo", "pipefail", str(script)]


def generates(port: int, process: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether the server on `port` answers a Generate call before `deadline` (or its process ends).

    Not its health: the seed's snippet serves LLMService alone."""
    while time.monotonic() < deadline and process.poll() is None:
        with LLMClient(f"127.0.0.1:{port}", timeout=60) as client:
            try:
                return client.complete("def f(x):", max_new_tokens=4).usage.generated_tokens == 4
            except UnavailableError:  # not listening yet
                time.sleep(0.5)
    return False


@pytest.mark.parametrize("example", ORDERED, ids=[example.id for example in ORDERED])
def test_example_runs(example: Example, shared: SharedServer, tmp_path: Path) -> None:
    if example.skip is not None:
        pytest.skip(example.skip)
    if example.serves is not None:
        shared.stop()
        check_server_example(example, tmp_path)
        return
    shared.start()
    result = subprocess.run(
        command(example, tmp_path),
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"{example.id} failed:\n{example.code}\n{result.stdout}\n{result.stderr}"


def check_server_example(example: Example, folder: Path) -> None:
    assert example.serves is not None
    assert port_is_free(example.serves), f"port {example.serves} is taken"
    log = folder / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command(example, folder),
            cwd=folder,
            env=environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the shell, the server, its engine process
        )
        try:
            up = generates(example.serves, process, time.monotonic() + TIMEOUT)
            assert up, f"{example.id} never served on {example.serves}:\n{log.read_text()}"
            os.killpg(process.pid, signal.SIGTERM)  # as a terminal's Ctrl-C or a container stop reaches all
            code = process.wait(timeout=60)
            assert wait_until(lambda: group_ended(process.pid), TIMEOUT), f"{example.id} left processes behind"
        finally:
            if not group_ended(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    # 0: it drained and exited; -SIGTERM: a shell, or a program that leaves the signal to Python's
    # default (the seed's snippet, kept as it was written).
    assert code in (0, -signal.SIGTERM), f"{example.id} exited {code}:\n{log.read_text()}"


def group_ended(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    return False
