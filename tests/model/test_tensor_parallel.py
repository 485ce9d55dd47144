"""Tensor parallelism (`--tensor-parallel N`): one core as N ranks, here gloo processes on this machine."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entity_llm_server import EngineRequest, LLMService, UnifiedLLMResource, default_model_path, parse_config
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine import BatchingSettings, EngineError, Finished, Sampling
from entity_llm_server.engine.process import ProcessEngine
from entity_llm_server.resource import ModelLoadError

from ..conftest import alive, children, wait_until
from .test_batching import PROMPTS

pytestmark = pytest.mark.model

# Seeded samples: what every rank must draw alike (each rank runs the sampling hook).
SEEDS = (11, 12, 13, 14)


def tp_engine(tensor_parallel: int, replicas: int = 1, model: Path | None = None) -> ProcessEngine:
    settings = BatchingSettings(max_batch_size=8, max_queue=16)
    resource = UnifiedLLMResource(
        model,
        default_max_new_tokens=24,
        batching=settings,
        engine_process=True,
        engine_replicas=replicas,
        tensor_parallel=tensor_parallel,
    )
    engine = resource.load_engine()
    assert isinstance(engine, ProcessEngine)
    return engine


def environ(pid: int) -> dict[str, str]:
    """A process's environment at start, from Linux /proc."""
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)


Served = tuple[str, tuple[int, ...], list[float]]


async def _serve(engine: ProcessEngine) -> tuple[list[Served], list[int]]:
    """Greedy and seeded sampled requests, all at once, with logprobs; and each replica's decode steps."""
    await engine.start()
    try:

        async def one(request: EngineRequest) -> Served:
            text, logprobs = "", []
            async for event in engine.generate(request):
                if isinstance(event, Finished):
                    logprobs += [e.logprob for e in event.tail_logprobs]
                    return text, event.token_ids, logprobs
                text += event.text
                logprobs += [e.logprob for e in event.logprobs]
            raise AssertionError("no final event")

        greedy = [EngineRequest(p, sampling=Sampling(logprobs=True)) for p in PROMPTS]
        sampled = [
            EngineRequest("def main():", sampling=Sampling(temperature=0.9, top_p=0.95, seed=seed, logprobs=True))
            for seed in SEEDS
        ]
        # A hang guard: ranks that drew different tokens would wait for each other forever.
        served = await asyncio.wait_for(asyncio.gather(*(one(r) for r in greedy + sampled)), 120)
        steps = [(await asyncio.to_thread(core.state)).steps for core in engine.processes]
        return list(served), steps
    finally:
        await engine.close()


@pytest.fixture(scope="module")
def one_rank() -> list[Served]:
    served, _ = asyncio.run(_serve(tp_engine(1)))
    assert all(ids for _, ids, _ in served)
    return served


def _assert_same(served: list[Served], reference: list[Served]) -> None:
    assert [text for text, _, _ in served] == [text for text, _, _ in reference]
    assert [ids for _, ids, _ in served] == [ids for _, ids, _ in reference]
    for (_, _, logprobs), (_, ids, expected) in zip(served, reference, strict=True):
        assert len(logprobs) == len(expected) == len(ids)
        assert logprobs == pytest.approx(expected, abs=1e-4)


