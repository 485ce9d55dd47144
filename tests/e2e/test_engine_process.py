"""The console script's engine process, as an operator meets it: signals, kills, and the off switch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest

from entity_llm_client import LLMClient, LLMError

from ..conftest import alive, children, console_script, free_port, wait_until
from .conftest import IMPORT_OS_8, inspect_serving

pytestmark = pytest.mark.e2e


class Server:
    """The console script in a session of its own (so a signal can go to its whole process group)."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [console_script("entity-llm-server"), "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        match = re.search(r"listening on (\S+)", self.process.stdout.readline())
        assert match, "the server did not start"
        self.target = match.group(1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def server():
    started: list[Server] = []

    def start(*args: str) -> Server:
        started.append(Server(*args))
        return started[-1]

    yield start
    for each in started:
        each.close()


def test_sigterm_to_the_whole_process_group_still_lets_the_open_stream_finish(server):
    # What a terminal's Ctrl-C or `kill -- -PGID` does: the engine process gets
    # the signal too, and must keep generating until the front end's drain ends.
    running = server("--shutdown-grace", "60")
    with LLMClient(running.target, timeout=60) as client:
        stream = client.generate("class Parser:", max_new_tokens=200, min_new_tokens=200)
        first = next(stream)
        engine_pids = children(running.process.pid)
        assert len(engine_pids) == 1
        stopper = threading.Thread(target=os.killpg, args=(running.process.pid, signal.SIGTERM))
        stopper.start()
        rest = list(stream)
        stopper.join()
    assert first.text
    last = rest[-1]
    assert last.finish_reason is not None
    assert last.finish_reason.value == "max_tokens"
    assert last.usage is not None
    assert last.usage.generated_tokens == 200
    assert running.process.wait(60) == 0
    assert wait_until(lambda: not alive(engine_pids[0]), timeout=30)


def test_a_killed_front_end_takes_its_engine_process_with_it(server):
    running = server()
    with LLMClient(running.target, timeout=60) as client:
        assert "".join(c.text for c in client.generate("import os\n", max_new_tokens=8)) == IMPORT_OS_8
    (engine_pid,) = children(running.process.pid)
    running.process.kill()  # SIGKILL: no cleanup code runs in the front end
    running.process.wait(30)
    assert wait_until(lambda: not alive(engine_pid), timeout=30)


def test_engine_process_off_serves_from_one_process(server):
    running = server("--engine-process", "off")
    with LLMClient(running.target, timeout=60) as client:
        assert "".join(c.text for c in client.generate("import os\n", max_new_tokens=8)) == IMPORT_OS_8
    assert children(running.process.pid) == []


def test_engine_replicas_serve_from_one_engine_process_each_and_end_with_the_server(server):
    running = server("--engine-replicas", "2")
    with LLMClient(running.target, timeout=60) as client:
        assert "".join(c.text for c in client.generate("import os\n", max_new_tokens=8)) == IMPORT_OS_8
    engines = children(running.process.pid)
    assert len(engines) == 2
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(60) == 0
    assert all(not alive(pid) for pid in engines)


def test_a_front_end_killed_while_the_model_loads_leaves_no_engine_process():
    # The engine process reads its pipe only once the weights are loaded; it
    # must notice a dead front end before that, not keep loading for minutes.
    argv = [console_script("entity-llm-server"), "--host", "127.0.0.1", "--port", str(free_port())]
    front = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: children(front.pid), timeout=30)
        (engine_pid,) = children(front.pid)
    finally:
        front.kill()
        front.wait(30)
    assert wait_until(lambda: not alive(engine_pid), timeout=10)


