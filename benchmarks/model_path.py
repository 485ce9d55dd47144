"""The model path: gRPC streams vs raw continuous batching vs sequential generate.

For each model and each concurrency N, the same N greedy requests (prompts of
`--prompt-tokens` tokens, `--new-tokens` new tokens each) are served three ways:

- grpc: N concurrent `AsyncLLMClient` streams against `python -m
  entity_llm_server` (continuous batching; its model in an engine process of
  its own, the default) in another process; `--compare-in-process` adds the
  same server with `--engine-process off`;
- cb: the same requests through transformers' continuous batching in process,
  sized like the server (the ceiling the server should approach);
- sequential: one `model.generate` per request, one after another (what a
  server without batching does).

Aggregate tokens/s and time to first token (TTFT, from submission) p50/p99.

    python benchmarks/model_path.py                       # CPU: demo + 35M random Llama
    python benchmarks/model_path.py --device cuda --models qwen2-0.5b --dtype bfloat16 --streams 1,64 \
        --new-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import Row, ServerProcess, ratio, report

SHAPES: dict[str, dict[str, Any]] = {
    # ~34M parameters: the 30-40M random-weight Llama.
    "llama-35m": {
        "kind": "llama",
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 1376,
        "vocab_size": 16000,
    },
    # Qwen2-0.5B's shape, random weights.
    "qwen2-0.5b": {
        "kind": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
    },
}


def materialise(name: str, folder: Path, dtype: str) -> Path:
    """A model folder for `name`: the demo model itself, or random weights + the demo tokenizer."""
    from entity_llm_server import default_model_path

    if name == "demo":
        return default_model_path()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(SHAPES[name])
    kind = shape.pop("kind")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    # Random weights pick ids across the whole vocabulary: pad the demo's
    # 4,096-token tokenizer to it, so every id decodes to text (as with a real
    # model) and streams carry a message per token rather than only at the end.
    tokenizer.add_tokens([f"<r{i}>" for i in range(shape["vocab_size"] - len(tokenizer))])
    common = {
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    if kind == "llama":
        model: Any = LlamaForCausalLM(LlamaConfig(**shape, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape, **common))
    if dtype != "auto":
        model = model.to(getattr(torch, dtype))
    target = folder / name
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    params = sum(p.numel() for p in model.parameters())
    print(f"# {name}: {params / 1e6:.1f}M parameters (random weights)")
    return target


def prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """`count` distinct prompts of exactly `length` tokens, cut from the demo's own vocabulary."""
    text = Path(__file__).read_text() * 4
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i * 7 : i * 7 + length] for i in range(count)]


def cb_settings(streams: int, new_tokens: int, prompt_tokens: int) -> dict[str, int]:
    return {
        "max_batch_size": max(streams, 1),
        "max_queue": 0,
        "kv_cache_tokens": streams * (new_tokens + prompt_tokens + 16),
    }


