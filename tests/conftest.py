"""Shared fixtures: real LLMServers on 127.0.0.1:0, in a thread or as the console script."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from entity_llm_server import LLMServer, LLMService

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The reliability suite's figures (`reliability/conftest.record`), gathered here from every
# pytest-xdist worker, and printed and written to benchmarks/results/ at the end of the run.
FIGURES: dict[str, Any] = {}


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None and FIGURES:  # a worker: its figures go to the controller
        workeroutput["reliability_figures"] = dict(FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    FIGURES.update(getattr(node, "workeroutput", {}).get("reliability_figures", {}))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES or hasattr(terminalreporter.config, "workeroutput"):
        return
    mode = os.environ.get("ENTITY_LLM_RELIABILITY", "quick")
    terminalreporter.section(f"reliability figures ({mode} mode)")
    for name, value in FIGURES.items():
        terminalreporter.write_line(f"{name}: {value}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / f"reliability_{mode}.json").write_text(json.dumps(FIGURES, indent=2) + "\n")


def children(pid: int) -> list[int]:
    """A process's child processes (the console script's engine process), from Linux /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended between the listing and the read
            continue
    return found


def alive(pid: int) -> bool:
    """Whether a process runs; a zombie has exited (only its parent's wait() is missing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def free_port() -> int:
    """A loopback port free now, for a server whose port must be known before it prints it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def shared_port(hosts: list[str] | tuple[str, ...]) -> int:
    """A port free now on every one of `hosts` (loopback addresses standing in for pods, which
    all listen on one port)."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on every one of {hosts}")


def wait_until(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; return its last value's truth."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


class ServerThread:
    """An LLMServer with one LLMService, on its own event loop and thread.

    Sync clients in the test's thread and async clients on other loops can all
    reach it; `call()` runs a coroutine on the server's loop (to inspect the
    engine, for example). `server` is the LLMServer (its `health`, `metrics`,
    `gate`); `credentials` makes its port TLS; `address` is where it listens
    (port 0 picks one); `options` go to LLMServer. Stopping it closes the
    service's engine.
    """

    def __init__(
        self,
        service: LLMService,
        *,
        credentials: grpc.ServerCredentials | None = None,
        address: str = "127.0.0.1:0",
        **options: Any,
    ) -> None:
        self.service = service
        self.address = address
        self.credentials = credentials
        self.options = options
        self.server: LLMServer | None = None
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-grpc-server", daemon=True)

    @property
    def target(self) -> str:
        return f"{self.address.rpartition(':')[0]}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._started.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        server = self.server = LLMServer(self.service, **self.options)
        self.port = server.add_port(self.address, self.credentials)
        await server.start()
        self._stop = asyncio.Event()
        self._started.set()
        await self._stop.wait()
        await server.stop(grace=1)
        # The engine stops here, on the loop it ran on: its threads (or its process) end with the server.
        if (engine := self.service.current_engine) is not None:
            await engine.close()

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.wait(timeout=120)
        if self._error is not None:
            raise RuntimeError("test server failed to start") from self._error
        return self

    def call(self, coro: object, timeout: float = 30) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    """Close the engines a test made with tests/engines.py once it is over (after its servers
    stopped): a started engine keeps its batching threads, or its core process, until closed."""
    made = sys.modules.get(f"{__package__}.engines")
    before = len(made.MADE) if made is not None else 0
    yield
    made = sys.modules.get(f"{__package__}.engines")
    if made is not None:
        for engine in made.MADE[before:]:
            asyncio.run(engine.close())
        del made.MADE[before:]


@pytest.fixture
def serve() -> Iterator[type[ServerThread]]:
    """Start ServerThreads on demand; all are stopped after the test."""
    started: list[ServerThread] = []

    class _Tracked(ServerThread):
        def start(self) -> ServerThread:
            started.append(self)
            return super().start()

    yield _Tracked
    for server in started:
        server.stop()


def console_script(name: str) -> str:
    """The console script installed beside this interpreter."""
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed beside {sys.executable}"
    return found


class RunningServer:
    """`entity-llm-server` in a subprocess; its log goes to a file, never a full pipe."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115  # closed by __exit__
        self.process = subprocess.Popen(
            [console_script("entity-llm-server"), "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=None if env is None else {**os.environ, **env},
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
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model(kind)`: the folder of a tiny random-weight model of that architecture
    (tests/architectures.py), built on first use and kept for the session."""
    from .architectures import build

    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return get


@pytest.fixture(scope="session")
def _application_tracing() -> Any:
    """The application's OpenTelemetry, set once per process: a global tracer provider that keeps
    finished spans in memory (the client SDK traces through the global provider, as libraries do)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


@pytest.fixture
def client_spans(_application_tracing: Any) -> Iterator[Any]:
    """The spans the client SDK finishes during the test (an InMemorySpanExporter)."""
    _application_tracing.clear()
    yield _application_tracing
    _application_tracing.clear()