def test_two_replicas_of_two_ranks_stream_byte_for_byte_what_one_process_does(one_rank):
    # Tensor parallelism and its composition with replicas in one run: four
    # processes, two cores of two ranks, each core serving what one process does.
    engine = tp_engine(2, replicas=2)
    groups = engine.ranks
    assert [len(group) for group in groups] == [2, 2]
    envs = [[environ(rank.popen.pid) for rank in group] for group in groups]
    served, steps = asyncio.run(_serve(engine))
    _assert_same(served, one_rank)
    assert all(count > 0 for count in steps), steps  # both replicas decoded
    # Started the way torch.distributed expects, one rendezvous per group.
    for group in envs:
        assert [(e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"]) for e in group] == [("0", "2", "0"), ("1", "2", "1")]
        assert {e["MASTER_ADDR"] for e in group} == {"127.0.0.1"}
        assert group[0]["MASTER_PORT"] == group[1]["MASTER_PORT"]
    assert envs[0][0]["MASTER_PORT"] != envs[1][0]["MASTER_PORT"]
    assert [rank.popen.returncode for group in groups for rank in group] == [0, 0, 0, 0]  # close() stopped them


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service="entity.grpc.LLMService")
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def test_a_killed_rank_fails_every_stream_with_internal_within_seconds(serve):
    engine = tp_engine(2)
    server = serve(LLMService(engine=engine), health_check_interval=0.05).start()
    server.call(server.service.engine(), timeout=120)
    assert wait_until(lambda: _health(server.target) == health_pb2.HealthCheckResponse.SERVING, timeout=10)
    rank0, rank1 = engine.ranks[0]
    long = llm_pb2.GenerateRequest(prompt="def f(x):", max_new_tokens=400, min_new_tokens=400)

    async def main() -> tuple[list[tuple[grpc.StatusCode, str, int]], float]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            streaming = asyncio.Event()
            counts = [0] * 4

            async def one(i: int) -> tuple[grpc.StatusCode, str, int]:
                try:
                    async for message in stub.Generate(long, timeout=120):
                        counts[i] += len(message.token_ids)
                        if all(counts):
                            streaming.set()
                except grpc.aio.AioRpcError as error:
                    return error.code(), error.details() or "", counts[i]
                return grpc.StatusCode.OK, "", counts[i]

            streams = [asyncio.ensure_future(one(i)) for i in range(4)]
            await asyncio.wait_for(streaming.wait(), 60)
            os.kill(rank1.popen.pid, signal.SIGKILL)
            killed = time.monotonic()
            ends = await asyncio.gather(*streams)
            return ends, time.monotonic() - killed

    ends, took = asyncio.run(main())
    assert all(code is grpc.StatusCode.INTERNAL for code, _, _ in ends), ends
    assert all("tensor-parallel rank 1 was killed by SIGKILL" in details for _, details, _ in ends), ends
    assert all(0 < n < 400 for _, _, n in ends)  # they were mid-stream
    # The bound: within seconds, not after gloo's timeout (the watch
    # reads the rank's pipe closing; the bound is wide for a shared machine).
    assert took <= 10, took
    assert not engine.healthy
    assert wait_until(lambda: _health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
    # Rank 0 waited inside a collective for the dead rank: it is killed, not left holding memory.
    assert wait_until(lambda: not alive(rank0.popen.pid), timeout=10)
    server.call(engine.close(), timeout=60)


def test_a_rank_that_stops_answering_fails_the_core():
    engine = tp_engine(2)
    engine.process.liveness_interval, engine.process.liveness_timeout = 0.05, 1.0
    rank0, rank1 = engine.ranks[0]

    async def main() -> str:
        await engine.start()
        try:
            stream = engine.generate(
                EngineRequest("def f(x):", max_new_tokens=400, sampling=Sampling(min_new_tokens=400))
            )
            await stream.__anext__()
            os.kill(rank1.popen.pid, signal.SIGSTOP)  # alive, answering nothing: its exit status never comes
            with pytest.raises(EngineError) as failed:
                async for _ in stream:
                    pass
            return str(failed.value)
        finally:
            await engine.close()

    failure = asyncio.run(asyncio.wait_for(main(), 60))
    assert "tensor-parallel rank 1 has not answered for 1 s" in failure
    assert not engine.healthy
    assert not alive(rank0.popen.pid)
    assert not alive(rank1.popen.pid)


def test_a_model_whose_heads_do_not_divide_is_a_clear_start_up_error():
    before = set(children(os.getpid()))
    with pytest.raises(ModelLoadError) as caught:
        tp_engine(3)
    assert "4 attention heads (4 key-value heads) do not divide by 3" in str(caught.value)
    assert set(children(os.getpid())) == before  # refused before any rank started


def test_weights_that_do_not_load_on_a_rank_fail_the_start_and_leave_no_rank_behind(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(default_model_path(), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    before = set(children(os.getpid()))
    with pytest.raises(ModelLoadError) as caught:
        tp_engine(2, model=broken)
    assert str(broken) in str(caught.value)
    assert all(not alive(pid) for pid in set(children(os.getpid())) - before)


def test_tensor_parallelism_needs_engine_processes_and_a_device_per_rank():
    with pytest.raises(ValueError, match="tensor-parallel ranks run in engine processes"):
        UnifiedLLMResource(tensor_parallel=2)
    for argv in (
        ["--tensor-parallel", "2", "--engine-process", "off"],
        ["--tensor-parallel", "2", "--engine", "sequential"],
        ["--tensor-parallel", "2", "--device", "cuda:0"],
        ["--tensor-parallel", "2", "--engine-replicas", "2", "--device", "cuda:0,cuda:1"],
        ["--tensor-parallel", "0"],
    ):
        with pytest.raises(SystemExit):
            parse_config(argv)
    config = parse_config(
        ["--tensor-parallel", "2", "--engine-replicas", "2", "--device", "cuda:0,cuda:1,cuda:2,cuda:3"]
    )
    assert (config.tensor_parallel, config.engine_replicas) == (2, 2)
    assert parse_config([], env={"ENTITY_LLM_TENSOR_PARALLEL": "2"}).tensor_parallel == 2
