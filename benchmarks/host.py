"""The host's work around the model: what the cuts of the batching loop's host work buy.

The same `--streams` requests (every `--sampled-every`-th one sampled with top_p 0.95, the rest
greedy, as a mixed service's traffic is) run through the real engine in process (front end,
batching core, the sampling hook) in interleaved rounds, two ways:

- before: every row of a step that has a sampled row is sorted for top-k/top-p and filtered for
  min-p/typical-p (the hook before the cut), and nothing start-up made is frozen;
- after: only the rows that use them are sorted and filtered (`rows.filtering`), and what start-up
  made is out of the collector's reach (`engine.core.settle`: gc.freeze), as the server runs;

- the sampled rows' Gumbel noise: drawn for every row and masked (before), or for the sampled
  rows only (after);
- each request's arguments: worked out for every row at every step (before: the hook's memo of
  admitted requests cleared before each step), or once, when the request first has a row (after);
- graph mode's seen mask (repetition penalties): every penalised row cleared and refilled with
  its whole sequence every step (before), or only the tokens that came since (after).

Reported: tokens/s of each (target: after >= before, the cuts cost nothing), the collector's time
in each run (gc.callbacks), the hook's per-step work alone (`rows.warp`, then `rows.noisy`) on
a step's [streams, vocab] logits, before and after, and the hook's preparation of a step alone
(`prepare_tensor_args` on `--streams` requests of the manager's own request states), eager and
graph mode, and graph mode with every request penalised, before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import Row, interleaved, ratio, report
from _models import materialise, prompts


class CollectorClock:
    """Seconds the cyclic garbage collector ran while enabled, and its full collections."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._started = 0.0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.full += info["generation"] == 2

    def reset(self) -> None:
        self.seconds, self.full = 0.0, 0


