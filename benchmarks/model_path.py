"""The model path: gRPC streams vs raw continuous batching vs sequential generate.

For each model and each concurrency N, the same N greedy requests (the same
token ids: prompts of `--prompt-tokens` tokens, `--new-tokens` new tokens
each) are served these ways:

- grpc: N concurrent `AsyncLLMClient` streams against `python -m
  entity_llm_server` (continuous batching; its model in an engine process of
  its own, the default) in another process; `--compare-in-process` adds the
  same server with `--engine-process off`;
- cb: the same requests through transformers' continuous batching in process,
  sized like the server (the ceiling the server should approach);
  `--compare-sampling` adds it with the server's sampling hook installed,
  `--compare-no-graphs` without CUDA graphs, `--compare-attention` with
  `--attention varlen` (no mask over the batch), and a server with it;
- grpc constrained (`--compare-constrained`): the same streams, each under
  one JSON schema (a string too long to end within the run, so that each
  does the same work): the cost of structured output's per-step masks;
- sequential: one `model.generate` per request, one after another (what a
  server without batching does); `--sequential-limit` runs only the first
  requests, and its tokens/s still compares (see `_sides.sequential_round`).

These prompts are distinct and the same every round, so the servers run
with `--prefix-caching off` (and raw CB without block sharing): a server's
prefix cache would otherwise serve each round the prompts of the round
before, which no workload of distinct prompts has. `--shared-prefix N`
measures the cache instead: every prompt begins with the same N tokens (a
system prompt) and ends with `--prompt-tokens` of its own, fresh each round;
two servers, `--prefix-caching on` and `off`, stream them, and the ratios are
tokens/s and TTFT p50 of on against off.

Every side warms up the same way and runs once per round, the rounds
interleaved; each side keeps its best of `--repeat` rounds. Aggregate
tokens/s (generated token ids) and time to first token (TTFT, from
submission) p50/p99. The commands behind its tables are in
benchmarks/README.md: `nox -s bench` (CPU) and `benchmarks/device_run.sh` (GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import Row, ServerProcess, interleaved, percentile, ratio, report, write_results
from _models import SHAPES, materialise, prompts, shared_prompts
from _sides import Prompt, cb_round, cb_settings, check_prompts, grpc_round, sequential_round

# Structured output that cannot end within the run (a string of at least 4,000 characters): every
# request runs its full length under the mask, the same work as the unconstrained side.
OPEN_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 4000}},
    "required": ["text"],
    "additionalProperties": False,
}


def bench_model(name: str, args: argparse.Namespace, scratch: Path) -> Iterator[tuple[list[Row], list[dict[str, Any]]]]:
    """The rows and ratios of each concurrency in turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = materialise(name, scratch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch_dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(args.device).eval()
    for streams in (int(s) for s in args.streams.split(",")):
        batch = prompts(tokenizer, streams, args.prompt_tokens)
        sizes = cb_settings(streams, args.new_tokens, max(len(p.ids) for p in batch))
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
        server_args = ("--model", str(folder), "--device", args.device, "--dtype", args.dtype)
        server_args += ("--max-new-tokens", str(args.new_tokens), *flags, "--prefix-caching", "off")
        modes = {"grpc": ("--engine-process", "on")}
        if args.compare_in_process:
            modes["grpc in process"] = ("--engine-process", "off")
        if args.compare_attention:
            modes["grpc varlen"] = ("--attention", "varlen")
        with contextlib.ExitStack() as stack:
            servers = {side: stack.enter_context(ServerProcess(*server_args, *mode)) for side, mode in modes.items()}
            sides = sides_for(model, tokenizer, batch, args, servers)
            best = interleaved(sides, args.repeat)
        for side, server in servers.items():
            best[side].extra["server_startup_s"] = round(server.startup_s, 2)
        for row in best.values():
            row.bench = name
            if "steps" in row.extra:  # raw CB's steps: the device's time against the host's
                e = row.extra
                print(
                    f"{name} {row.method} at {streams}: {e['steps']} steps, p50 {e['step_period_ms_p50']} ms a step:"
                    f" device {e['step_device_ms_p50']} ms, host {e['step_host_ms_p50']} ms;"
                    f" device busy {e['device_busy']:.0%} of the time ({e['device_clock']})"
                )
        ratios: list[dict[str, Any]] = []
        grpc_row, cb, seq = best["grpc"], best["cb"], best["sequential"]
        # The targets are set at 32 streams; below that the ratios are reported only.
        big = streams >= 32
        ratios.append(ratio(f"{name} grpc / cb at {streams}", grpc_row, cb, 0.9 if big else 0.0))
        ratios.append(ratio(f"{name} grpc / sequential at {streams}", grpc_row, seq, 8.0 if big else 0.0))
        # The ceiling of the line above: raw continuous batching itself over sequential.
        ratios.append(ratio(f"{name} cb / sequential at {streams}", cb, seq))
        if "grpc in process" in best:
            ratios.append(
                ratio(f"{name} grpc engine process / in process at {streams}", grpc_row, best["grpc in process"])
            )
        if "cb + hook" in best:
            ratios.append(ratio(f"{name} cb with / without the sampling hook at {streams}", best["cb + hook"], cb))
            ratios.append(ratio(f"{name} grpc / cb + sampling hook at {streams}", grpc_row, best["cb + hook"]))
        if "grpc constrained" in best:
            ratios.append(
                ratio(
                    f"{name} grpc constrained / unconstrained at {streams}",
                    best["grpc constrained"],
                    grpc_row,
                    0.8 if big else 0.0,
                )
            )
        if "cb varlen" in best:
            ratios.append(ratio(f"{name} cb varlen / sdpa attention at {streams}", best["cb varlen"], cb))
            ratios.append(ratio(f"{name} grpc varlen / cb varlen at {streams}", best["grpc varlen"], best["cb varlen"]))
        if "cb async" in best:
            ratios.append(ratio(f"{name} cb async / sync batching at {streams}", best["cb async"], cb))
        if "cb varlen async" in best:
            ratios.append(ratio(f"{name} cb varlen async / cb sdpa sync at {streams}", best["cb varlen async"], cb))
        if "cb no graphs" in best:
            ratios.append(ratio(f"{name} cb with / without CUDA graphs at {streams}", cb, best["cb no graphs"]))
        yield list(best.values()), ratios


def bench_shared_prefix(name: str, args: argparse.Namespace, scratch: Path) -> Iterator[tuple[list[Row], Any]]:
    """The prefix cache on and off, at each concurrency, on prompts that share a system prompt: through
    the server and through raw continuous batching in process, so the server's ratio has
    transformers' own beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = materialise(name, scratch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch_dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(args.device).eval()
    for streams in (int(s) for s in args.streams.split(",")):
        longest = max(len(p.ids) for p in shared_prompts(tokenizer, streams, args.shared_prefix, args.prompt_tokens, 0))
        sizes = cb_settings(streams, args.new_tokens, longest + 16)
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
        server_args = ("--model", str(folder), "--device", args.device, "--dtype", args.dtype)
        server_args += ("--max-new-tokens", str(args.new_tokens), *flags)
        salts = itertools.count()
        with contextlib.ExitStack() as stack:
            sides: dict[str, Callable[[], Row]] = {}
            for side, mode in (("grpc prefix cache", "on"), ("grpc no prefix cache", "off")):
                server = stack.enter_context(ServerProcess(*server_args, "--prefix-caching", mode))

                def run(
                    target: str = server.target,
                    method: str = f"grpc, prefix cache {mode}",
                    streams: int = streams,
                    salts: Iterator[int] = salts,
                ) -> Row:
                    batch = shared_prompts(tokenizer, streams, args.shared_prefix, args.prompt_tokens, next(salts))
                    return grpc_round(target, batch, args.new_tokens, method)

                sides[side] = run
            for side, caching in (("cb prefix cache", True), ("cb no prefix cache", False)):

                def raw(caching: bool = caching, streams: int = streams, salts: Iterator[int] = salts) -> Row:
                    batch = shared_prompts(tokenizer, streams, args.shared_prefix, args.prompt_tokens, next(salts))
                    return cb_round(model, tokenizer, batch, args.new_tokens, prefix_caching=caching)

                sides[side] = raw
            best = interleaved(sides, args.repeat)
        for row in best.values():
            row.bench = name
            row.extra["shared_prefix_tokens"] = args.shared_prefix
        on, off = best["grpc prefix cache"], best["grpc no prefix cache"]
        raw_on, raw_off = best["cb prefix cache"], best["cb no prefix cache"]
        big = streams >= 32
        label = f"{name} prefix cache on / off, {args.shared_prefix}-token shared prefix, at {streams}"
        ttft = percentile(off.ttft_ms, 50) / max(percentile(on.ttft_ms, 50), 1e-9)
        raw_ttft = percentile(raw_off.ttft_ms, 50) / max(percentile(raw_on.ttft_ms, 50), 1e-9)
        ratios = [
            ratio(f"{label}: tokens/s", on, off, 2.0 if big else 0.0),
            # TTFT p50 on <= 0.3x off, said the other way round: off / on >= 3.33.
            {"name": f"{label}: TTFT p50 off / on", "value": ttft, "target": round(1 / 0.3, 2) if big else 0.0},
            # transformers' own, for comparison: what the cache buys before any server is involved.
            ratio(f"{label}: raw CB tokens/s", raw_on, raw_off),
            {"name": f"{label}: raw CB TTFT p50 off / on", "value": raw_ttft, "target": 0.0},
            ratio(f"{label}: gRPC / raw CB, cache on", on, raw_on),
        ]
        yield list(best.values()), ratios


def sides_for(
    model: Any, tokenizer: Any, batch: list[Prompt], args: argparse.Namespace, servers: dict[str, ServerProcess]
) -> dict[str, Callable[[], Row]]:
    """Every side to compare, as one round each; they all run in the same interleaved rounds."""
    new = args.new_tokens
    sides: dict[str, Callable[[], Row]] = {"cb": lambda: cb_round(model, tokenizer, batch, new)}
    for side, server in servers.items():
        check_prompts(server.target, batch)
        method = {"grpc": "grpc (engine process)", "grpc varlen": "grpc, --attention varlen"}.get(
            side, "grpc, engine in process"
        )

        def run(target: str = server.target, method: str = method) -> Row:
            return grpc_round(target, batch, new, method)

        sides[side] = run
    sides["sequential"] = lambda: sequential_round(model, batch, new, args.sequential_limit)
    if args.compare_sampling:
        sides["cb + hook"] = lambda: cb_round(model, tokenizer, batch, new, sampling_hook=True)
    if args.compare_constrained:
        target, schema = servers["grpc"].target, {"json_schema": OPEN_SCHEMA}
        sides["grpc constrained"] = lambda: grpc_round(target, batch, new, "grpc, JSON schema", schema)
    if args.compare_attention:
        sides["cb varlen"] = lambda: cb_round(model, tokenizer, batch, new, attention="varlen")
    if args.compare_async and args.device.startswith("cuda"):
        sides["cb async"] = lambda: survived(lambda: cb_round(model, tokenizer, batch, new, async_batching=True))
        if args.compare_attention:
            sides["cb varlen async"] = lambda: survived(
                lambda: cb_round(model, tokenizer, batch, new, attention="varlen", async_batching=True)
            )
    if args.compare_no_graphs:
        sides["cb no graphs"] = lambda: cb_round(model, tokenizer, batch, new, cuda_graphs=False)
    return sides


def survived(side: Callable[[], Row]) -> Row:
    """A side that has never run where it runs (async batching, CUDA only): if it fails, a row of
    no tokens that says why, and the run goes on to measure the rest."""
    try:
        return side()
    except Exception as exc:
        print(f"a side failed: {type(exc).__name__}: {exc}")
        return Row("model", "failed", 0, 0, 1.0, [], {"error": f"{type(exc).__name__}: {exc}"})


def results_name(args: argparse.Namespace) -> str:
    return f"model_path_{args.device}" + ("_shared_prefix" if args.shared_prefix else "")


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
        "--repeat", type=int, default=5, help="interleaved rounds of every side; each keeps its best round"
    )
    parser.add_argument(
        "--compare-no-graphs",
        action="store_true",
        help="also run raw CB without CUDA graphs (off the GPU the same as raw CB: there are no graphs)",
    )
    parser.add_argument(
        "--compare-in-process",
        action="store_true",
        help="also serve with --engine-process off (the model in the gRPC server's own process)",
    )
    parser.add_argument(
        "--compare-sampling", action="store_true", help="also run raw CB with the server's sampling hook installed"
    )
    parser.add_argument(
        "--compare-attention",
        action="store_true",
        help="also run raw CB and a server with --attention varlen (each sequence over its own keys, no batch mask)",
    )
    parser.add_argument(
        "--compare-async",
        action="store_true",
        help="also run raw CB with async (double-buffered) batching, with --compare-attention varlen too"
        " (CUDA only: elsewhere transformers has no async batching and the sides are left out)",
    )
    parser.add_argument(
        "--compare-constrained", action="store_true", help="also stream every request under one JSON schema"
    )
    parser.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        help="measure the prefix cache instead: every prompt begins with the same N tokens (on vs off)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.compare_async and not args.device.startswith("cuda"):
        print(f"--compare-async: transformers batches asynchronously on CUDA only; left out on {args.device}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    ratios: list[dict[str, Any]] = []
    meta = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            bench = bench_shared_prefix if args.shared_prefix else bench_model
            for setting_rows, setting_ratios in bench(name, args, Path(scratch)):
                rows += setting_rows
                ratios += setting_ratios
                # Written as each concurrency finishes: a run cut short by a timeout keeps what it measured.
                write_results(results_name(args), rows, ratios, meta)
    report(results_name(args), rows, ratios, meta)


if __name__ == "__main__":
    main()
