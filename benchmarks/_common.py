"""Shared helpers for the benchmarks: interleaved rounds, statistics, tables, JSON, a server subprocess."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Row:
    """One measured configuration."""

    bench: str
    method: str
    streams: int
    tokens: int
    seconds: float
    ttft_ms: list[float] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        del data["ttft_ms"]
        data["tokens_per_s"] = round(self.tokens_per_s, 1)
        data["ttft_p50_ms"] = round(percentile(self.ttft_ms, 50), 1)
        data["ttft_p99_ms"] = round(percentile(self.ttft_ms, 99), 1)
        return data


def best(runs: list[Row]) -> Row:
    """The fastest of repeated runs, with every run's tokens/s kept in its extra."""
    top = max(runs, key=lambda row: row.tokens_per_s)
    top.extra["runs_tokens_per_s"] = [round(row.tokens_per_s, 1) for row in runs]
    return top


def interleaved(sides: dict[str, Callable[[], Row]], rounds: int) -> dict[str, Row]:
    """Run every side once per round and keep each side's best round.

    Each side warms itself up before its timed part, the same way every round.
    The order rotates from round to round, so that no side always runs first
    or right after a heavy one, and the shared machine's slow moments spread
    over every side instead of charging whichever ran then.
    """
    names = list(sides)
    runs: dict[str, list[Row]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(sides[name]())
    return {name: best(rows) for name, rows in runs.items()}


def machine() -> dict[str, Any]:
    import grpc

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def ratio(name: str, ours: Row, baseline: Row, target: float = 0.0) -> dict[str, Any]:
    """ours / baseline in tokens/s, with the target it should reach (0: reported only)."""
    return {"name": name, "value": ours.tokens_per_s / baseline.tokens_per_s, "target": target}


def write_results(name: str, rows: list[Row], ratios: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write everything to benchmarks/results/NAME.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), **meta, "rows": [r.summary() for r in rows], "ratios": ratios}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def report(name: str, rows: list[Row], ratios: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Print a table and the ratios; write everything to benchmarks/results/NAME.json."""
    print(f"\n## {name}")
    print(f"{'bench':<14} {'method':<24} {'streams':>7} {'tokens':>7} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9}")
    for row in rows:
        s = row.summary()
        print(
            f"{row.bench:<14} {row.method:<24} {row.streams:>7} {row.tokens:>7} {s['tokens_per_s']:>9.1f}"
            f" {s['ttft_p50_ms']:>9.1f} {s['ttft_p99_ms']:>9.1f}"
        )
    for ratio in ratios:
        verdict = "ok" if ratio["value"] >= ratio["target"] else "BELOW TARGET"
        print(f"ratio {ratio['name']}: {ratio['value']:.2f}x (target >= {ratio['target']}x) {verdict}")
    path = write_results(name, rows, ratios, meta)
    print(f"wrote {path}")
    return path


class ServerProcess:
    """`python -m entity_llm_server` on a free loopback port."""

    def __init__(self, *args: str) -> None:
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "entity_llm_server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-level",
                "WARNING",
                *args,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        if not match:
            self.process.kill()
            raise SystemExit(f"server did not start: {line!r}")
        self.target = match.group(1)
        # From exec to the "listening" line, which the server prints once the
        # model is loaded and warmed up and health says SERVING.
        self.startup_s = time.perf_counter() - started

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        if self.process.stdout is not None:
            self.process.stdout.close()