def preparation(streams: int, vocab: int, sampling: Callable[[int], Any], calls: int = 200) -> dict[str, Row]:
    """The sampling hook's preparation of one step of `streams` decoding requests (each a token longer
    every step, as decoding makes them), timed `calls` times: in eager and graph mode with
    `sampling`, and in graph mode with every request penalised (`repetition_penalty`, whose tokens
    graph mode keeps in a static mask); before, the hook's memos (requests admitted, the mask's
    rows' owners) are cleared before every step, after, they are kept."""
    import torch
    from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState

    from entity_llm_server.engine import Sampling
    from entity_llm_server.engine.cb_sampling import SamplingProcessors

    def penalised(i: int) -> Any:
        return Sampling(repetition_penalty=1.2)

    timed: dict[str, Row] = {}
    for mode, eager, of in (
        ("eager", True, sampling),
        ("graph mode", False, sampling),
        ("penalised", False, penalised),
    ):
        hook = SamplingProcessors(vocab, frozenset({0}), "cpu", eager=eager, rows=streams)
        for side, forget in (("before", True), ("after", False)):
            states = []
            for i in range(streams):
                state = RequestState(f"r{i}", list(range(64)), logit_processor_kwargs={"sampling": of(i)})
                state.position_offset, state.generated_tokens = 64 + i, list(range(i))
                states.append(FutureRequestState(state, True, {}, 1))
            storage = torch.zeros((hook.tensors_required, streams), dtype=torch.int32)
            hook.prepare_tensor_args(states, storage)  # warm
            started = time.perf_counter()
            for call in range(calls):
                for future in states:
                    future.state.generated_tokens.append(100 + call)
                    future.state.position_offset += 1
                if forget:
                    hook._admitted.clear()
                    hook._seen_owners.clear()
                hook.prepare_tensor_args(states, storage)
            name = f"prepare, {mode}, {side}"
            timed[name] = Row("hook", name, streams, calls, time.perf_counter() - started, [], {})
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-35m", help="demo, or a model_path.py shape")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sampled-every", type=int, default=4, help="every Nth request samples (top_p 0.95)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from entity_llm_server import EngineRequest, UnifiedLLMResource
    from entity_llm_server.engine import BatchingSettings, Finished, Sampling
    from entity_llm_server.engine import rows as r
    from entity_llm_server.engine.cb_sampling import SamplingProcessors
    from entity_llm_server.engine.core import settle

    clock = CollectorClock()
    shipped = r.filtering

    def every_row(samplings: list[Sampling]) -> tuple[bool, bool]:  # the hook before the cut
        sort, filters = shipped(samplings)
        return bool(sort), bool(filters)

    shipped_noise = r.noisy

    def every_row_noise(logprobs: Any, rows: Any, sampled: Any = True) -> Any:  # the hook before the cut
        return shipped_noise(logprobs, rows, True)

    with tempfile.TemporaryDirectory() as scratch:
        folder = materialise(args.model, Path(scratch), "auto")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        batch = prompts(tokenizer, args.streams, args.prompt_tokens)
        settings = BatchingSettings(
            max_batch_size=args.streams, max_queue=0, kv_cache_tokens=args.streams * 256, prefix_caching=False
        )
        engine = UnifiedLLMResource(str(folder), engine="batching", batching=settings).load_engine()
        vocab = int(engine.core.model.config.vocab_size)

        def sampling(i: int) -> Sampling:
            if i % args.sampled_every == 0:
                return Sampling(temperature=0.8, top_p=0.95, seed=i)
            return Sampling()

        requests = [
            EngineRequest("", prompt_token_ids=tuple(p.ids), max_new_tokens=args.new_tokens, sampling=sampling(i))
            for i, p in enumerate(batch)
        ]

        async def one(request: EngineRequest) -> int:
            final = [event async for event in engine.generate(request)][-1]
            assert isinstance(final, Finished)
            return final.generated_tokens

        async def every() -> list[int]:
            return list(await asyncio.gather(*(one(q) for q in requests)))

        shipped_prepare = SamplingProcessors.prepare_tensor_args

        def forgetting(self: Any, *a: Any, **k: Any) -> Any:  # the hook before the cut: nobody admitted before
            self._admitted.clear()
            return shipped_prepare(self, *a, **k)

        def rounds(loop: asyncio.AbstractEventLoop) -> dict[str, Callable[[], Row]]:
            def run(name: str, filtering: Any, noisy: Any, after: bool) -> Row:
                r.filtering, r.noisy = filtering, noisy
                SamplingProcessors.prepare_tensor_args = shipped_prepare if after else forgetting  # type: ignore[method-assign]
                gc.unfreeze()
                if after:
                    settle()
                loop.run_until_complete(one(requests[0]))  # warm, as every round
                clock.reset()
                started = time.perf_counter()
                tokens = loop.run_until_complete(every())
                seconds = time.perf_counter() - started
                extra = {"gc_seconds": round(clock.seconds, 4), "gc_full_collections": clock.full}
                return Row(args.model, name, args.streams, sum(tokens), seconds, [], extra)

            return {
                "before": lambda: run("hook: every row, every step; nothing frozen", every_row, every_row_noise, False),
                "after": lambda: run("hook: the rows that use it, admitted once; frozen", shipped, shipped_noise, True),
            }

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(engine.start())
            best = interleaved(rounds(loop), args.repeat)
            loop.run_until_complete(engine.close())
        finally:
            r.filtering, r.noisy = shipped, shipped_noise
            SamplingProcessors.prepare_tensor_args = shipped_prepare  # type: ignore[method-assign]
            loop.close()
        timed = {**preparation(args.streams, vocab, sampling)}

        # warp alone: one step's logits, as before the cut (every row, for a filter any row uses) and after.
        samplings = [sampling(i) for i in range(args.streams)]
        rows = r.rows_for([r.row_values(x, 0, vocab) for x in samplings], [None] * args.streams, vocab, "cpu")
        logits, eos = torch.randn(args.streams, vocab), r.eos_mask(frozenset(), vocab, "cpu")
        sort, filters = shipped(samplings)
        drawn = [i for i, x in enumerate(samplings) if x.sampled]
        sides: dict[str, tuple[r.Selection, r.Selection, r.Selection]] = {
            "hook step, before": (*every_row(samplings), True),
            "hook step, after": (sort, filters, drawn),
        }
        for name, (s, f, d) in sides.items():
            started, calls = time.perf_counter(), 50
            for _ in range(calls + 1):
                if _ == 1:  # the first call warms up
                    started = time.perf_counter()
                shipped_noise(r.warp(logits, rows, eos, sort=s, filters=f), rows, d)
            timed[name] = Row(args.model, name, args.streams, calls, time.perf_counter() - started, [], {})

    rows_out = [*best.values(), *timed.values()]
    ratios: list[dict[str, Any]] = []
    for mode in ("eager", "graph mode", "penalised"):
        ratios.append(
            ratio(
                f"{args.model} the hook's preparation of a step ({mode}), before / after at {args.streams}",
                timed[f"prepare, {mode}, after"],
                timed[f"prepare, {mode}, before"],
            )
        )
    before, after = best["before"], best["after"]
    ratios += [
        ratio(f"{args.model} engine in process, host cuts after / before at {args.streams}", after, before, 1.0),
        # Steps per second: the time before over the time after.
        ratio(
            f"{args.model} the hook's work per step (warp, noise), before / after at {args.streams}",
            timed["hook step, after"],
            timed["hook step, before"],
        ),
        {
            "name": f"{args.model} collector seconds, before / after",
            "value": before.extra["gc_seconds"] / max(after.extra["gc_seconds"], 1e-9),
            "target": 0.0,
        },
    ]
    for row in best.values():
        print(f"{row.method}: the collector ran {row.extra['gc_seconds']} s ({row.extra['gc_full_collections']} full)")
    report("host" if args.model == "llama-35m" else f"host_{args.model}", rows_out, ratios, {"args": vars(args)})


if __name__ == "__main__":
    main()
