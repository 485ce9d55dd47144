"""The batching engine in its own process: same tokens, cancellation, admission, death, and the process's life."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entity_llm_client import LLMClient, LLMError
from entity_llm_server import EngineRequest, LLMService, UnifiedLLMResource, default_model_path
from entity_llm_server.engine import (
    BatchingEngine,
    BatchingSettings,
    EngineUnavailableError,
    Finished,
    Sampling,
    Scored,
)
from entity_llm_server.engine.ipc import Add
from entity_llm_server.engine.process import ProcessEngine
from entity_llm_server.resource import ModelLoadError

from ..conftest import alive, children, wait_until
from ..engines import assert_engine_failed, assert_refused_at_capacity, batching_engine
from .test_batching import PROMPTS

pytestmark = pytest.mark.model


def process_resource(max_batch_size: int = 8, max_queue: int = 8, max_new_tokens: int = 16, model=None):
    settings = BatchingSettings(max_batch_size=max_batch_size, max_queue=max_queue)
    return UnifiedLLMResource(model, default_max_new_tokens=max_new_tokens, batching=settings, engine_process=True)


async def _final(engine: BatchingEngine, request: EngineRequest) -> Finished:
    events = [event async for event in engine.generate(request)]
    assert sum(isinstance(e, Finished) for e in events) == 1
    assert isinstance(events[-1], Finished)
    return events[-1]


SAMPLED = Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=1234, logprobs=True, top_logprobs=2)


# The newer request features cross the pipe too: n samples, scoring, the samplers, stop tokens.
FEATURES = EngineRequest(
    "def main():\n    parser = argparse.ArgumentParser(description='Sum the numbers given.')\n    parser.add_argument(",
    max_new_tokens=8,
    n=3,
    sampling=Sampling(
        temperature=0.8,
        seed=99,
        min_p=0.05,
        presence_penalty=0.5,
        logit_bias=((13, 2.0),),
        stop_token_ids=(11,),
        prompt_logprobs=2,
        logprobs=True,
    ),
)


async def _serve_all(engine: BatchingEngine) -> tuple[list[Finished], Finished, list]:
    await engine.start()
    try:
        together = await asyncio.gather(*(_final(engine, EngineRequest(p, max_new_tokens=24)) for p in PROMPTS))
        sampled = await _final(engine, EngineRequest("def main():", max_new_tokens=12, sampling=SAMPLED))
        features = [event async for event in engine.generate(FEATURES)]
        return list(together), sampled, features
    finally:
        await engine.close()


def test_the_engine_process_streams_exactly_what_the_in_process_engine_does():
    resource = process_resource()
    remote = resource.load_engine()
    assert isinstance(remote, ProcessEngine)
    local = batching_engine()
    assert remote.info() == local.info()

    remote_greedy, remote_sampled, remote_features = asyncio.run(_serve_all(remote))
    local_greedy, local_sampled, local_features = asyncio.run(_serve_all(local))
    assert [f.token_ids for f in remote_greedy] == [f.token_ids for f in local_greedy]
    assert all(f.token_ids for f in remote_greedy)
    assert remote_sampled.token_ids == local_sampled.token_ids
    assert remote_sampled.seed == 1234
    assert len(remote_sampled.token_ids) == 12  # its logprobs are compared by value below
    assert remote.child.popen.returncode == 0  # close() stopped the engine process
    finals = [[e for e in events if isinstance(e, Finished)] for events in (remote_features, local_features)]
    assert [(f.index, f.token_ids, f.seed) for f in finals[0]] == [(f.index, f.token_ids, f.seed) for f in finals[1]]
    assert sorted(f.index for f in finals[0]) == [0, 1, 2]
    blocks = (finals[0][0].input_tokens - 1) // 16 * 16
    assert blocks > 0
    assert [f.cached_tokens for f in sorted(finals[0], key=lambda f: f.index)] == [0, blocks, blocks]  # one prefill
    scored = [[e for e in events if isinstance(e, Scored)] for events in (remote_features, local_features)]
    assert [len(s) for s in scored] == [1, 1]
    remote_prompt, local_prompt = scored[0][0].prompt_logprobs, scored[1][0].prompt_logprobs
    assert [(e.token_id, e.rank, [t for t, _ in e.top]) for e in remote_prompt] == [
        (e.token_id, e.rank, [t for t, _ in e.top]) for e in local_prompt
    ]
    assert [e.logprob for e in remote_prompt] == pytest.approx([e.logprob for e in local_prompt], abs=1e-5)


async def _collect_logprobs(engine: BatchingEngine) -> list[tuple[int, float, tuple[int, ...]]]:
    await engine.start()
    try:
        entries = []
        async for event in engine.generate(EngineRequest("import os\n", max_new_tokens=10, sampling=SAMPLED)):
            entries += [(e.token_id, e.logprob, tuple(t for t, _ in e.top)) for e in event_logprobs(event)]
        return entries
    finally:
        await engine.close()


def event_logprobs(event):
    return event.logprobs if not isinstance(event, Finished) else event.tail_logprobs


def test_logprobs_from_the_engine_process_equal_the_in_process_ones():
    remote = asyncio.run(_collect_logprobs(process_resource().load_engine()))
    local = asyncio.run(_collect_logprobs(batching_engine()))
    assert len(remote) == len(local) == 10
    assert [(t, top) for t, _, top in remote] == [(t, top) for t, _, top in local]
    assert [lp for _, lp, _ in remote] == pytest.approx([lp for _, lp, _ in local], abs=1e-5)


@pytest.fixture
def process_server(serve):
    """A ServerThread on a ProcessEngine sized for long requests; yields (server, engine)."""
    started = []

    def start(**sizes):
        resource = process_resource(**sizes)
        service = LLMService(resource)
        server = serve(service, health_check_interval=0.1).start()
        engine = server.call(service.engine(), timeout=120)
        started.append((server, engine))
        return server, engine

    yield start
    for server, engine in started:
        server.call(engine.close(), timeout=60)  # on the loop it runs on (its pipe's reader is there)
        assert not engine.child.alive


LONG = {"max_new_tokens": 500, "min_new_tokens": 500}  # no early EOS: only a cancel ends these soon


def test_over_capacity_is_refused_at_once_by_the_front_end(process_server):
    server, engine = process_server(max_batch_size=2, max_queue=1)
    with LLMClient(server.target, timeout=60) as client:
        streams = [client.generate(p, **LONG) for p in PROMPTS[:3]]
        for stream in streams[:2]:
            next(stream)
        waiter = threading.Thread(target=next, args=(streams[2],), daemon=True)
        waiter.start()
        assert wait_until(lambda: engine.core_state().held == 3, timeout=30)
        # Metrics read the load: two decode (the engine process says so with each step), one waits.
        assert wait_until(lambda: engine.occupancy() == (2, 1), timeout=30)
        assert_refused_at_capacity(client, engine)
        for stream in streams[:2]:
            stream.close()
        waiter.join(timeout=60)
        streams[2].close()
    assert wait_until(lambda: engine.in_flight == 0 and engine.core_state().held == 0, timeout=60)


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(reply.status)


def test_a_killed_engine_process_fails_every_stream_with_internal_and_health_says_so(process_server):
    server, engine = process_server(max_batch_size=4, max_queue=4)
    assert wait_until(lambda: _health(server.target) == health_pb2.HealthCheckResponse.SERVING, timeout=10)
    with LLMClient(server.target, timeout=60) as client:
        streams = [client.generate(p, **LONG) for p in PROMPTS[:4]]
        for stream in streams:
            next(stream)  # all four are streaming
        os.kill(engine.child.popen.pid, signal.SIGKILL)  # what the OOM killer does
        assert_engine_failed(client, streams, "the engine process was killed by SIGKILL")
    assert not engine.healthy
    assert wait_until(lambda: _health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)


def test_weights_that_do_not_load_in_the_engine_process_raise_a_clear_error(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(default_model_path(), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    resource = process_resource(model=broken)
    before = set(children(os.getpid()))
    with pytest.raises(ModelLoadError) as caught:
        resource.load_engine()
    assert str(broken) in str(caught.value)
    assert "deserializing header" in str(caught.value)
    # The engine process that failed to load is gone, not left behind.
    assert all(not alive(pid) for pid in set(children(os.getpid())) - before)


def test_a_missing_model_fails_before_an_engine_process_starts(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        process_resource(model=tmp_path / "nothing-here").load_engine()
    assert "nothing-here" in str(caught.value)


def test_a_request_the_manager_refuses_fails_alone_and_the_engine_serves_on():
    engine = process_resource().load_engine()
    assert isinstance(engine, ProcessEngine)

    async def main() -> tuple[tuple, Finished]:
        await engine.start()
        try:
            # What the front end never sends (its own checks come first): ids
            # the manager cannot take. Only that request may fail.
            refused: asyncio.Queue = asyncio.Queue()
            engine._queues["req-bad"] = refused
            engine.process._send(Add("req-bad", None, 4, Sampling()))
            answer = await asyncio.wait_for(refused.get(), 30)
            del engine._queues["req-bad"]
            after = await _final(engine, EngineRequest("import os\n", max_new_tokens=8))
            return answer, after
        finally:
            await engine.close()

    answer, after = asyncio.run(main())
    assert answer.ids == ()
    assert answer.finished
    assert "refused the request: TypeError" in answer.error
    assert after.generated_tokens == 8


def test_an_unreadable_message_from_the_engine_fails_streams_instead_of_losing_them(process_server):
    import pickle

    server, engine = process_server(max_batch_size=4, max_queue=4)
    with LLMClient(server.target, timeout=60) as client:
        stream = client.generate("import os\n", **LONG)
        next(stream)
        real_recv = engine.process._conn.recv

        def corrupt():
            engine.process._conn.recv = real_recv
            raise pickle.UnpicklingError("invalid load key")

        engine.process._conn.recv = corrupt  # the next message read on the event loop is garbage
        with pytest.raises(LLMError) as caught:
            list(stream)
        assert caught.value.code is grpc.StatusCode.INTERNAL
        assert "unreadable message" in caught.value.details
    assert wait_until(lambda: not engine.child.alive, timeout=10)  # a pipe out of step is not reused
    assert not engine.healthy


def test_closing_an_engine_that_was_never_started_stops_its_process():
    engine = process_resource().load_engine()
    assert isinstance(engine, ProcessEngine)
    assert engine.child.alive
    asyncio.run(engine.close())
    assert not engine.child.alive


def test_a_stopped_engine_process_is_unhealthy_and_refuses_requests_until_it_answers_again():
    engine = process_resource().load_engine()
    assert isinstance(engine, ProcessEngine)
    engine.process.liveness_interval, engine.process.liveness_timeout = 0.05, 2.0
    pid = engine.child.popen.pid

    async def main() -> tuple[bool, bool, bool, str, bool, Finished]:
        await engine.start()
        try:
            before = await asyncio.to_thread(wait_until, lambda: engine.healthy, 30)
            os.kill(pid, signal.SIGSTOP)  # alive, but answering nothing: what exit status alone never shows
            try:
                stopped = await asyncio.to_thread(wait_until, lambda: not engine.healthy, 10)
                stalled = engine.stalled  # unhealthy, yet not failed: it may come back
                # Refused at once (UNAVAILABLE): nothing more goes into a pipe nobody reads.
                with pytest.raises(EngineUnavailableError) as refused:
                    await _final(engine, EngineRequest("def f(x):", max_new_tokens=4))
            finally:
                os.kill(pid, signal.SIGCONT)
            again = await asyncio.to_thread(wait_until, lambda: engine.healthy, 10)
            request = EngineRequest("def f(x):", max_new_tokens=4, sampling=Sampling(min_new_tokens=4))
            final = await _final(engine, request)
            return before, stopped, stalled, str(refused.value), again, final
        finally:
            await engine.close()

    before, stopped, stalled, refused, again, final = asyncio.run(main())
    assert (before, stopped, stalled, again) == (True, True, True, True)
    assert "has not answered" in refused
    assert final.generated_tokens == 4
    assert not engine.child.alive


def test_closing_a_stopped_engine_process_kills_it_at_once():
    engine = process_resource().load_engine()
    assert isinstance(engine, ProcessEngine)
    engine.process.liveness_interval, engine.process.liveness_timeout = 0.05, 0.5

    graceful: list[str] = []
    stop = engine.child.stop
    engine.child.stop = lambda: (graceful.append("waited"), stop())  # what close() must not do here

    async def main() -> None:
        await engine.start()
        os.kill(engine.child.popen.pid, signal.SIGSTOP)
        assert await asyncio.to_thread(wait_until, lambda: engine.stalled, 10)
        await engine.close()  # a graceful stop would wait 45 s for a process that cannot answer

    asyncio.run(main())
    assert graceful == []
    assert engine.child.popen.returncode == -signal.SIGKILL


def test_a_full_pipe_to_a_stopped_engine_process_never_blocks_the_event_loop():
    # 100 prompts of 500 tokens are more than the pipe holds (~140 KB) while
    # the engine process reads nothing: sending them must not stop the loop.
    engine = process_resource(max_batch_size=8, max_queue=200).load_engine()
    assert isinstance(engine, ProcessEngine)
    engine.process.liveness_timeout = 600.0  # admitted all the same: this is about the sending
    pid = engine.child.popen.pid
    prompt = EngineRequest("x = 1\n" * 200, max_new_tokens=1, truncate_input_tokens=500)
    answered: list[bool] = []

    def probe(loop: asyncio.AbstractEventLoop) -> None:
        """Once every request is admitted and the pipe is full: does the loop still run coroutines?
        Then let the engine go on."""
        # The sender thread blocks on the full pipe, so later messages wait in its outbox.
        assert wait_until(lambda: engine.in_flight == 100 and engine.process._outbox.qsize() > 0, timeout=60)
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(timeout=5)
            answered.append(True)
        except TimeoutError:
            answered.append(False)
        os.kill(pid, signal.SIGCONT)

    async def main() -> list[Finished]:
        await engine.start()
        try:
            os.kill(pid, signal.SIGSTOP)
            prober = threading.Thread(target=probe, args=(asyncio.get_running_loop(),))
            prober.start()
            streams = [asyncio.ensure_future(_final(engine, prompt)) for _ in range(100)]
            await asyncio.to_thread(prober.join)
            return await asyncio.gather(*streams)
        finally:
            await engine.close()

    finals = asyncio.run(main())
    assert answered == [True]
    assert len(finals) == 100
    assert {f.input_tokens for f in finals} == {500}
