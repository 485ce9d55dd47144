"""The sides model_path.py compares: one round of each, warm-up included.

Every side gets the same treatment: its engine's own warm-up (the server did
it at start-up; an in-process manager does it in `warmup()`), then the same
warm-up request (the first prompt, `WARM_TOKENS` new tokens), then the timed
requests. Tokens are generated token ids, counted the same way on every side
(an end-of-sequence id counts, as the server's usage counts it; a message
without ids counts nothing).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from _common import Row, percentile

WARM_TOKENS = 8


class StepClock:
    """Each step of a continuous batching manager, timed on the host and on the device.

    Wraps the manager's `_generation_step` (what its loop calls once per step; a benchmark may lean
    on that private name: the wrapper fails loudly if it moves). Per step: its period (the host's
    wall time from one step's start to the next's: preparing, stepping, handing out results) and
    the device's time inside it. On CUDA the device time is CUDA events recorded on the manager's
    compute stream around the step (the kernels' own time, whatever the host does meanwhile);
    elsewhere the step runs synchronously and its wall time stands in for it. The host's share of
    a step is the rest of the period: time the device waits for the host.
    """

    def __init__(self, manager: Any) -> None:
        import torch

        self.manager = manager
        self.cuda = manager.model.device.type == "cuda"
        self.starts: list[float] = []
        self.walls: list[float] = []  # seconds, off CUDA
        self.events: list[tuple[Any, Any]] = []  # (begin, end), on CUDA
        step = manager._generation_step  # AttributeError if transformers renames it

        def timed() -> None:
            self.starts.append(time.perf_counter())
            if not self.cuda:
                step()
                self.walls.append(time.perf_counter() - self.starts[-1])
                return
            stream = getattr(manager.batch_processor.inputs_and_outputs, "compute_stream", None)
            stream = stream or torch.cuda.current_stream()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            step()
            end.record(stream)
            self.events.append((begin, end))

        manager._generation_step = timed

    def reset(self) -> None:
        """Forget the steps so far (the warm-up's)."""
        self.starts, self.walls, self.events = [], [], []

    def summary(self) -> dict[str, Any]:
        """Medians in ms over the steps since `reset`: period, device, host (period - device), and
        the device's busy share of the steps' total time."""
        if self.cuda:
            for _, end in self.events:
                end.synchronize()
            device = [begin.elapsed_time(end) for begin, end in self.events]
        else:
            device = [wall * 1000 for wall in self.walls]
        periods = [(b - a) * 1000 for a, b in zip(self.starts, self.starts[1:], strict=False)]
        device = device[: len(periods)]  # the last step has no next start
        host = [p - d for p, d in zip(periods, device, strict=True)]
        return {
            "steps": len(periods),
            "step_period_ms_p50": round(percentile(periods, 50), 3),
            "step_device_ms_p50": round(percentile(device, 50), 3),
            "step_host_ms_p50": round(percentile(host, 50), 3),
            "device_busy": round(sum(device) / sum(periods), 3) if periods else float("nan"),
            "device_clock": "cuda events" if self.cuda else "step wall time (no device clock)",
        }


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request: its text (what a gRPC client sends) and the ids the server makes of it."""

    text: str
    ids: list[int]


def cb_settings(streams: int, new_tokens: int, prompt_tokens: int) -> dict[str, int]:
    """The server's batching flags for `streams` concurrent requests (also used for the raw manager)."""
    return {
        "max_batch_size": max(streams, 1),
        "max_queue": 0,
        "kv_cache_tokens": streams * (new_tokens + prompt_tokens + 16),
    }


def cb_round(
    model: Any,
    tokenizer: Any,
    batch: list[Prompt],
    new_tokens: int,
    *,
    cuda_graphs: bool | None = None,
    sampling_hook: bool = False,
    attention: str = "sdpa",
    async_batching: bool = False,
    prefix_caching: bool = False,
) -> Row:
    """The requests straight through transformers' ContinuousBatchingManager, sized like the server
    (`attention="varlen"`: with the server's `--attention varlen` function, for this round only;
    `async_batching`: transformers' double-buffered loop, which prepares a step while the device
    runs the one before; CUDA only, and not with the server's sampling hook, whose graph-mode
    buffers serve one step at a time; `prefix_caching`: with block sharing, as a server with
    `--prefix-caching on`)."""
    from transformers import GenerationConfig

    from entity_llm_server.engine import BatchingEngine, BatchingSettings

    prompt_tokens = max(len(p.ids) for p in batch)
    # By default as the servers of the distinct-prompt workload: no prefix cache (`model_path.bench_model`).
    sizes = cb_settings(len(batch), new_tokens, prompt_tokens)
    settings = BatchingSettings(**sizes, cuda_graphs=cuda_graphs, prefix_caching=prefix_caching)
    sized = BatchingEngine(model, tokenizer, settings=settings)  # only to size the manager as the server does
    generation = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=sorted(sized.eos_ids),
        pad_token_id=tokenizer.pad_token_id,
    )
    original = model.config._attn_implementation
    if attention == "varlen":
        from entity_llm_server.engine import attention as varlen

        varlen.install(model)
    config = sized.batching.cb_config()
    config.use_async_batching = async_batching
    try:  # the model runs with the round's attention until its manager stops: the next side starts clean
        hook = sized.batching.sampling_hook() if sampling_hook else None
        row = _timed_cb(model, batch, new_tokens, generation, config, hook)
    finally:
        model.config._attn_implementation = original
    if sampling_hook:
        row.method = "cb + sampling hook"
    elif attention != "sdpa" or async_batching:
        row.method = f"cb, --attention {attention}" + (", async batching" if async_batching else "")
    elif cuda_graphs is not None:
        row.method = f"cb (cuda_graphs={cuda_graphs})"
    elif prefix_caching:
        row.method = "cb, prefix cache on"
    return row


def _timed_cb(
    model: Any,
    batch: list[Prompt],
    new_tokens: int,
    generation: Any,
    config: Any,
    hook: Any,
) -> Row:
    """`cb_round`'s manager, built from `config` (with `hook`, the server's sampling hook, when
    not None), warmed up, and timed over the batch."""
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
    if hook is not None:
        manager.logit_processor = hook
    manager.warmup()
    clock = StepClock(manager)
    manager.start()
    try:
        manager.add_request(batch[0].ids, request_id="warm", max_new_tokens=WARM_TOKENS)
        while (out := manager.get_result(timeout=600)) is None or not out.is_finished():
            pass
        clock.reset()
        first: dict[str, float] = {}
        counts: dict[str, int] = {}
        started = time.perf_counter()
        for i, prompt in enumerate(batch):
            manager.add_request(prompt.ids, request_id=f"r{i}", max_new_tokens=new_tokens, streaming=True)
        while len(counts) < len(batch):
            out = manager.get_result(timeout=600)
            assert out is not None
            assert out.error is None, out.error
            if out.generated_tokens:
                first.setdefault(out.request_id, time.perf_counter())
            if out.is_finished():
                counts[out.request_id] = len(out.generated_tokens)
        seconds = time.perf_counter() - started
    finally:
        manager.stop(block=True, timeout=60)
    ttft = [(t - started) * 1000 for t in first.values()]
    per_request = [counts[f"r{i}"] for i in range(len(batch))]
    extra = {"per_request_tokens": per_request, **clock.summary()}
    return Row("model", "cb (raw, in process)", len(batch), sum(per_request), seconds, ttft, extra)


def sequential_round(model: Any, batch: list[Prompt], new_tokens: int, limit: int = 0) -> Row:
    """One `generate` per request, one after another.

    With `limit`, only the first `limit` requests run. Each is the same work
    as one of the batch (the same prompt length and new tokens), and one at a
    time a request's speed does not depend on how many wait behind it, so its
    tokens/s compares with the other sides' (its TTFT does not: later requests
    wait for every earlier one).
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):  # type: ignore[misc]
        def __init__(self) -> None:
            self.calls = 0
            self.at: float | None = None

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2 and self.at is None:  # the first put is the prompt
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    def generate(prompt: Prompt, tokens: int, streamer: Any = None) -> int:
        ids = torch.tensor([prompt.ids], device=model.device)
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False, streamer=streamer
            )
        return int(out.shape[1] - ids.shape[1])  # one sequence: nothing is padded after its end

    generate(batch[0], WARM_TOKENS)
    measured = batch[:limit] if limit else batch
    ttft: list[float] = []
    per_request: list[int] = []
    started = time.perf_counter()
    for prompt in measured:
        streamer = FirstToken()
        per_request.append(generate(prompt, new_tokens, streamer))
        if streamer.at is not None:
            ttft.append((streamer.at - started) * 1000)
    seconds = time.perf_counter() - started
    extra = {"requests_run": len(measured), "per_request_tokens": per_request}
    return Row("model", "sequential generate", len(batch), sum(per_request), seconds, ttft, extra)


async def _check_prompts(target: str, batch: list[Prompt]) -> None:
    from entity_llm_client import AsyncLLMClient

    async with AsyncLLMClient(target, timeout=600) as client:
        for prompt in batch:
            served = list((await client.tokenize(prompt.text)).ids)
            if served != prompt.ids:
                raise SystemExit(f"the server tokenizes a prompt differently: {served} != {prompt.ids}")


def check_prompts(target: str, batch: list[Prompt]) -> None:
    """Exit unless the server makes of each prompt's text exactly the ids the in-process sides get."""
    asyncio.run(_check_prompts(target, batch))


async def _grpc_round(
    target: str, batch: list[Prompt], new_tokens: int, method: str, options: dict[str, Any] | None = None
) -> Row:
    from entity_llm_client import AsyncLLMClient

    async with AsyncLLMClient(target, timeout=3600) as client:
        async for _ in client.generate(batch[0].text, max_new_tokens=WARM_TOKENS):
            pass
        ttft: list[float] = []
        started = time.perf_counter()

        async def one(prompt: Prompt) -> int:
            count = 0
            async for chunk in client.generate(prompt.text, max_new_tokens=new_tokens, **(options or {})):
                if chunk.token_ids and not count:
                    ttft.append((time.perf_counter() - started) * 1000)
                count += len(chunk.token_ids)
                if chunk.usage is not None and chunk.usage.generated_tokens != count:
                    raise SystemExit(f"{method}: usage says {chunk.usage.generated_tokens} tokens, the ids {count}")
            return count

        per_request = await asyncio.gather(*(one(p) for p in batch))
        seconds = time.perf_counter() - started
    return Row("model", method, len(batch), sum(per_request), seconds, ttft, {"per_request_tokens": per_request})


def grpc_round(
    target: str, batch: list[Prompt], new_tokens: int, method: str, options: dict[str, Any] | None = None
) -> Row:
    """N concurrent `AsyncLLMClient` streams against a running server (each with `options`, SDK keywords)."""
    return asyncio.run(_grpc_round(target, batch, new_tokens, method, options))