def run_cb(
    model: Any,
    tokenizer: Any,
    batch: list[list[int]],
    new_tokens: int,
    prompt_tokens: int,
    cuda_graphs: bool | None = None,
    sampling_processors: bool = False,
) -> Row:
    """The same requests straight through transformers' ContinuousBatchingManager."""
    from transformers import GenerationConfig

    from entity_llm_server.engine import BatchingEngine, BatchingSettings

    settings = BatchingSettings(**cb_settings(len(batch), new_tokens, prompt_tokens), cuda_graphs=cuda_graphs)
    sized = BatchingEngine(model, tokenizer, settings=settings)  # only to size the manager identically
    generation = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=sorted(sized.eos_ids))
    manager = model.init_continuous_batching(
        generation_config=generation, continuous_batching_config=sized._cb_config()
    )
    if sampling_processors:  # what the server installs: per-request sampling in the logits hook
        from entity_llm_server.engine.cb_sampling import SamplingProcessors

        manager.logit_processor = SamplingProcessors(
            int(model.config.vocab_size), sized.eos_ids, model.device, eager=not sized.cuda_graphs
        )
    manager.warmup()
    manager.start()
    try:
        manager.add_request(batch[0][:8], request_id="warm", max_new_tokens=4)
        while (out := manager.get_result(timeout=60)) is None or not out.is_finished():
            pass
        first: dict[str, float] = {}
        counts: dict[str, int] = {}
        started = time.perf_counter()
        for i, prompt in enumerate(batch):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=new_tokens, streaming=True)
        while len(counts) < len(batch):
            out = manager.get_result(timeout=600)
            assert out is not None
            assert out.error is None, out.error
            first.setdefault(out.request_id, time.perf_counter())
            if out.is_finished():
                counts[out.request_id] = len(out.generated_tokens)
        seconds = time.perf_counter() - started
    finally:
        manager.stop(block=True, timeout=60)
    ttft = [(t - started) * 1000 for t in first.values()]
    per_request = [counts[f"r{i}"] for i in range(len(batch))]
    return Row(
        "model",
        ("cb + sampling hook" if sampling_processors else "cb (raw, in process)")
        if cuda_graphs is None
        else f"cb (cuda_graphs={cuda_graphs})",
        len(batch),
        sum(per_request),
        seconds,
        ttft,
        {"per_request_tokens": per_request},
    )


def run_sequential(model: Any, batch: list[list[int]], new_tokens: int, limit: int = 0) -> Row:
    """One `generate` per request, one after another.

    With `limit`, only the first `limit` requests are run: one-at-a-time
    throughput does not depend on how many wait behind, so the tokens/s stands
    for the whole batch, while TTFT is reported for the requests that ran.
    """
    import torch

    measured = batch[:limit] if limit else batch
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

    ttft: list[float] = []
    total = 0
    started = time.perf_counter()
    for prompt in measured:
        ids = torch.tensor([prompt], device=model.device)
        streamer = FirstToken()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, streamer=streamer
            )
        total += out.shape[1] - ids.shape[1]
        if streamer.at is not None:
            ttft.append((streamer.at - started) * 1000)
    extra = {"requests_run": len(measured)}
    return Row("model", "sequential generate", len(batch), total, time.perf_counter() - started, ttft, extra)


async def run_grpc(target: str, tokenizer: Any, batch: list[list[int]], new_tokens: int, expected: int) -> Row:
    from entity_llm_client import AsyncLLMClient

    text = [tokenizer.decode(p) for p in batch]
    async with AsyncLLMClient(target, timeout=3600) as client:
        async for _ in client.generate("warm up"):
            pass
        ttft: list[float] = []
        generated: list[int] = []
        started = time.perf_counter()

        async def one(prompt: str) -> None:
            first = True
            async for chunk in client.generate(prompt):
                if first:
                    ttft.append((time.perf_counter() - started) * 1000)
                    first = False
                if chunk.usage is not None:
                    generated.append(chunk.usage.generated_tokens)

        await asyncio.gather(*(one(p) for p in text))
    seconds = time.perf_counter() - started
    # The server encodes the prompt text with the tokenizer's start token, so
    # its streams may end at an EOS elsewhere than the cb run's: count its own.
    extra = {"cb_tokens": expected}
    return Row("model", "grpc (engine process)", len(batch), sum(generated), seconds, ttft, extra)


def best(runs: list[Row]) -> Row:
    """The fastest of repeated runs, with every run's tokens/s kept in its extra."""
    top = max(runs, key=lambda row: row.tokens_per_s)
    top.extra["runs_tokens_per_s"] = [round(row.tokens_per_s, 1) for row in runs]
    return top


