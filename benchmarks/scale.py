"""Scale-out on one machine: engine replicas (aggregate tokens/s) and tensor parallelism (per-token latency).

Engine replicas: for each model, servers (`python -m entity_llm_server` on
loopback, each with `OMP_NUM_THREADS=1` in its environment, so that each
engine process computes on one core) that differ only in `--engine-replicas`
(`--replicas`, default 1 and 2): the same model, the same batching flags
(`--max-batch-size` per replica, `--max-queue`, a KV cache sized for the
batch). For each concurrency N, the same N greedy `AsyncLLMClient` streams
(the same prompt texts; `min_new_tokens = max_new_tokens`, so every stream
generates exactly `--new-tokens` tokens) go to each server. Tokens are the
counts each stream's usage reports; tokens/s is their sum over the round's
wall time; TTFT is from submission to the first message with token ids.

Pods: the same, with whole servers as pods would run them: each value of
`--pods` (default 1 and 2) is that many servers of one engine replica each,
on distinct loopback addresses (127.0.0.2, 127.0.0.3, ...) with one port,
which the client reaches as a list of addresses (gRPC's round_robin with
health checking, the SDK's default for several servers).

Tensor parallelism: the same, with servers that differ only in
`--tensor-parallel` (`--tp`, default 1 and 2: one engine process, or two
ranks of one core, each rank on one core), at `--tp-streams` concurrencies;
what it reports is the per-token latency, each stream's time from its first
token to its last over the tokens in between (median over the streams).

The servers of a comparison are up at once. Every round, each warms up the
same way (as many short concurrent streams as the largest server has
replicas) before its timed streams; the rounds are interleaved
(`_common.interleaved`) and each side keeps its best of `--repeat`. Every
round's greedy token ids must be the same on every side; the report says
whether they were, and the JSON keeps the texts.

    python benchmarks/scale.py [--models demo,llama-35m] [--streams 32,64] [--pods 1,2] [--tp-streams 1,8] [--repeat 3]
    python benchmarks/scale.py --device cuda --dtype bfloat16 --models qwen2-0.5b --replicas 1,2,4 \
        --streams 64,256 --tp-streams none --new-tokens 128 --repeat 1     # one GPU (device_run.sh)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import Row, ServerProcess, interleaved, percentile, ratio, report, write_results
from _models import SHAPES, materialise, prompts
from _sides import WARM_TOKENS, Prompt, cb_settings


def target(name: str, device: str, replicas: int, streams: int, *, largest: bool) -> float:
    """The issue's targets (elsewhere a ratio is reported only): on a CPU, two
    replicas reach 1.6x one on the 35M model from 32 streams; on a GPU, the
    most replicas measured reach 2x one at 256 streams."""
    if device == "cpu":
        return 1.6 if name == "llama-35m" and replicas == 2 and streams >= 32 else 0.0
    return 2.0 if largest and replicas > 1 and streams >= 256 else 0.0


Compare = Callable[[str, str, Row, Row, int, argparse.Namespace], dict[str, Any]]


@dataclass(frozen=True)
class Layout:
    """One comparison: servers that differ only in `flag`, one per value (the first is the baseline).

    `label` names a value's server; `compare(model, value, row, base, streams,
    args)` is the ratio of a server's row to the baseline's; `warm_streams`
    concurrent short streams warm each server up before each round. With
    `pods`, a value is a number of servers (no flag), each on a loopback
    address of its own and one shared port, and a side is their address list.
    """

    key: str
    flag: str
    values: tuple[str, ...]
    label: Callable[[str], str]
    compare: Compare
    warm_streams: int = 1
    pods: bool = False

    def side(self, value: str) -> str:
        return self.label(value)


def _replicas(name: str, value: str, row: Row, base: Row, streams: int, args: argparse.Namespace) -> dict[str, Any]:
    largest = int(value) == max(int(v) for v in args.replicas.split(","))
    goal = target(name, args.device, int(value), streams, largest=largest)
    return ratio(f"{name} {value} replicas / {base.method} at {streams} streams", row, base, goal)


def _latency(name: str, value: str, row: Row, base: Row, streams: int, args: argparse.Namespace) -> dict[str, Any]:
    # Lower is better: the baseline's latency over this one's reads as a speed-up.
    speedup = base.extra["per_token_ms_p50"] / row.extra["per_token_ms_p50"]
    label = f"{name} per-token speed, TP={value} / {base.method} at {streams} streams"
    return {"name": label, "value": speedup, "target": 0.0}


def replicas(values: str) -> Layout:
    """Servers with each of `values` (comma-separated) engine replicas."""
    numbers = tuple(values.split(","))
    return Layout(
        "replicas",
        "--engine-replicas",
        numbers,
        lambda v: f"{v} replica" + ("s" if int(v) > 1 else ""),
        _replicas,
        warm_streams=max(int(v) for v in numbers),  # least-loaded dispatch gives each replica one
    )


def _pods(name: str, value: str, row: Row, base: Row, streams: int, args: argparse.Namespace) -> dict[str, Any]:
    goal = target(name, args.device, int(value), streams, largest=int(value) == max(map(int, args.pods.split(","))))
    return ratio(f"{name} {value} pods / {base.method} at {streams} streams", row, base, goal)


def pods(values: str) -> Layout:
    """Each of `values` (comma-separated) whole servers, behind the client's round_robin."""
    numbers = tuple(values.split(","))
    return Layout(
        "pods",
        "",
        numbers,
        lambda v: f"{v} pod" + ("s" if int(v) > 1 else ""),
        _pods,
        warm_streams=2 * max(int(v) for v in numbers),  # round_robin: every pod gets one
        pods=True,
    )


def _shared_port(hosts: list[str]) -> int:
    """A port free on every one of `hosts`, as every pod of a Deployment listens on one."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise SystemExit("no port free on every pod address")


def tensor_parallel(values: str) -> Layout:
    """Servers with each of `values` (comma-separated) tensor-parallel ranks."""
    return Layout(
        "tensor-parallel",
        "--tensor-parallel",
        tuple(values.split(",")),
        lambda v: f"{v} TP rank" + ("s" if int(v) > 1 else ""),
        _latency,
    )


@dataclass
class Outputs:
    """Every round's greedy output of one concurrency, per side: token ids to compare, texts to keep."""

    ids: dict[str, list[list[tuple[int, ...]]]] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)

    def add(self, side: str, ids: list[tuple[int, ...]], texts: list[str]) -> None:
        self.ids.setdefault(side, []).append(ids)
        self.texts.setdefault(side, texts)

    def identical(self) -> bool:
        """Every round of every side gave the same ids, stream for stream."""
        rounds = [r for side in self.ids.values() for r in side]
        return all(r == rounds[0] for r in rounds)

    def differing_streams(self) -> int:
        """Streams whose ids differ in some round from the first side's first round."""
        rounds = [r for side in self.ids.values() for r in side]
        return sum(any(r[i] != rounds[0][i] for r in rounds) for i in range(len(rounds[0])))


async def _round(
    target: str | list[str], batch: list[Prompt], new_tokens: int, method: str, warm_streams: int
) -> tuple[Row, list[tuple[int, ...]], list[str]]:
    from entity_llm_client import AsyncLLMClient

    async with AsyncLLMClient(target, timeout=3600) as client:

        async def warm(prompt: Prompt) -> None:
            async for _ in client.generate(prompt.text, max_new_tokens=WARM_TOKENS, temperature=0.0):
                pass

        await asyncio.gather(*(warm(p) for p in batch[:warm_streams]))
        ttft: list[float] = []
        per_token: list[float] = []
        started = time.perf_counter()

        async def one(prompt: Prompt) -> tuple[int, tuple[int, ...], str]:
            ids: list[int] = []
            text: list[str] = []
            generated = None
            first = last = 0.0
            async for chunk in client.generate(
                prompt.text, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0
            ):
                if chunk.token_ids:
                    last = time.perf_counter()
                    if not ids:
                        first = last
                        ttft.append((first - started) * 1000)
                ids.extend(chunk.token_ids)
                text.append(chunk.text)
                if chunk.usage is not None:
                    generated = chunk.usage.generated_tokens
            if generated != new_tokens:
                raise SystemExit(f"{method}: a stream's usage says {generated} generated tokens, not {new_tokens}")
            if len(ids) > 1:
                per_token.append((last - first) * 1000 / (len(ids) - 1))
            return generated, tuple(ids), "".join(text)

        results = await asyncio.gather(*(one(p) for p in batch))
        seconds = time.perf_counter() - started
    per_request = [count for count, _, _ in results]
    row = Row("scale", method, len(batch), sum(per_request), seconds, ttft)
    row.extra["per_token_ms_p50"] = round(percentile(per_token, 50), 2)
    return row, [ids for _, ids, _ in results], [text for _, _, text in results]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Processes started meanwhile (a server and its engine processes) get `OMP_NUM_THREADS=1`."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before


def side(
    target: str | list[str], batch: list[Prompt], new_tokens: int, method: str, outputs: Outputs, warm_streams: int
) -> Callable[[], Row]:
    """One round against one server, its outputs kept in `outputs`."""

    def run() -> Row:
        row, ids, texts = asyncio.run(_round(target, batch, new_tokens, method, warm_streams))
        outputs.add(method, ids, texts)
        return row

    return run


def server_args(folder: Path, args: argparse.Namespace, prompt_tokens: int) -> list[str]:
    """The flags both servers share: one source for the batching sizes."""
    sizes = cb_settings(args.max_batch_size, args.new_tokens, prompt_tokens)  # its KV cache fits a full batch
    sizes["max_queue"] = args.max_queue
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    device = ["--device", args.device, "--dtype", args.dtype]
    return ["--model", str(folder), "--max-new-tokens", str(args.new_tokens), *device, *flags]


def bench_model(
    name: str, layout: Layout, counts: list[int], args: argparse.Namespace, scratch: Path
) -> Iterator[tuple[list[Row], list[dict[str, Any]], dict[str, Any]]]:
    """The rows, ratios and outputs of each concurrency in turn; the servers start once per model."""
    from transformers import AutoTokenizer

    folder = materialise(name, scratch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    every = prompts(tokenizer, max(counts), args.prompt_tokens)
    shared = server_args(folder, args, max(len(p.ids) for p in every))
    with contextlib.ExitStack() as stack:
        targets: dict[str, str | list[str]] = {}
        startups: dict[str, float] = {}
        with one_thread():
            if layout.pods:
                hosts = [f"127.0.0.{2 + i}" for i in range(sum(int(v) for v in layout.values))]
                port = _shared_port(hosts)
                for v in layout.values:
                    mine, hosts = hosts[: int(v)], hosts[int(v) :]
                    started = [
                        stack.enter_context(ServerProcess(*shared, "--host", host, "--port", str(port)))
                        for host in mine
                    ]
                    targets[layout.side(v)] = [server.target for server in started]
                    startups[layout.side(v)] = max(server.startup_s for server in started)
            else:
                for v in layout.values:
                    server = stack.enter_context(ServerProcess(*shared, layout.flag, v))
                    targets[layout.side(v)], startups[layout.side(v)] = server.target, server.startup_s
        for streams in counts:
            batch = every[:streams]
            outputs = Outputs()
            warm = layout.warm_streams
            sides = {s: side(target, batch, args.new_tokens, s, outputs, warm) for s, target in targets.items()}
            best = interleaved(sides, args.repeat)
            rows = [best[layout.side(v)] for v in layout.values]
            for row in rows:
                row.bench = f"{name} {layout.key}"
                row.extra["server_startup_s"] = round(startups[row.method], 2)
            base = rows[0]
            ratios = [
                layout.compare(name, v, row, base, streams, args)
                for v, row in zip(layout.values[1:], rows[1:], strict=True)
            ]
            record = {
                "identical": outputs.identical(),
                "differing_streams": outputs.differing_streams(),
                "texts": outputs.texts,
            }
            yield rows, ratios, record


def markdown(rows: list[Row], identical: dict[str, bool]) -> str:
    """One table per model and comparison: each side's tokens/s (and over the first side's),
    per-token latency and TTFT p50."""
    lines: list[str] = []
    for bench in dict.fromkeys(row.bench for row in rows):
        lines += [
            f"\n### {bench}\n",
            "| streams | server | tok/s | / first | per-token ms p50 | TTFT p50 | same greedy output |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        mine = [row for row in rows if row.bench == bench]
        for streams in dict.fromkeys(row.streams for row in mine):
            these = [r for r in mine if r.streams == streams]
            same = "yes" if identical[f"{bench} at {streams} streams"] else "**no**"
            for row in these:
                x = row.summary()
                lines.append(
                    f"| {streams} | {row.method} | {x['tokens_per_s']:,.0f}"
                    f" | {row.tokens_per_s / these[0].tokens_per_s:.2f}x | {row.extra['per_token_ms_p50']:,.1f}"
                    f" | {x['ttft_p50_ms']:,.0f} ms | {same} |"
                )
    return "\n".join(lines)


def server_options(parser: argparse.ArgumentParser, repeat: int) -> None:
    """The options every comparison of servers takes (what `bench_model` and `server_args` read)."""
    parser.add_argument("--device", default="cpu", help="every server's --device")
    parser.add_argument("--dtype", default="auto", help="every server's --dtype")
    parser.add_argument("--repeat", type=int, default=repeat, help="interleaved rounds; each side keeps its best")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens every stream generates, exactly")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32, help="every server's (per engine replica)")
    parser.add_argument("--max-queue", type=int, default=64, help="every server's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,llama-35m", help=f"demo, {', '.join(SHAPES)}")
    parser.add_argument("--replicas", default="1,2", help="--engine-replicas of each server; the first is the base")
    parser.add_argument("--streams", default="32,64", help="concurrent streams for replicas, comma-separated")
    parser.add_argument("--pods", default="1,2", help="whole servers behind round_robin per side; none: skip")
    parser.add_argument("--pod-streams", default="32", help="concurrent streams for pods, comma-separated")
    parser.add_argument("--tp", default="1,2", help="--tensor-parallel of each server; the first is the base")
    parser.add_argument("--tp-streams", default="1,8", help="concurrent streams for tensor parallelism; none: skip")
    server_options(parser, repeat=3)
    args = parser.parse_args()
    rows: list[Row] = []
    ratios: list[dict[str, Any]] = []
    outputs: dict[str, dict[str, Any]] = {}
    meta = {"args": vars(args), "env": {"OMP_NUM_THREADS": "1"}, "outputs": outputs}

    results = "scale" if args.device == "cpu" else f"scale_{args.device.split(':')[0]}"

    plans = [(replicas(args.replicas), args.streams)]
    if args.pods != "none":
        plans.append((pods(args.pods), args.pod_streams))
    if args.tp_streams != "none":
        plans.append((tensor_parallel(args.tp), args.tp_streams))
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            for layout, streams in plans:
                counts = [int(s) for s in streams.split(",")]
                for setting_rows, setting_ratios, record in bench_model(name, layout, counts, args, Path(scratch)):
                    rows += setting_rows
                    ratios += setting_ratios
                    outputs[f"{setting_rows[0].bench} at {setting_rows[0].streams} streams"] = record
                    # Written as each concurrency finishes: a run cut short keeps what it measured.
                    write_results(results, rows, ratios, meta)
    report(results, rows, ratios, meta)
    print(markdown(rows, {key: record["identical"] for key, record in outputs.items()}))
    for key, record in outputs.items():
        verdict = "identical" if record["identical"] else f"{record['differing_streams']} streams differ"
        print(f"greedy outputs, {key}: {verdict} (every side, every round)")


if __name__ == "__main__":
    main()