ORPHAN = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {inner!r}, str(os.getpid())])
print(child.pid, flush=True)
time.sleep(120)
"""
WATCHED = """
import sys, threading, time
from entity_llm_server.engine.worker import _exit_when_orphaned
threading.Thread(target=_exit_when_orphaned, args=(int(sys.argv[1]),), daemon=True).start()
time.sleep(120)
"""


def test_the_engine_process_watchdog_exits_once_its_parent_is_gone():
    # The mechanism alone, with a process that would otherwise sleep for two
    # minutes, and whose parent may well die before it has imported anything.
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN.format(inner=WATCHED)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        watched = int(parent.stdout.readline())
        assert alive(watched)
    finally:
        parent.kill()
        parent.wait(30)
        if parent.stdout is not None:
            parent.stdout.close()
    assert wait_until(lambda: not alive(watched), timeout=10)


def _health(target: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return int(reply.status)


def _kill_the_engine_mid_stream(running: Server, how: signal.Signals = signal.SIGKILL) -> LLMError:
    """Send `how` to the engine process while a stream is open (SIGKILL, or SIGSTOP: a process stuck
    for good); return the error that stream ended with."""
    with LLMClient(running.target, timeout=60) as client:
        stream = client.generate("class Parser:", max_new_tokens=400, min_new_tokens=400)
        assert next(stream).text is not None
        (engine_pid,) = children(running.process.pid)
        os.kill(engine_pid, how)
        with pytest.raises(LLMError) as ended:
            list(stream)
    assert ended.value.code is grpc.StatusCode.INTERNAL
    if how == signal.SIGKILL:
        assert "SIGKILL" in str(ended.value)
    return ended.value


def test_by_default_a_failed_engine_leaves_the_server_up_and_not_serving(server):
    from grpc_health.v1 import health_pb2

    running = server("--health-check-interval", "0.2")
    assert _health(running.target) == health_pb2.HealthCheckResponse.SERVING
    _kill_the_engine_mid_stream(running)
    assert wait_until(lambda: _health(running.target) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
    # Still up for the orchestrator's probe, and a new request fails at once.
    assert running.process.poll() is None
    with LLMClient(running.target, timeout=10) as client, pytest.raises(LLMError) as refused:
        list(client.generate("import os\n", max_new_tokens=4))
    assert refused.value.code is grpc.StatusCode.INTERNAL
    assert running.process.poll() is None


def test_on_engine_failure_exit_ends_the_process_with_code_3(server):
    running = server("--on-engine-failure", "exit", "--health-check-interval", "0.2", "--shutdown-grace", "60")
    _kill_the_engine_mid_stream(running)
    # Not the 60 s grace: nothing is left to drain once every stream has failed.
    assert running.process.wait(20) == 3


def test_on_engine_failure_restart_loads_the_engine_again_until_the_bound_then_exits_3(server):
    from grpc_health.v1 import health_pb2

    metrics_port = free_port()
    running = server("--on-engine-failure", "restart", "--max-engine-restarts", "3", "--health-check-interval",
                     "0.2", "--engine-stuck-timeout", "1", "--metrics-port", str(metrics_port),
                     "--host", "127.0.0.1")  # fmt: skip
    serving = health_pb2.HealthCheckResponse.SERVING
    # Killed twice, then stopped for good (SIGSTOP: 10 s without an answer to
    # its pings, 1 s more stalled, and it counts as failed).
    for restart, (how, within) in enumerate([(signal.SIGKILL, 15), (signal.SIGKILL, 15), (signal.SIGSTOP, 30)]):
        old = children(running.process.pid)
        _kill_the_engine_mid_stream(running, how)  # the stream on it ends INTERNAL, as before

        # A new engine process, serving again within 15 s of the kill.
        def serving_anew(old: list[int] = old) -> bool:
            new = [pid for pid in children(running.process.pid) if alive(pid)]
            return bool(new) and not set(new) & set(old) and _health(running.target) == serving

        assert wait_until(serving_anew, timeout=within)
        assert not any(alive(pid) for pid in old)  # the stopped one too: killed, not left behind
        with LLMClient(running.target, timeout=60) as client:
            assert "".join(c.text for c in client.generate("import os\n", max_new_tokens=8)) == IMPORT_OS_8
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert f"entity_llm_engine_restarts_total {restart + 1}.0" in scraped
    _kill_the_engine_mid_stream(running)  # the fourth failure in 10 minutes: a crash loop
    assert running.process.wait(30) == 3


def test_a_killed_tensor_parallel_rank_ends_the_server_with_code_3_under_on_engine_failure_exit(server):
    running = server("--tensor-parallel", "2", "--on-engine-failure", "exit", "--health-check-interval", "0.2")
    ranks = children(running.process.pid)
    assert len(ranks) == 2
    (rank1,) = [pid for pid in ranks if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()]
    with LLMClient(running.target, timeout=60) as client:
        stream = client.generate("class Parser:", max_new_tokens=400, min_new_tokens=400)
        assert next(stream).text is not None
        os.kill(rank1, signal.SIGKILL)
        with pytest.raises(LLMError) as ended:
            list(stream)
    assert ended.value.code is grpc.StatusCode.INTERNAL
    assert "tensor-parallel rank 1 was killed by SIGKILL" in str(ended.value)
    assert running.process.wait(20) == 3
    assert wait_until(lambda: not any(alive(pid) for pid in ranks), timeout=10)


def test_the_front_end_serves_a_chat_without_importing_torch():
    """The gRPC process tokenizes, renders chat templates and detokenizes; the engine process loads the
    tokenizer (AutoTokenizer, with torch) and hands it over, so the front end stays small."""
    served = inspect_serving("chat", {})
    assert served["tokens"] == 8
    assert "torch" not in served["packages"]
    # 84 and 85 MiB here (2026-12-01); 325 and 327 when the front end loaded the tokenizer itself.
    before, after = served["rss_mib"]
    assert before < 200
    assert after < 200
    # What start-up made is frozen out of the collector's reach (the engine process does the same).
    assert served["frozen"] > 10_000