def bench_model(name: str, args: argparse.Namespace, scratch: Path) -> tuple[list[Row], list[dict[str, Any]]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = materialise(name, scratch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch_dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(args.device).eval()
    rows: list[Row] = []
    ratios: list[dict[str, Any]] = []
    for streams in (int(s) for s in args.streams.split(",")):
        batch = prompts(tokenizer, streams, args.prompt_tokens)
        flags = [
            f"--{k.replace('_', '-')}={v}" for k, v in cb_settings(streams, args.new_tokens, args.prompt_tokens).items()
        ]
        server_args = ("--model", str(folder), "--device", args.device, "--dtype", args.dtype)
        server_args += ("--max-new-tokens", str(args.new_tokens), *flags)
        # The machine is shared: the compared runs alternate, round after
        # round against the same servers, and each keeps its best of --repeat.
        modes = ("on", "off") if args.compare_in_process else ("on",)
        runs: dict[str, list[Row]] = {"cb": [], "on": [], "off": []}
        with contextlib.ExitStack() as stack:
            servers = {m: stack.enter_context(ServerProcess(*server_args, "--engine-process", m)) for m in modes}
            for _ in range(args.repeat):
                runs["cb"].append(run_cb(model, tokenizer, batch, args.new_tokens, args.prompt_tokens))
                for mode, server in servers.items():
                    row = asyncio.run(run_grpc(server.target, tokenizer, batch, args.new_tokens, runs["cb"][-1].tokens))
                    row.extra["server_startup_s"] = round(server.startup_s, 2)
                    if mode == "off":
                        row.method = "grpc, engine in process"
                    runs[mode].append(row)
        cb, grpc_row = best(runs["cb"]), best(runs["on"])
        seq = run_sequential(model, batch, args.new_tokens, args.sequential_limit)
        extra_rows = []
        if args.compare_no_graphs and args.device.startswith("cuda"):
            plain = run_cb(model, tokenizer, batch, args.new_tokens, args.prompt_tokens, cuda_graphs=False)
            extra_rows.append(plain)
            ratios.append(ratio(f"{name} cb with / without CUDA graphs at {streams}", cb, plain))
        if args.compare_in_process:
            one = best(runs["off"])
            extra_rows.append(one)
            ratios.append(ratio(f"{name} grpc engine process / in process at {streams}", grpc_row, one))
        if args.compare_sampling:
            hooked = run_cb(model, tokenizer, batch, args.new_tokens, args.prompt_tokens, sampling_processors=True)
            extra_rows.append(hooked)
            ratios.append(ratio(f"{name} cb with / without the sampling hook at {streams}", hooked, cb))
        for row in (grpc_row, cb, seq, *extra_rows):
            row.bench = name
        rows += [grpc_row, cb, seq, *extra_rows]
        # The targets are set at 32 streams; below that the ratios are reported only.
        big = streams >= 32
        ratios.append(ratio(f"{name} grpc / cb at {streams}", grpc_row, cb, 0.9 if big else 0.0))
        ratios.append(ratio(f"{name} grpc / sequential at {streams}", grpc_row, seq, 8.0 if big else 0.0))
        # The ceiling of the line above: raw continuous batching itself over sequential.
        ratios.append(ratio(f"{name} cb / sequential at {streams}", cb, seq))
    return rows, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, float16, bfloat16")
    parser.add_argument("--models", default="demo,llama-35m", help=f"demo, {', '.join(SHAPES)}")
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--sequential-limit",
        type=int,
        default=0,
        help="run at most this many requests sequentially (0: all); tokens/s does not depend on the count",
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="rounds of cb and grpc runs, alternating; the best of each is kept"
    )
    parser.add_argument("--compare-no-graphs", action="store_true", help="on CUDA, also run raw CB without CUDA graphs")
    parser.add_argument(
        "--compare-in-process",
        action="store_true",
        help="also serve with --engine-process off (the model in the gRPC server's own process)",
    )
    parser.add_argument(
        "--compare-sampling", action="store_true", help="also run raw CB with the server's sampling hook installed"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    ratios: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            model_rows, model_ratios = bench_model(name, args, Path(scratch))
            rows += model_rows
            ratios += model_ratios
    report(f"model_path_{args.device}", rows, ratios, {"args": vars(args)})


if __name__ == "__main__":
    main()
