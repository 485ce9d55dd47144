"""Replicas as pods would run them: console scripts on 127.0.0.2, .3, .4 (and .5) with one port,
behind one client's round_robin with health checking and retries (gRPC's own)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entity_llm_client import (
    AsyncLLMClient,
    Completion,
    FinishReason,
    LLMClient,
    LLMError,
    OverloadedError,
    UnavailableError,
)

from ..conftest import RunningServer, alive, children, console_script, shared_port, wait_until

pytestmark = pytest.mark.e2e

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
LATE = "127.0.0.5"  # a replica that starts after the client connected
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Small places (2 decoding + 2 waiting) so a replica can be filled; a short
# connection age so clients reconnect (and re-resolve) within a test.
FLAGS = (
    "--max-new-tokens", "8", "--max-batch-size", "2", "--max-queue", "2", "--health-check-interval", "0.2",
    "--shutdown-grace", "20", "--max-connection-age", "2", "--max-connection-age-grace", "60",
)  # fmt: skip
ENV = {"OMP_NUM_THREADS": "1"}  # three engines share two cores
FINISHED = "rpc finished method=/entity.grpc.LLMService/Generate code="


class Fleet:
    """Replicas on distinct loopback addresses and one port; dead ones come back in `ensure()`."""

    def __init__(self) -> None:
        self.port = shared_port((*HOSTS, LATE))
        self.metrics_port = self.port
        while self.metrics_port == self.port:
            self.metrics_port = shared_port((*HOSTS, LATE))
        self.replicas: dict[str, RunningServer] = {}

    def start(self, *hosts: str) -> None:
        with ThreadPoolExecutor(len(hosts)) as pool:
            started = pool.map(
                lambda host: RunningServer(
                    *FLAGS, "--host", host, "--port", str(self.port), "--metrics-port", str(self.metrics_port), env=ENV
                ),
                hosts,
            )
            self.replicas.update(zip(hosts, started, strict=True))

    def ensure(self) -> None:
        dead = [host for host in HOSTS if host not in self.replicas or self.replicas[host].process.poll() is not None]
        for host in dead:
            if host in self.replicas:
                self.replicas.pop(host).__exit__()
        if dead:
            self.start(*dead)

    def __getitem__(self, host: str) -> RunningServer:
        return self.replicas[host]

    def addresses(self, hosts: tuple[str, ...] = HOSTS) -> list[str]:
        return [f"{host}:{self.port}" for host in hosts]

    def finished(self, host: str, code: str = "OK") -> int:
        """Generate calls the replica has finished with `code`, from its access log."""
        return self[host].stderr().count(FINISHED + code + " ")

    def served(self) -> dict[str, int]:
        return {host: self.finished(host) for host in self.replicas}

    def streaming(self, host: str) -> int:
        """Generate streams the replica is serving now, from its metrics."""
        text = urllib.request.urlopen(f"http://{host}:{self.metrics_port}/metrics", timeout=10).read().decode()
        found = re.search(r'entity_llm_requests_in_flight\{method="/entity.grpc.LLMService/Generate"\} (\S+)', text)
        return int(float(found.group(1))) if found else 0

    def health(self, host: str) -> int:
        with grpc.insecure_channel(f"{host}:{self.port}") as channel:
            request = health_pb2.HealthCheckRequest(service="entity.grpc.LLMService")
            return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status)

    def close(self) -> None:
        for server in self.replicas.values():
            server.__exit__()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    fleet = Fleet()
    try:
        fleet.start(*HOSTS)
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def replicas(fleet: Fleet) -> Fleet:
    """The three replicas, each running (a test before may have stopped one)."""
    fleet.ensure()
    return fleet


def _finished(completions: list[Completion]) -> bool:
    return all(c.finish_reason in (FinishReason.MAX_TOKENS, FinishReason.EOS) for c in completions)


def _served_since(fleet: Fleet, before: dict[str, int], total: int) -> dict[str, int]:
    """Per replica, the calls served since `before`, once `total` of them are in the logs."""
    since = lambda: {host: n - before.get(host, 0) for host, n in fleet.served().items()}  # noqa: E731
    wait_until(lambda: sum(since().values()) >= total, timeout=10)
    return since()


def test_one_client_spreads_its_streams_over_every_replica(replicas):
    before = replicas.served()

    async def run() -> list[Completion]:
        async with AsyncLLMClient(replicas.addresses(), timeout=60) as client:
            slots = asyncio.Semaphore(6)

            async def one(i: int) -> Completion:
                async with slots:
                    return await client.complete(f"def f{i}(x):", max_new_tokens=4)

            return await asyncio.gather(*(one(i) for i in range(60)))

    done = asyncio.run(run())
    assert len(done) == 60
    assert _finished(done)
    served = _served_since(replicas, before, 60)
    assert sum(served.values()) == 60, served
    assert all(n >= 10 for n in served.values()), served


def test_the_command_takes_several_servers_in_one_target(replicas):
    before = replicas.served()
    command = [console_script("entity-llm"), "--target", ",".join(replicas.addresses()), "--json"]
    for _ in range(8):
        out = subprocess.run([*command, "generate", "def c(x):", "--max-new-tokens", "2"], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
    served = _served_since(replicas, before, 8)
    assert sum(served.values()) == 8, served
    assert len([n for n in served.values() if n]) >= 2, served  # a new client each time, spread all the same


def test_a_full_replicas_refusals_are_retried_on_the_others(replicas):
    full = HOSTS[2]
    refused = replicas.finished(full, "RESOURCE_EXHAUSTED")
    stop = threading.Event()

    def hold(direct: LLMClient) -> None:
        # A stream straight to the full replica, renewed as soon as it ends:
        # four of them keep its four places (two decoding, two waiting) taken.
        while not stop.is_set():
            with contextlib.suppress(OverloadedError):  # a balanced call took the place first
                direct.complete("class A:", min_new_tokens=200, max_new_tokens=200)

    with LLMClient(f"{full}:{replicas.port}", timeout=120) as direct, ThreadPoolExecutor(4) as pool:
        holders = [pool.submit(hold, direct) for _ in range(4)]
        try:
            time.sleep(0.5)  # the four are in
            with LLMClient(replicas.addresses(), timeout=60) as client:
                done = [client.complete(f"def g{i}(x):", max_new_tokens=4) for i in range(20)]
        finally:
            stop.set()
        for holder in holders:
            holder.result()
    assert len(done) == 20
    assert _finished(done)
    assert replicas.finished(full, "RESOURCE_EXHAUSTED") > refused  # it was asked, said no, and the call went on


def test_a_replica_whose_engine_stops_answering_gets_no_calls_until_it_answers_again(replicas):
    host = HOSTS[1]
    (engine,) = children(replicas[host].process.pid)
    os.kill(engine, signal.SIGSTOP)  # alive, answering nothing
    try:
        assert wait_until(lambda: replicas.health(host) == NOT_SERVING, timeout=30)
        before = replicas.served()
        with LLMClient(replicas.addresses(), timeout=60) as client:
            done = [client.complete(f"def h{i}(x):", max_new_tokens=4) for i in range(9)]
        assert _finished(done)
        served = _served_since(replicas, before, 9)
        assert (served[host], sum(served.values())) == (0, 9), served
    finally:
        os.kill(engine, signal.SIGCONT)
    assert wait_until(lambda: replicas.health(host) == SERVING, timeout=30)
    before = replicas.served()
    with LLMClient(replicas.addresses(), timeout=60) as client:
        done = [client.complete(f"def i{i}(x):", max_new_tokens=4) for i in range(9)]
    assert _finished(done)
    assert _served_since(replicas, before, 9)[host] > 0


def test_sigterm_on_a_replica_loses_no_call_with_or_without_a_request_id(replicas):
    victim = HOSTS[0]

    async def run() -> list[Completion]:
        async with AsyncLLMClient(replicas.addresses(), timeout=60) as client:
            slots = asyncio.Semaphore(6)

            async def one(i: int) -> Completion:
                metadata = [("x-request-id", f"drain-{i}")] if i % 2 else []
                async with slots:
                    return await client.complete(f"def d{i}(x):", max_new_tokens=8, metadata=metadata)

            calls = [asyncio.create_task(one(i)) for i in range(48)]
            await asyncio.gather(*calls[:6])
            replicas[victim].process.send_signal(signal.SIGTERM)  # mid-run: streams on it, calls arriving
            return await asyncio.gather(*calls)

    done = asyncio.run(run())
    assert len(done) == 48
    assert _finished(done)
    assert replicas[victim].process.wait(60) == 0
    assert "cancelling" not in replicas[victim].stderr()  # its running streams finished within the grace


def test_a_client_finds_a_replica_started_after_it_connected(replicas):
    class Addresses(BaseResolver):  # type: ignore[misc]
        def __init__(self) -> None:
            self.ips = list(HOSTS)

        def resolve(self, request, handler):  # type: ignore[no-untyped-def]
            reply = request.reply()
            if QTYPE[request.q.qtype] == "A":
                for ip in self.ips:
                    reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=1))
            return reply

    names = Addresses()
    dns = DNSServer(names, port=0, address="127.0.0.1", logger=DNSLogger("-request,-reply,-truncated,-error"))
    dns.start_thread()
    target = f"dns://127.0.0.1:{dns.server.server_address[1]}/replicas.test:{replicas.port}"
    # gRPC re-resolves at most every 30 s by default; the age is what asks it to.
    options = [("grpc.dns_min_time_between_resolutions_ms", 500)]
    try:
        with LLMClient(target, timeout=60, options=options) as client:
            assert _finished([client.complete("def a(x):", max_new_tokens=4) for _ in range(3)])
            replicas.start(LATE)
            names.ips.append(LATE)
            deadline = time.monotonic() + 40  # a few connection ages
            while replicas.finished(LATE) == 0 and time.monotonic() < deadline:
                assert _finished([client.complete("def b(x):", max_new_tokens=4)])
            assert replicas.finished(LATE) > 0, "the new replica got no call"
    finally:
        dns.stop()
        dns.server.server_close()
        if LATE in replicas.replicas:
            replicas.replicas.pop(LATE).__exit__()


def test_a_killed_replica_fails_its_streams_the_others_serve_and_none_left_is_unavailable(replicas):
    victim = HOSTS[2]
    (engine,) = children(replicas[victim].process.pid)
    with LLMClient(replicas.addresses(), timeout=60) as client:
        before = replicas.served()
        # Long streams through the balancing client until one runs on the victim (round_robin gives it
        # one within a turn, unless a reconnect after the connection age skips it for a moment).
        streams = []
        while not replicas.streaming(victim):
            assert len(streams) < 9, "round_robin never chose the victim"
            streams.append(client.generate("class K:", min_new_tokens=480, max_new_tokens=480))
            next(streams[-1])
        on_victim = replicas.streaming(victim)
        replicas[victim].process.kill()
        outcomes: list[str] = []
        for stream in streams:
            try:
                reason = list(stream)[-1].finish_reason
                outcomes.append(reason.name if reason else "none")
            except LLMError as error:
                outcomes.append(error.code.name)
        # The streams on the killed replica fail (never hang); the others finish.
        failed = [o for o in outcomes if o != "MAX_TOKENS"]
        assert len(failed) == on_victim, outcomes
        assert set(failed) <= {"INTERNAL", "UNAVAILABLE"}, outcomes
        assert wait_until(lambda: not alive(engine), timeout=30)  # its engine process went with it

        done = [client.complete(f"def k{i}(x):", max_new_tokens=4) for i in range(6)]
        assert _finished(done)
        finished = len(streams) - on_victim + 6
        served = _served_since(replicas, before, finished)
        assert (served[victim], sum(served.values())) == (0, finished), served

        for host in HOSTS[:2]:
            replicas[host].process.kill()
            replicas[host].process.wait(30)
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="no replica was healthy") as failed:
            client.complete("def z(x):", timeout=10)
        assert time.monotonic() - started < 10
        assert "Connection refused" in failed.value.details or "unhealthy" in failed.value.details
