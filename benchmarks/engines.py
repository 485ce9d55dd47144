"""Padded batches (`--engine padded`) against one request at a time (`--engine sequential`), aggregate tokens/s.

For models transformers' continuous batching cannot run, `--engine auto`
serves padded batches. Here two servers differ only in `--engine` (padded,
sequential) on ~35M-parameter random-weight models of two such
architectures (GPT-NeoX and OPT shapes), each with `OMP_NUM_THREADS=1` and
the same flags; for 8 and 32 concurrent greedy streams (32-token prompts,
exactly 32 new tokens each) they get the same streams, the same warm-up,
interleaved rounds, best of each side, greedy ids compared across them
(scale.py's machinery, see its docstring). Target: padded ≥ 4x sequential at
32 streams.

    python benchmarks/engines.py [--models gpt-neox-35m,opt-35m] [--streams 8,32] [--repeat 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from _common import Row, ratio, report, write_results
from _models import SHAPES
from scale import Layout, bench_model, markdown, server_options

TARGET = 4.0  # padded / sequential at TARGET_STREAMS and more
TARGET_STREAMS = 32


def _speedup(name: str, value: str, row: Row, base: Row, streams: int, args: argparse.Namespace) -> dict[str, Any]:
    goal = TARGET if streams >= TARGET_STREAMS else 0.0
    return ratio(f"{name} {value} / {base.method} at {streams} streams", row, base, goal)


ENGINES = Layout("engines", "--engine", ("sequential", "padded"), lambda v: v, _speedup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt-neox-35m,opt-35m", help=", ".join(SHAPES))
    parser.add_argument("--streams", default="8,32", help="concurrent streams, comma-separated")
    server_options(parser, repeat=2)
    args = parser.parse_args()
    rows: list[Row] = []
    ratios: list[dict[str, Any]] = []
    outputs: dict[str, dict[str, Any]] = {}
    meta = {"args": vars(args), "env": {"OMP_NUM_THREADS": "1"}, "outputs": outputs}
    counts = [int(s) for s in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            for setting_rows, setting_ratios, record in bench_model(name, ENGINES, counts, args, Path(scratch)):
                rows += setting_rows
                ratios += setting_ratios
                outputs[f"{setting_rows[0].bench} at {setting_rows[0].streams} streams"] = record
                write_results("engines", rows, ratios, meta)  # a run cut short keeps what it measured
    report("engines", rows, ratios, meta)
    print(markdown(rows, {key: record["identical"] for key, record in outputs.items()}))
    for key, record in outputs.items():
        verdict = "identical" if record["identical"] else f"{record['differing_streams']} streams differ"
        print(f"greedy outputs, {key}: {verdict} (both engines, every round)")


if __name__ == "__main__":
    main()
