"""Request features against their baselines: n samples in one call, and scoring prompts.

- samples: n sampled completions of one long prompt in one call
  (`GenerateRequest.n`) against n separate concurrent calls of the same
  prompt with the same seeds (`sample_seed(seed, i)`: the same tokens), on
  one server (the console script's defaults: engine process, prefix cache
  on); each call's prompt is new to the server. Tokens/s over the round;
  target ≥ 1.2x at a long prompt.
- scoring: `--score-prompts` prompts of `--score-tokens` tokens scored over
  gRPC (`max_new_tokens=0`, `prompt_logprobs=0`, all at once) against one
  plain batched forward pass over the same ids in process (log_softmax,
  gathered at the next ids, and their ranks: the same numbers). Prompt
  tokens scored per second; target ≥ 0.8x.

Each side warms up the same way (one call of its own kind before the timed
part, every round) and keeps its best of `--repeat` interleaved rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from _common import Row, ServerProcess, interleaved, ratio, report
from _models import materialise, prompts

from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc
from entity_llm_server.engine.sampling import sample_seed


async def _generate(stub: Any, request: llm_pb2.GenerateRequest) -> tuple[int, float, int]:
    """(generated tokens, seconds to the first message, prompt entries) of one call."""
    start = time.perf_counter()
    first = 0.0
    tokens = entries = 0
    async for message in stub.Generate(request, timeout=600):
        first = first or time.perf_counter() - start
        tokens += message.generated_token_count
        entries += len(message.prompt_logprobs)
    return tokens, first, entries


async def _round(target: str, requests: list[llm_pb2.GenerateRequest], warm: llm_pb2.GenerateRequest) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        await _generate(stub, warm)
        start = time.perf_counter()
        results = await asyncio.gather(*(_generate(stub, r) for r in requests))
        return time.perf_counter() - start, results


def samples_sides(target: str, text: str, n: int, new_tokens: int) -> dict[str, Any]:
    # Every call's prompt is new to the server (a fresh mark at its start): the prefix cache holds
    # nothing of it, so each side prefills as often as it must. ignore_eos: every sample runs its length.
    sampling = {"temperature": 1.0, "top_k": 50, "max_new_tokens": new_tokens, "ignore_eos": True}
    warm = llm_pb2.GenerateRequest(prompt="warm up", max_new_tokens=4)
    marks = itertools.count()

    def one_call() -> Row:
        request = llm_pb2.GenerateRequest(prompt=f"[{next(marks)}] {text}", n=n, seed=7, **sampling)
        seconds, results = asyncio.run(_round(target, [request], warm))
        return Row("samples", f"n={n} in one call", n, sum(r[0] for r in results), seconds, [results[0][1] * 1000])

    def separate() -> Row:
        fresh = f"[{next(marks)}] {text}"
        requests = [llm_pb2.GenerateRequest(prompt=fresh, seed=sample_seed(7, i), **sampling) for i in range(n)]
        seconds, results = asyncio.run(_round(target, requests, warm))
        return Row(
            "samples", f"{n} separate calls", n, sum(r[0] for r in results), seconds, [r[1] * 1000 for r in results]
        )

    return {"n in one call": one_call, "separate calls": separate}


def scoring_sides(target: str, model: Any, batch: list[Any]) -> dict[str, Any]:
    import torch

    scored = sum(len(p.ids) - 1 for p in batch)
    warm = llm_pb2.GenerateRequest(prompt=batch[0].text, max_new_tokens=0, prompt_logprobs=0)

    def over_grpc() -> Row:
        requests = [llm_pb2.GenerateRequest(prompt=p.text, max_new_tokens=0, prompt_logprobs=0) for p in batch]
        seconds, results = asyncio.run(_round(target, requests, warm))
        assert sum(r[2] for r in results) == scored, "the server scored other tokens than the prompts' own"
        return Row("scoring", "grpc, max_new_tokens=0", len(batch), scored, seconds)

    def forward() -> Row:
        width = max(len(p.ids) for p in batch)
        ids = torch.tensor([p.ids + [p.ids[-1]] * (width - len(p.ids)) for p in batch], device=model.device)
        mask = torch.tensor([[1] * len(p.ids) + [0] * (width - len(p.ids)) for p in batch], device=model.device)
        with torch.inference_mode():
            model(ids[:1, :8])  # warm
            start = time.perf_counter()
            logprobs = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            picked = logprobs.gather(2, ids[:, 1:, None])
            ranks = (logprobs > picked).sum(-1) + 1
            (picked[..., 0] * mask[:, 1:]).sum().item(), ranks.sum().item()
            seconds = time.perf_counter() - start
        return Row("scoring", "batched forward, in process", len(batch), scored, seconds)

    return {"grpc scoring": over_grpc, "forward": forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="llama-35m", help="demo, or a shape of model_path.py")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="the samples' prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--score-prompts", type=int, default=32)
    parser.add_argument("--score-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=0,
        help="the server's tokens per step (0: its default, 256 on CPU); 2048, the GPU default, lets separate "
        "calls of one long prompt prefill side by side, as they do on a GPU",
    )
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows: list[Row] = []
    ratios: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = materialise(args.model, Path(scratch), "auto")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device).eval()
        (long_prompt,) = prompts(tokenizer, 1, args.prompt_tokens)
        batch = prompts(tokenizer, args.score_prompts, args.score_tokens)
        longest = max(args.prompt_tokens, args.score_tokens) + args.new_tokens + 16
        flags = ("--max-batch-size", str(max(args.n, args.score_prompts)), "--max-queue", "0")
        flags += ("--kv-cache-tokens", str(longest * max(args.n, args.score_prompts)))
        flags += ("--max-batch-tokens", str(args.max_batch_tokens))
        with ServerProcess("--model", str(folder), "--device", args.device, *flags) as server:
            sides = samples_sides(server.target, long_prompt.text, args.n, args.new_tokens)
            sides.update(scoring_sides(server.target, model, batch))
            best = interleaved(sides, args.repeat)
        rows = list(best.values())
        for row in rows:
            row.bench = args.model
        ratios.append(
            ratio(
                f"{args.model} n={args.n} in one call / {args.n} calls, {len(long_prompt.ids)}-token prompt",
                best["n in one call"],
                best["separate calls"],
                1.2,
            )
        )
        ratios.append(
            ratio(
                f"{args.model} scoring {args.score_prompts}x{args.score_tokens} over gRPC / batched forward",
                best["grpc scoring"],
                best["forward"],
                0.8,
            )
        )
    suffix = f"_{args.max_batch_tokens}_step_tokens" if args.max_batch_tokens else ""
    report(f"features_{args.device}{suffix}", rows, ratios, {"args": vars(args)})


if __name__ == "__main__":
    main()
