"""Hostile and careless callers, and an engine that dies under load.

- Forged turns: fuzzed chat contents made of special-token text, pieces of it
  and markup-like strings never put a special token in the prompt where the
  template did not.
- A greedy host: one client host opens as many streams as it can while
  another is served; the greedy one gets its share and no more.
- An engine process killed while streams run, under `--on-engine-failure
  restart`: every stream ends OK or INTERNAL, never hangs, and the server
  serves again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entity_llm_server import LLMService, UnifiedLLMResource
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import BatchingSettings, FrontEnd
from entity_llm_server.engine.chat import special_texts

from ..conftest import RunningServer, ServerThread, children, wait_until
from .conftest import record, size

UNSPECIFIED = llm_pb2.FINISH_REASON_UNSPECIFIED


@pytest.fixture(scope="module")
def engine() -> FrontEnd:
    built = UnifiedLLMResource(batching=BatchingSettings(max_batch_size=4, max_queue=4)).load_engine()
    assert isinstance(built, FrontEnd)
    return built


def _contents(tokenizer) -> st.SearchStrategy[str]:
    specials = sorted(special_texts(tokenizer))
    pieces = st.sampled_from(
        [*specials, *(t[:-1] for t in specials), *(t[1:] for t in specials), "<|", "|>", "\n", " ", "<", ">", "|"]
    )
    fragments = st.one_of(pieces, st.text(max_size=6))
    return st.lists(fragments, max_size=12).map("".join)


def test_fuzzed_chat_contents_never_forge_a_special_token(engine):
    tokenizer = engine.tokenizer
    specials = {text: tokenizer.convert_tokens_to_ids(text) for text in special_texts(tokenizer)}
    roles = st.sampled_from(("system", "user", "assistant"))
    conversations = st.lists(st.tuples(roles, _contents(tokenizer)), min_size=1, max_size=4)
    runs: list[int] = []

    @settings(max_examples=size(150, 3_000), deadline=None, suppress_health_check=list(HealthCheck))
    @given(conversation=conversations)
    def check(conversation: list[tuple[str, str]]) -> None:
        runs.append(1)
        ids = engine.encode_chat(tuple(conversation))
        template_only = engine.encode_chat(tuple((role, "x") for role, _ in conversation))
        for text, token in specials.items():
            assert ids.count(token) == template_only.count(token), (text, conversation)
        decoded = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        for _, content in conversation:
            assert content in decoded

    check()
    record("hostile: fuzzed conversations, no forged special token", len(runs))


@pytest.fixture
def shared_server() -> Iterator[ServerThread]:
    service = LLMService(UnifiedLLMResource(batching=BatchingSettings(max_batch_size=8, max_queue=8)))
    thread = ServerThread(service, address="[::]:0", max_streams_per_peer=4).start()
    yield thread
    thread.stop()


def test_a_greedy_host_gets_its_share_while_another_host_is_served(shared_server):
    """IPv4 loopback takes as many streams as it can; IPv6 loopback is another host, served meanwhile."""
    port = shared_server.port
    greedy_streams = size(24, 96)

    async def main() -> tuple[list[grpc.StatusCode], list[float]]:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as greedy,
            grpc.aio.insecure_channel(f"[::1]:{port}") as polite,
        ):
            grab = llm_pb2_grpc.LLMServiceStub(greedy)
            serve = llm_pb2_grpc.LLMServiceStub(polite)

            async def hog(i: int) -> grpc.StatusCode:
                request = llm_pb2.GenerateRequest(prompt=f"class C{i}:", max_new_tokens=48, min_new_tokens=48)
                try:
                    async for _ in grab.Generate(request, timeout=120):
                        pass
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            async def polite_call(i: int) -> float:
                started = time.perf_counter()
                request = llm_pb2.GenerateRequest(prompt=f"def f{i}(x):", max_new_tokens=8)
                messages = [m async for m in serve.Generate(request, timeout=120)]
                assert messages[-1].finish_reason != UNSPECIFIED
                return time.perf_counter() - started

            hogs = [asyncio.ensure_future(hog(i)) for i in range(greedy_streams)]
            await asyncio.sleep(0.2)  # the greedy host has taken its share
            seconds = [await polite_call(i) for i in range(size(4, 16))]
            return list(await asyncio.gather(*hogs)), seconds

    codes, seconds = shared_server.call(main(), timeout=600)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
    # They all came at once: the share's 4 ran, the rest were refused (a few may have found a place freed).
    assert 4 <= codes.count(grpc.StatusCode.OK) <= 8, codes
    record("hostile: greedy host's streams OK / refused", f"{codes.count(grpc.StatusCode.OK)} / "
           f"{codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)}")  # fmt: skip
    record("hostile: other host's 8-token calls meanwhile, seconds (max)", round(max(seconds), 2))


async def _streams(target: str, count: int, first: asyncio.Event) -> list[grpc.StatusCode]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)

        async def one(i: int) -> grpc.StatusCode:
            request = llm_pb2.GenerateRequest(prompt=f"def g{i}():", max_new_tokens=64, min_new_tokens=64)
            try:
                messages = []
                async for message in stub.Generate(request, timeout=120):
                    messages.append(message)
                    first.set()
            except grpc.aio.AioRpcError as error:
                return error.code()
            assert messages[-1].generated_token_count == 64
            return grpc.StatusCode.OK

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    return status == health_pb2.HealthCheckResponse.SERVING


def _restarted(server: RunningServer, old: list[int]) -> bool:
    """A new engine process serves (and health says SERVING)."""
    new = children(server.process.pid)
    return bool(new) and not set(new) & set(old) and _serving(server.target)


def test_an_engine_killed_under_load_is_restarted_and_every_stream_ends_ok_or_internal():
    kills = size(1, 3)
    # A slow health watcher: a call right after the kill comes before the restart begins.
    args = ("--on-engine-failure", "restart", "--max-engine-restarts", str(kills), "--health-check-interval", "2",
            "--max-batch-size", "8", "--max-queue", "24")  # fmt: skip
    ends: list[grpc.StatusCode] = []
    back: list[float] = []
    with RunningServer(*args) as server:
        for _ in range(kills):

            async def attack() -> list[grpc.StatusCode]:
                first = asyncio.Event()
                streams = asyncio.ensure_future(_streams(server.target, 16, first))
                await asyncio.wait_for(first.wait(), 60)
                (engine_pid,) = children(server.process.pid)
                os.kill(engine_pid, signal.SIGKILL)
                return await asyncio.wait_for(streams, 120)  # never a hang

            old = children(server.process.pid)
            codes = asyncio.run(attack())
            killed = time.perf_counter()
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.INTERNAL}, set(codes)
            assert grpc.StatusCode.INTERNAL in codes  # the streams on the killed engine
            ends += codes
            # A call meanwhile is refused UNAVAILABLE, which a client may retry, never INTERNAL.
            with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as refused:
                list(llm_pb2_grpc.LLMServiceStub(channel).Generate(llm_pb2.GenerateRequest(prompt="x"), timeout=30))
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value
            assert "being loaded again" in refused.value.details()
            assert wait_until(lambda old=old: _restarted(server, old), timeout=60)
            back.append(time.perf_counter() - killed)
            assert asyncio.run(_streams(server.target, 2, asyncio.Event())) == [grpc.StatusCode.OK] * 2
        assert server.stop() == 0, server.stderr()
    record("hostile: engine kills under 16 streams, then served again", kills)
    ok, internal = ends.count(grpc.StatusCode.OK), ends.count(grpc.StatusCode.INTERNAL)
    record("hostile: streams OK / INTERNAL", f"{ok} / {internal}")
    record("hostile: seconds from the kill to SERVING (each)", [round(s, 1) for s in back])
