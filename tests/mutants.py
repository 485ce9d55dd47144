"""Mutation check: each promise the docs make is guarded by a test that fails without it.

`nox -s mutants` (or `python tests/mutants.py [NAME ...]` in a venv with both
packages and the test dependencies) takes each mutation below, applies it to a
copy of the installed `entity_llm_server` package, and runs the tests named
for it with that copy first on PYTHONPATH (engine processes and subprocess
clients inherit it), so the checkout itself is never changed. A mutation that
the tests do not catch (they pass) is a survivor: the run lists it and exits 1.
Figures go to benchmarks/results/mutants.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    """One line of `entity_llm_server` changed, and the tests that must then fail.

    Attributes:
        name: a short handle (pass it on the command line to run only this one).
        promise: what the docs promise that the line keeps.
        path: the module, relative to the `entity_llm_server` package.
        line: the exact text of the line (stripped).
        mutant: what the line becomes (indentation is kept).
        tests: pytest arguments selecting the tests that guard the promise.
        occurrence: which of the module's `occurrences` lines of that text to change.
    """

    name: str
    promise: str
    path: str
    line: str
    mutant: str
    tests: tuple[str, ...]
    occurrence: int = 0
    occurrences: int = 1


MUTATIONS = (
    Mutation(
        "cancel-core",
        "a client that leaves is dropped from the batch (the batching core, in process or in the engine process)",
        "engine/batching.py",
        "manager.cancel_request(rid)",
        "pass",
        ("tests/model/test_cancellation.py", "-k", "batching or process"),
        occurrence=1,  # BatchingCore.cancel (the other drops a request whose sampling failed)
        occurrences=2,
    ),
    Mutation(
        "cancel-sent",
        "a client that leaves is dropped from the batch (the front end tells the engine process)",
        "engine/process.py",
        "self._send(Cancel(rid))",
        "pass",
        ("tests/model/test_cancellation.py", "-k", "process"),
    ),
    Mutation(
        "cancel-front-end",
        "a client that leaves is dropped from the batch (the front end tells its core, whichever it is)",
        "engine/frontend.py",
        "self.core.cancel(rid)",
        "pass",
        ("tests/model/test_cancellation.py",),
    ),
    Mutation(
        "cancel-sequential",
        "a client that leaves stops its generation (sequential engine)",
        "engine/sequential.py",
        "flag.set()",
        "pass",
        ("tests/model/test_cancellation.py", "-k", "sequential"),
        occurrence=1,  # SequentialCore.cancel (the other is close())
        occurrences=2,
    ),
    Mutation(
        "seed-per-request",
        "a seed reproduces a text, whatever else is in the batch",
        "engine/rows.py",
        "return step_key(sampling.seed or 0, step) if sampled else 0, flags",
        "return step_key(0, step) if sampled else 0, flags",
        ("tests/model/test_sampling.py", "-k", "seed"),
    ),
    Mutation(
        "drain-grace",
        "SIGTERM lets the streams in flight finish within the grace period",
        "server.py",
        "if await self.gate.wait_idle(grace):",
        "if await self.gate.wait_idle(0):",
        ("tests/integration/test_drain.py",),
    ),
    Mutation(
        "admission-bound",
        "a request beyond max batch size + max queue is refused at once (RESOURCE_EXHAUSTED)",
        "engine/frontend.py",
        "if self.capacity is not None and self.in_flight + places > self.capacity:",
        "if False:",
        ("tests/model/test_batching.py", "tests/model/test_engine_process.py", "-k", "capacity"),
    ),
    Mutation(
        "stop-trimming",
        "a stop sequence ends the stream and is trimmed from the text unless asked for",
        "engine/text.py",
        "end = index + len(stop) if self.include else index",
        "end = index + len(stop)",
        ("tests/model/test_generation_api.py", "-k", "stop"),
    ),
    Mutation(
        "start-up-probe",
        "a model continuous batching cannot run is never SERVING under it: the server falls back or exits",
        "engine/batching.py",
        "prove(manager, type(self.model).__name__, self.facts.vocab_size)",
        "pass",
        ("tests/model/test_architectures.py", "-k", "gpt_neox or explicitly"),
    ),
    Mutation(
        "padded-positions",
        "padded batches stream what generate gives: left-padded rows get their own positions",
        "engine/padded.py",
        'self._positions = "position_ids" in forward',
        "self._positions = False",
        ("tests/model/test_padded.py", "-k", "gpt2"),
    ),
    Mutation(
        "rank-watch",
        "a tensor-parallel rank that dies ends every stream with INTERNAL at once, naming the rank",
        "engine/ranks.py",
        "loop.add_reader(peer.process.conn.fileno(), self._readable, peer)",
        "pass",
        ("tests/model/test_tensor_parallel.py", "-k", "killed"),
    ),
    Mutation(
        "rank-liveness",
        "a tensor-parallel rank that stops answering fails the core (not after gloo's timeout)",
        "engine/ranks.py",
        "elif now - peer.ping_sent >= timeout:",
        "elif False:",
        ("tests/model/test_tensor_parallel.py", "-k", "stops_answering"),
    ),
    Mutation(
        "sampling-every-rank",
        "every tensor-parallel rank runs the same sampler, so text is what one process gives",
        "engine/batching.py",
        "manager.logit_processor = self.sampling",
        "manager.logit_processor = self.sampling if manager.is_tp_driver else manager.logit_processor",
        ("tests/model/test_tensor_parallel.py", "-k", "byte"),
    ),
    Mutation(
        "echo-after-accept",
        "response headers go out only once a call is accepted, so a refusal stays retryable on another replica",
        "interceptors.py",
        "call.echo = any(key == REQUEST_ID_HEADER for key, _ in metadata)",
        "call.echo = False; await context.send_initial_metadata(((REQUEST_ID_HEADER, call.request_id),)) "
        "if any(key == REQUEST_ID_HEADER for key, _ in metadata) else None",
        ("tests/integration/test_balancing.py", "-k", "draining or refused"),
    ),
    Mutation(
        "connection-age",
        "--max-connection-age makes clients reconnect, re-resolve and find replicas started after them",
        "server.py",
        '("grpc.max_connection_age_ms", round(max_connection_age * 1000)),',
        '("grpc.max_connection_idle_ms", round(max_connection_age * 1000)),',
        ("tests/e2e/test_replicas.py", "-k", "finds"),
    ),
    Mutation(
        "trace-phases",
        "a traced Generate has queue, prefill and decode spans, split where the front end hands it to its core",
        "engine/frontend.py",
        "moments.append(time.perf_counter())",
        "pass",
        ("tests/model/test_tracing.py", "-k", "phases"),
    ),
    Mutation(
        "chat-content-data",
        "special-token text in a chat message stays text: no forged turns",
        "engine/inputs.py",
        'ids += self.tokenizer(piece, add_special_tokens=False, split_special_tokens=data)["input_ids"]',
        'ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]',
        ("tests/model/test_chat_content.py",),
    ),
    Mutation(
        "stalled-streams",
        "a Generate stream whose client stopped reading is ended and frees its place (--stalled-stream-timeout)",
        "stalls.py",
        "asyncio.get_running_loop().call_soon(task.cancel)",
        "pass",
        ("tests/integration/test_shares.py", "-k", "stopped_reading"),
    ),
    Mutation(
        "stuck-engine",
        "an engine that holds requests and runs no step is NOT_SERVING and refuses requests until it steps again",
        "engine/batching.py",
        "return self._running and self.pulse.stuck(bool(self._seen), steps)",
        "return False",
        ("tests/model/test_engine_health.py", "-k", "stuck"),
    ),
    Mutation(
        "graph-logprobs",
        "logprobs work with CUDA graphs: copied out of the step's static buffers before its tokens are handed out",
        "engine/cb_sampling.py",
        "self.processors.collect()",
        "pass",
        ("tests/model/test_sampling.py", "-k", "graph_mode"),
        occurrence=1,
        occurrences=2,
    ),
    Mutation(
        "graph-penalty",
        "repetition_penalty works with CUDA graphs: the penalised rows' tokens in a static mask the step reads",
        "engine/cb_sampling.py",
        "rows.seen = self._seen_rows[:n]",
        "pass",
        ("tests/model/test_sampling.py", "-k", "graph_mode"),
    ),
    Mutation(
        "graph-seen-owner",
        "repetition_penalty with CUDA graphs sees each request's own tokens as rows change hands between steps",
        "engine/cb_sampling.py",
        "if owner != rid or marked > len(tokens):",
        "if False:",
        ("tests/model/test_sampling.py", "-k", "change_hands or graph_mode"),
    ),
    Mutation(
        "restart-unavailable",
        "with --on-engine-failure restart, a call to a failed engine gets UNAVAILABLE (retryable), not INTERNAL",
        "service.py",
        "raise EngineUnavailableError(RESTARTING)  # failed; the restart begins at the health watcher's next look",
        "pass",
        ("tests/reliability/test_hostile.py", "-k", "engine_killed"),
    ),
    Mutation(
        "padded-shrink",
        "a padded batch drops the rows whose requests ended, cache included, and the others stream on unchanged",
        "engine/padded.py",
        "cache.batch_select_indices(index)",
        "pass",
        ("tests/model/test_padded.py", "-k", "rows_whose"),
    ),
    Mutation(
        "ping-strikes",
        "a long, quiet stream is not cut off by a client's frequent keepalive pings",
        "server.py",
        '("grpc.http2.max_ping_strikes", 0),',
        '("grpc.http2.max_ping_strikes", 2),',
        ("tests/integration/test_keepalive.py", "-k", "slow_stream"),
    ),
    Mutation(
        "constraint-mask",
        "structured output: a constrained row takes only the tokens its constraint allows",
        "engine/cb_sampling.py",
        "scores = scores.masked_fill(~_padded(self._allowed, n, fill=True), -math.inf)",
        "pass",
        ("tests/model/test_constraints.py", "-k", "every_engine and batching"),
    ),
    Mutation(
        "graph-adjust",
        "logit_bias and the presence and frequency penalties apply with CUDA graphs (the static buffer is read)",
        "engine/cb_sampling.py",
        "rows.adjust = self._adjust_rows[:n]",
        "pass",
        ("tests/model/test_request_features.py", "-k", "graph_mode"),
    ),
    Mutation(
        "typical-p",
        "typical_p means what transformers' TypicalLogitsWarper means",
        "engine/rows.py",
        "scores = _on(scores, filters, lambda part, at: _typical(_min_p(part, at(rows.min_p)), at(rows.typical_p)))",
        "scores = _on(scores, filters, lambda part, at: _min_p(part, at(rows.min_p)))",
        ("tests/model/test_request_features.py", "-k", "filters_mean"),
    ),
    Mutation(
        "stop-token",
        "a stop token ends the stream with FINISH_REASON_STOP_TOKEN on every core",
        "engine/frontend.py",
        "if token in stop_ids:  # not text: it goes out with the last message",
        "if False:",
        ("tests/model/test_request_features.py", "-k", "stop_token_ends"),
    ),
    Mutation(
        "samples-prefill-once",
        "n samples of one prompt prefill it once (continuous batching with its prefix cache)",
        "engine/samples.py",
        "if index and staggered:",
        "if False:",
        ("tests/model/test_samples.py", "-k", "prefilled_once"),
    ),
    Mutation(
        "prefix-cache",
        "prompts that begin alike share their KV blocks, and the hits are counted",
        "engine/batching.py",
        "allow_block_sharing=s.prefix_caching,",
        "allow_block_sharing=False,",
        ("tests/model/test_prefix_caching.py",),
    ),
    Mutation(
        "forward-turns",
        "prompt logprobs scored beside continuous batching are the model's own",
        "engine/scoring.py",
        "model.register_forward_pre_hook(take)",
        "pass",
        ("tests/model/test_scoring.py", "-k", "waits_its_turn"),
    ),
    Mutation(
        "varlen-boundaries",
        "--attention varlen gives what SDPA gives",
        "engine/attention.py",
        "visible = real_k[:, None, :] & (at_k[None, None, :] <= at_q[None, :, None] + (lk - lq)[:, None, None])",
        "visible = real_k[:, None, :] & (at_k[None, None, :] <= at_q[None, :, None])",
        ("tests/model/test_attention.py",),
    ),
    Mutation(
        "admitted-step",
        "a request's arguments, worked out at admission, still follow its steps (seeded keys, min_new_tokens)",
        "engine/cb_arguments.py",
        "return [*self.arguments[:KEY], *r.step_values(self.sampling, step)]",
        "return self.arguments",
        ("tests/model/test_sampling.py", "-k", "worked_out or alone_among"),
    ),
    Mutation(
        "selected-rows",
        "a row's sampling filters and noise apply to it whatever else shares its step",
        "engine/rows.py",
        "return scores.index_copy(0, index, part)",
        "return scores",
        ("tests/model/test_request_features.py", "-k", "filters or every_sampler"),
    ),
)


def installed_package() -> Path:
    spec = importlib.util.find_spec("entity_llm_server")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("entity_llm_server is not installed in this interpreter")
    return Path(next(iter(spec.submodule_search_locations)))


def target(package: Path, mutation: Mutation) -> tuple[list[str], int]:
    """The module's lines and the index of the one `mutation` changes; exits if the code no longer matches."""
    lines = (package / mutation.path).read_text().splitlines(keepends=True)
    hits = [i for i, text in enumerate(lines) if text.strip() == mutation.line]
    if len(hits) != mutation.occurrences:
        raise SystemExit(
            f"{mutation.name}: {mutation.line!r} occurs {len(hits)} times in {mutation.path}, "
            f"not {mutation.occurrences}: update the mutation"
        )
    return lines, hits[mutation.occurrence]


