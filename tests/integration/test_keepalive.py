"""A long, quiet stream under aggressive client keepalive pings is not cut off.

The quick run streams a few tokens with long gaps (about 10 s in all). For a
long run, set ENTITY_LLM_TEST_KEEPALIVE_SECONDS (say 600) and, optionally,
ENTITY_LLM_TEST_KEEPALIVE_GAP (seconds between tokens, default 5).
"""

from __future__ import annotations

import os

from entity_llm_client import FinishReason, LLMClient
from entity_llm_server import LLMService
from entity_llm_server.testing import FakeEngine

GAP = float(os.environ.get("ENTITY_LLM_TEST_KEEPALIVE_GAP", "5"))
SECONDS = float(os.environ.get("ENTITY_LLM_TEST_KEEPALIVE_SECONDS", "10"))

# A ping every second, also while no data flows: far more often than the
# server's 5 s minimum, so each quiet gap collects several "bad" pings. A
# server that counted them as abuse (grpcio's default: 2 strikes) would answer
# GOAWAY "too_many_pings" and the stream would end UNAVAILABLE.
AGGRESSIVE = [
    ("grpc.keepalive_time_ms", 1_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def test_a_slow_stream_survives_aggressive_keepalive_pings(serve):
    tokens = max(2, round(SECONDS / GAP))
    engine = FakeEngine(("tick",), delay=GAP, default_max_new_tokens=tokens)
    server = serve(LLMService(engine=engine)).start()
    with LLMClient(server.target, timeout=SECONDS * 3 + 60, options=AGGRESSIVE) as client:
        chunks = list(client.generate("wait for it"))
    assert [c.text for c in chunks] == ["tick"] * tokens + [""]
    assert chunks[-1].finish_reason is FinishReason.MAX_TOKENS


def test_the_sdk_default_keepalive_is_within_what_the_server_accepts():
    from entity_llm_client._connection import CHANNEL_OPTIONS
    from entity_llm_server.server import SERVER_OPTIONS

    client, server = dict(CHANNEL_OPTIONS), dict(SERVER_OPTIONS)
    # Even a server that counted strikes would accept these pings.
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert client["grpc.http2.max_pings_without_data"] == 0  # pings go on while a stream is quiet
    assert server["grpc.http2.max_ping_strikes"] == 0
