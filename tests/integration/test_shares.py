"""Fair shares: one API key or one client host holds at most its share of Generate streams; others
are still admitted, and a share comes back when a stream ends."""

from __future__ import annotations

import pytest

from entity_llm_client import LLMClient, OverloadedError
from entity_llm_server import LLMService
from entity_llm_server.shares import Shares, peer_host
from entity_llm_server.testing import FakeEngine

from ..conftest import wait_until


def _holding(client: LLMClient, count: int) -> list:
    """`count` long streams, each admitted (its first chunk read), left open."""
    streams = [client.generate("x", max_new_tokens=400) for _ in range(count)]
    for stream in streams:
        next(stream)
    return streams


def test_one_host_over_its_share_is_refused_while_another_host_is_served(serve):
    # Two client hosts on one machine: IPv4 and IPv6 loopback, to a dual-stack port.
    server = serve(LLMService(engine=FakeEngine(delay=0.02)), address="[::]:0", max_streams_per_peer=3).start()
    with (
        LLMClient(f"127.0.0.1:{server.port}", timeout=30) as greedy,
        LLMClient(f"[::1]:{server.port}", timeout=30) as other,
    ):
        held = _holding(greedy, 3)
        with pytest.raises(OverloadedError, match=r"127\.0\.0\.1 holds 3 streams.*--max-streams-per-peer 3"):
            greedy.complete("x")
        assert other.complete("x", max_new_tokens=2).usage.generated_tokens == 2  # its own share
        held.pop().close()  # a stream ends: its place in the share comes back
        assert greedy.complete("x", max_new_tokens=2).usage.generated_tokens == 2
        for stream in held:
            stream.close()
        # Unary calls are not streams: no share needed.
        assert greedy.model_info().model_id == "fake"


def test_one_key_over_its_share_is_refused_while_another_key_is_served(serve):
    server = serve(
        LLMService(engine=FakeEngine(delay=0.02)), api_keys=["key-a", "key-b"], max_streams_per_key=2
    ).start()
    with (
        LLMClient(server.target, timeout=30, api_key="key-a") as a,
        LLMClient(server.target, timeout=30, api_key="key-b") as b,
    ):
        held = _holding(a, 2)
        with pytest.raises(OverloadedError, match=r"this API key holds 2 streams.*--max-streams-per-key 2"):
            a.complete("x")
        assert b.complete("x", max_new_tokens=2).usage.generated_tokens == 2
        for stream in held:
            stream.close()


@pytest.mark.parametrize(
    ("peer", "host"),
    [("ipv4:10.0.0.7:53122", "10.0.0.7"), ("ipv6:[::1]:53122", "::1"), ("unix:/run/llm.sock", "unix:/run/llm.sock")],
)
def test_a_peer_is_its_host(peer, host):
    assert peer_host(peer) == host


def test_shares_count_up_and_down_and_without_limits_are_off():
    shares = Shares(per_key=1, per_peer=2)
    assert shares.take(0, "ipv4:1.2.3.4:1") is None
    assert shares.take(0, "ipv4:1.2.3.4:2") is not None  # key 0's one stream
    assert shares.take(1, "ipv4:1.2.3.4:3") is None
    assert shares.take(2, "ipv4:1.2.3.4:4") is not None  # the host's two
    shares.give_back(0, "ipv4:1.2.3.4:1")
    assert shares.take(0, "ipv4:1.2.3.4:5") is None
    assert not Shares().limited
    with pytest.raises(ValueError, match="share"):
        Shares(per_key=-1)


def _stalled(server) -> float:
    return server.server.metrics.registry.get_sample_value("entity_llm_stalled_streams_total")


def test_streams_whose_client_stopped_reading_are_ended_and_free_their_share(serve):
    # 64 KiB pieces: a stream that is not read fills its flow-control window within a few dozen messages.
    engine = FakeEngine(pieces=("x" * 65536,))
    server = serve(LLMService(engine=engine), max_streams_per_peer=16, stalled_stream_timeout=1.0).start()
    with LLMClient(server.target, timeout=60) as client:
        held = _holding(client, 16)  # each read once (admitted), then never again
        with pytest.raises(OverloadedError, match="--max-streams-per-peer 16"):
            client.complete("x", max_new_tokens=1)
        assert wait_until(lambda: _stalled(server) == 16, timeout=15), _stalled(server)
        assert wait_until(lambda: engine.active == 0)  # their generations were cancelled
        # The share came back: a client that reads is served.
        assert client.complete("x", max_new_tokens=2).usage.generated_tokens == 2
        # A stalled client that reads again gets what was on its way, then the reason.
        with pytest.raises(OverloadedError, match=r"had not read for 1 s.*--stalled-stream-timeout 1"):
            for _ in held[0]:
                pass
        for stream in held[1:]:
            stream.close()


def test_a_stream_waiting_on_the_model_is_not_ended_as_stalled(serve):
    # Each token takes longer than the timeout: the wait is the engine's, not the client's.
    server = serve(LLMService(engine=FakeEngine(delay=0.8)), stalled_stream_timeout=0.3).start()
    with LLMClient(server.target, timeout=60) as client:
        assert client.complete("x", max_new_tokens=3).usage.generated_tokens == 3
    assert _stalled(server) == 0