def mutate(package: Path, mutation: Mutation) -> None:
    """Apply `mutation` to the copy of the package at `package`."""
    lines, index = target(package, mutation)
    text = lines[index]
    lines[index] = text[: len(text) - len(text.lstrip())] + mutation.mutant + "\n"
    (package / mutation.path).write_text("".join(lines))


def run(mutation: Mutation, source: Path, each: bool = False) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="entity-mutant-") as tmp:
        package = Path(tmp) / "entity_llm_server"
        shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__"))
        mutate(package, mutation)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        env.setdefault("HF_HUB_OFFLINE", "1")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *mutation.tests]
        if not each:
            command.append("-x")  # one failing test is enough to catch the mutant
        started = time.monotonic()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        seconds = round(time.monotonic() - started, 1)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    tail = [line[:160] for line in lines if line.startswith(("FAILED ", "ERROR tests"))] + lines[-1:]
    # pytest: 1 = tests failed (caught); 0 = all passed (survived); anything else = the run itself broke.
    verdict = {0: "SURVIVED", 1: "caught"}.get(done.returncode, f"error (pytest exit {done.returncode})")
    return {
        "name": mutation.name,
        "verdict": verdict,
        "seconds": seconds,
        "tests": " ".join(mutation.tests),
        "tail": tail,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these mutations (default: all)")
    parser.add_argument("--each", action="store_true", help="run every selected test, not only up to the first failure")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if unknown := set(args.names) - {m.name for m in MUTATIONS}:
        raise SystemExit(f"unknown mutations: {', '.join(sorted(unknown))}")
    source = installed_package()
    for mutation in chosen:  # every line must be found before anything runs
        target(source, mutation)
    results = []
    for mutation in chosen:
        result = run(mutation, source, args.each)
        results.append(result)
        print(f"{result['verdict']:>8}  {mutation.name:<22} {result['seconds']:>6}s  {mutation.promise}", flush=True)
        if result["verdict"] != "caught" or args.each:
            print("          " + "\n          ".join(result["tail"]), flush=True)  # type: ignore[arg-type]
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutants.json").write_text(json.dumps(results, indent=2) + "\n")
    caught = sum(r["verdict"] == "caught" for r in results)
    print(f"{caught} of {len(results)} mutations caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
