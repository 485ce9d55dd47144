"""Prometheus metrics, scraped over HTTP after real RPCs and parsed as Prometheus parses them."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from entity_llm_client import InvalidArgumentError, LLMClient, LLMError, UnauthenticatedError
from entity_llm_server import LLMService
from entity_llm_server.testing import FakeEngine

from ..conftest import wait_until

PIECES = ("one", " two", " three")
GENERATE = "/entity.grpc.LLMService/Generate"
TOKENIZE = "/entity.grpc.LLMService/Tokenize"


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample at http://127.0.0.1:port/metrics, keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_rpcs_tokens_and_latencies_are_counted(serve):
    engine = FakeEngine(PIECES, default_max_new_tokens=6)
    server = serve(LLMService(engine=engine), api_keys=("k",)).start()
    port = server.server.serve_metrics("127.0.0.1", 0)
    with LLMClient(server.target, timeout=10, api_key="k") as client:
        assert client.complete("x").usage.generated_tokens == 6
        assert client.complete("x", max_new_tokens=2).usage.generated_tokens == 2
        with pytest.raises(InvalidArgumentError):
            client.complete("x", max_new_tokens=0)
        client.tokenize("a b c")
    with LLMClient(server.target, timeout=10) as client, pytest.raises(UnauthenticatedError):
        client.tokenize("no key")

    samples = scrape(port)
    assert value(samples, "entity_llm_requests_total", method=GENERATE, code="OK") == 2
    assert value(samples, "entity_llm_requests_total", method=GENERATE, code="INVALID_ARGUMENT") == 1
    assert value(samples, "entity_llm_requests_total", method=TOKENIZE, code="OK") == 1
    assert value(samples, "entity_llm_requests_total", method=TOKENIZE, code="UNAUTHENTICATED") == 1
    assert value(samples, "entity_llm_generated_tokens_total") == 8
    # Two streams had a first message; every later message (6 - 1 + 1 final, 2 - 1 + 1) had a gap before it.
    assert value(samples, "entity_llm_time_to_first_token_seconds_count") == 2
    assert value(samples, "entity_llm_inter_token_latency_seconds_count") == 6 + 2
    assert value(samples, "entity_llm_request_duration_seconds_count", method=GENERATE) == 3
    assert value(samples, "entity_llm_requests_in_flight", method=GENERATE) == 0
    assert ("process_cpu_seconds_total", frozenset()) in samples


def test_in_flight_load_and_cut_streams(serve):
    engine = FakeEngine(PIECES, delay=0.01, default_max_new_tokens=100_000)
    server = serve(LLMService(engine=engine)).start()
    port = server.server.serve_metrics("127.0.0.1", 0)
    with LLMClient(server.target, timeout=30) as client:
        streams = [client.generate("x") for _ in range(3)]
        for stream in streams:
            next(stream)
        samples = scrape(port)
        assert value(samples, "entity_llm_requests_in_flight", method=GENERATE) == 3
        assert value(samples, "entity_llm_active_batch_size") == 3  # FakeEngine.occupancy(): all decode, none wait
        assert value(samples, "entity_llm_queue_depth") == 0
        for stream in streams:
            stream.close()  # the client leaves: CANCELLED
    assert wait_until(lambda: value(scrape(port), "entity_llm_requests_total", method=GENERATE, code="CANCELLED") == 3)
    with LLMClient(server.target, timeout=0.3) as client, pytest.raises(LLMError) as late:
        list(client.generate("x"))
    assert late.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(
        lambda: value(scrape(port), "entity_llm_requests_total", method=GENERATE, code="DEADLINE_EXCEEDED") == 1
    )
    samples = scrape(port)
    assert value(samples, "entity_llm_requests_in_flight", method=GENERATE) == 0
    assert value(samples, "entity_llm_active_batch_size") == 0
    # Cut streams count what they streamed: at least the first token each of the three had.
    assert value(samples, "entity_llm_generated_tokens_total") >= 3


def test_metrics_are_per_server_and_stop_with_it(serve):
    first = serve(LLMService(engine=FakeEngine())).start()
    second = serve(LLMService(engine=FakeEngine())).start()
    ports = [s.server.serve_metrics("127.0.0.1", 0) for s in (first, second)]
    with LLMClient(first.target, timeout=10) as client:
        client.complete("x")
    assert value(scrape(ports[0]), "entity_llm_requests_total", method=GENERATE, code="OK") == 1
    assert value(scrape(ports[1]), "entity_llm_requests_total", method=GENERATE, code="OK") == 0
    first.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(ports[0])
