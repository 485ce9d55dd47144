"""Server configuration: command-line flags and ENTITY_LLM_* variables, in one place.

Every flag `--some-flag` can also be set by `ENTITY_LLM_SOME_FLAG`; a flag
given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .engine import DEFAULT_MAX_NEW_TOKENS, BatchingSettings
from .engine.inputs import MAX_PROMPT_LOGPROBS_TOKENS
from .engine.launcher import placement
from .logs import LOG_FORMATS
from .resource import DTYPES, ENGINES

ENV_PREFIX = "ENTITY_LLM_"

# A client resolves a name (dns:///) again only when a connection closes: a
# maximum connection age makes each client reconnect now and then, and so find
# replicas that started after it connected. The grace is what a stream
# running on a connection at its GOAWAY gets to finish: long, since a long
# generation on a CPU runs for many minutes, and an old connection that only
# carries such streams costs nothing.
MAX_CONNECTION_AGE = 300.0
# A Generate stream whose client has not read for this long (its flow-control
# window full) is ended, so that it frees its place (--stalled-stream-timeout).
STALLED_STREAM_TIMEOUT = 60.0
# An engine that has not run for this long (stuck, or its process stopped) has
# failed: --on-engine-failure decides what follows (--engine-stuck-timeout).
ENGINE_STUCK_TIMEOUT = 60.0
MAX_CONNECTION_AGE_GRACE = 3600.0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the server is configured by.

    Attributes:
        model: a model folder or hub id; None serves the embedded default model.
        host: the interface to listen on.
        port: the TCP port; 0 picks a free one (the server prints it).
        device: torch device for the model.
        dtype: model weights' dtype (`auto` or a torch dtype name).
        max_new_tokens: the generation length when a request leaves it unset.
        shutdown_grace: seconds in-flight streams get to finish on SIGTERM/SIGINT.
        log_level: Python logging level name.
        engine: `auto` (continuous batching where its start-up probe runs on
            the model, else padded batches), `batching` (continuous
            batching, or exit if it cannot run the model), `padded` (padded
            batches on the model's own cache) or `sequential`.
        max_batch_size: sequences decoded together in one step.
        max_queue: admitted requests that may wait beyond those; more are
            refused with RESOURCE_EXHAUSTED.
        kv_cache_tokens: KV-cache capacity in tokens (0: sized from the batch).
        kv_block_size: tokens per KV-cache block.
        max_batch_tokens: tokens per forward pass (0: 256 on CPU, 2048 on GPU).
        cuda_graphs: `auto` (on CUDA devices), `on` or `off`. Graphs multiply
            GPU throughput; every sampling feature works either way.
        max_prompt_logprobs_tokens: the longest prompt a request may ask
            prompt_logprobs of (the scoring's work and reply grow with it);
            longer ones are INVALID_ARGUMENT.
        prefix_caching: `on` lets requests whose prompts begin alike share
            the KV blocks of that beginning (prefilled once); `off` computes
            every prompt in full.
        attention: continuous batching's attention: `sdpa` (transformers'
            own, with a mask over the step's whole batch) or `varlen` (each
            sequence over its own keys, no batch mask: torch's FlashAttention
            kernel on CUDA in half precision, plain PyTorch elsewhere).
        log_format: `text` lines or `json` lines (one object per record).
        tls_cert: PEM certificate chain; with `tls_key`, the port speaks TLS.
        tls_key: PEM private key of `tls_cert`.
        tls_client_ca: PEM CA certificates; set, clients must present a
            certificate signed by one of them (mutual TLS).
        api_key_file: a file of accepted API keys, one per line (`#`
            comments and blank lines ignored); set, calls must send
            `authorization: Bearer <key>` (the health service excepted).
        max_streams_per_key: Generate streams one API key may hold at once
            (0: no limit); a caller over its share gets RESOURCE_EXHAUSTED
            naming the limit while others are admitted.
        max_streams_per_peer: the same for one client host (its address).
        stalled_stream_timeout: seconds a Generate stream may wait for its
            client to read (flow control full) before it is ended, freeing
            its place (the client then reads RESOURCE_EXHAUSTED); 0: never.
        metrics_port: port of the Prometheus `/metrics` endpoint on `host`;
            0 serves no metrics.
        health_check_interval: seconds between two looks at the engine's
            health (a failed engine turns the health service NOT_SERVING).
        engine_process: `on` runs the batching engine's model in a process of
            its own, so token streaming and the batching loop do not share a
            GIL; `off` keeps it in the server's process.
        engine_replicas: engine processes behind the one front end, each
            with its own batching loop and copy of the model (`device` may
            list one device per replica).
        tensor_parallel: engine processes (ranks) that split one copy of the
            model with transformers' tensor parallelism and run one batching
            loop in lock-step; with replicas, per replica. `device` then gives
            a device type (`cuda`: ranks take cuda:0, cuda:1, ...) or one
            device per process. The model's attention heads must divide by it.
        trust_remote_code: `on` runs the Python code a model folder ships for
            its architecture (`auto_map`); that code runs with the server's
            rights, so allow it only for folders you trust.
        health_port: a plaintext port serving grpc.health.v1 alone on
            `host`, for probes that cannot present a client certificate
            (Kubernetes' gRPC probes with --tls-client-ca); 0: none.
        max_connection_age: seconds after which the server asks a client
            to reconnect (with jitter), so that clients resolve the service's
            name again and find new replicas; 0: connections live on.
        max_connection_age_grace: seconds the streams of such a connection
            get to finish before it is closed.
        otlp_endpoint: an OTLP/gRPC collector (`http://collector:4317`) to
            export a trace span for each RPC and its phases to; unset, the
            standard `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` variables decide
            (neither set: no tracing, at no cost). Needs the `tracing` extra.
        on_engine_failure: `stay` keeps the process up once the engine has
            failed (health NOT_SERVING, every Generate INTERNAL) for an
            orchestrator's probe to restart it; `exit` ends the process with
            code 3, for a supervisor (systemd, a container restart policy);
            `restart` loads the engine again (NOT_SERVING meanwhile), with a
            backoff, up to `max_engine_restarts` times in 10 minutes, then
            exits with code 3.
        max_engine_restarts: restarts `restart` makes within 10 minutes.
        engine_stuck_timeout: seconds an engine may go without running
            while it holds requests (or, in its own process, without
            answering) before it counts as failed; after 10 s it is
            NOT_SERVING already, and may recover until then. 0: never.
    """

    model: str | None = None
    host: str = "[::]"
    port: int = 50051
    device: str = "cpu"
    dtype: str = "auto"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    shutdown_grace: float = 10.0
    log_level: str = "INFO"
    engine: str = "auto"
    max_batch_size: int = 32
    max_queue: int = 64
    kv_cache_tokens: int = 0
    kv_block_size: int = 16
    max_batch_tokens: int = 0
    cuda_graphs: str = "auto"
    prefix_caching: str = "on"
    attention: str = "sdpa"
    max_prompt_logprobs_tokens: int = MAX_PROMPT_LOGPROBS_TOKENS
    log_format: str = "text"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    api_key_file: str | None = None
    max_streams_per_key: int = 0
    max_streams_per_peer: int = 0
    stalled_stream_timeout: float = STALLED_STREAM_TIMEOUT
    metrics_port: int = 0
    health_port: int = 0
    max_connection_age: float = MAX_CONNECTION_AGE
    max_connection_age_grace: float = MAX_CONNECTION_AGE_GRACE
    otlp_endpoint: str | None = None
    health_check_interval: float = 1.0
    engine_process: str = "on"
    engine_replicas: int = 1
    tensor_parallel: int = 1
    trust_remote_code: str = "off"
    on_engine_failure: str = "stay"
    max_engine_restarts: int = 3
    engine_stuck_timeout: float = ENGINE_STUCK_TIMEOUT

    def batching(self) -> BatchingSettings:
        """The batching engine's settings."""
        return BatchingSettings(
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
            kv_block_size=self.kv_block_size,
            kv_cache_tokens=self.kv_cache_tokens,
            max_batch_tokens=self.max_batch_tokens,
            cuda_graphs=None if self.cuda_graphs == "auto" else self.cuda_graphs == "on",
            prefix_caching=self.prefix_caching == "on",
            attention=self.attention,
        )


def _bounded(kind: Callable[[str], float], low: float, high: float = float("inf")) -> Callable[[str], Any]:
    """An argparse type: `kind(text)` within [low, high], or a message saying the range."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            upper = "" if high == float("inf") else f" and ≤ {high:g}"
            raise argparse.ArgumentTypeError(f"must be ≥ {low:g}{upper}, not {value:g}")
        return value

    return parse


_positive_int = _bounded(int, 1)
_non_negative_int = _bounded(int, 0)
_port = _bounded(int, 0, 65535)
_non_negative_float = _bounded(float, 0)
_positive_float = _bounded(float, 0.001)


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The console script's argument parser, with defaults from `env`."""
    env = os.environ if env is None else env
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="entity-llm-server",
        description="Serve a Hugging Face causal LM over gRPC (entity.grpc.LLMService).",
        epilog=f"Every flag can also be set by an environment variable: --max-new-tokens by {ENV_PREFIX}MAX_NEW_TOKENS",
    )

    def add(flag: str, *, type: Callable[[str], Any] = str, help: str, **kwargs: Any) -> None:
        name = flag.removeprefix("--").replace("-", "_")
        default = env.get(ENV_PREFIX + name.upper(), getattr(defaults, name))
        parser.add_argument(flag, type=type, default=default, help=f"{help} (default: %(default)s)", **kwargs)

    add("--model", help="model folder or hub id; unset serves the embedded default model")
    add("--host", help="interface to listen on")
    add("--port", type=_port, help="TCP port; 0 picks a free one")
    add("--device", help="torch device: cpu, cuda, cuda:N, mps")
    add("--dtype", choices=DTYPES, help="weights dtype")
    add("--max-new-tokens", type=_positive_int, help="generation length when a request leaves it unset")
    add("--shutdown-grace", type=_non_negative_float, help="seconds in-flight streams get to finish on SIGTERM")
    add("--log-level", help="logging level")
    add(
        "--engine",
        choices=ENGINES,
        help="auto: continuous batching where a start-up probe proves it runs the model, else padded batches; "
        "batching: continuous batching or exit; padded: padded batches on the model's own cache (any causal LM); "
        "sequential: one request at a time",
    )
    add(
        "--engine-process",
        choices=("on", "off"),
        help="on: continuous or padded batching runs the model in a child process (the gRPC loop keeps its own GIL)",
    )
    add(
        "--engine-replicas",
        type=_positive_int,
        help="engine processes behind one front end, each with its own copy of the model; requests go to the "
        "least loaded (--device may list one device per replica: cuda:0,cuda:1)",
    )
    add(
        "--tensor-parallel",
        type=_positive_int,
        help="engine processes that split one copy of the model (tensor parallelism: gloo on CPU, NCCL on CUDA); "
        "with --engine-replicas, per replica (--device: cuda gives the ranks cuda:0, cuda:1, ..., or list one each)",
    )
    add(
        "--trust-remote-code",
        choices=("on", "off"),
        nargs="?",
        const="on",
        help="run the Python code a model folder ships for its architecture (auto_map); it runs with the "
        "server's rights: only for folders you trust",
    )
    add("--max-batch-size", type=_positive_int, help="sequences decoded together in one step")
    add(
        "--max-queue",
        type=_non_negative_int,
        help="requests that may wait beyond the batch; more get RESOURCE_EXHAUSTED",
    )
    add("--kv-cache-tokens", type=_non_negative_int, help="KV-cache capacity in tokens; 0 sizes it from the batch")
    add("--kv-block-size", type=_positive_int, help="tokens per KV-cache block")
    add("--max-batch-tokens", type=_non_negative_int, help="tokens per forward pass; 0: 256 on CPU, 2048 on GPU")
    add(
        "--cuda-graphs",
        choices=("auto", "on", "off"),
        help="capture CUDA graphs (auto: on CUDA devices)",
    )
    add(
        "--max-prompt-logprobs-tokens",
        type=_bounded(int, 0, 16384),
        help="the longest prompt a request may ask prompt_logprobs of (at most 16384; longer: INVALID_ARGUMENT)",
    )
    add(
        "--prefix-caching",
        choices=("on", "off"),
        help="share the KV blocks of prompts that begin alike, prefilled once (on) or compute every prompt (off)",
    )
    add(
        "--attention",
        choices=("sdpa", "varlen"),
        help="continuous batching's attention: sdpa, with a mask over the step's whole batch; varlen, each "
        "sequence over its own keys with no batch mask (torch's FlashAttention kernel on CUDA in fp16/bf16)",
    )
    add("--log-format", choices=LOG_FORMATS, help="text lines, or JSON lines (one object per record)")
    add("--tls-cert", help="PEM certificate chain; with --tls-key the port speaks TLS")
    add("--tls-key", help="PEM private key of --tls-cert")
    add("--tls-client-ca", help="PEM CA certificates: clients must present a certificate they signed (mutual TLS)")
    add(
        "--api-key-file",
        help="accepted API keys, one per line; calls must send 'authorization: Bearer <key>' (health excepted)",
    )
    add(
        "--max-streams-per-key",
        type=_non_negative_int,
        help="Generate streams one API key may hold at once; more get RESOURCE_EXHAUSTED; 0: no limit",
    )
    add(
        "--max-streams-per-peer",
        type=_non_negative_int,
        help="Generate streams one client host may hold at once; more get RESOURCE_EXHAUSTED; 0: no limit",
    )
    add(
        "--stalled-stream-timeout",
        type=_non_negative_float,
        help="seconds a Generate stream may wait for its client to read before it is ended, freeing its place "
        "(the client reads RESOURCE_EXHAUSTED); 0: never",
    )
    add("--metrics-port", type=_port, help="serve Prometheus metrics on http://HOST:PORT/metrics; 0: off")
    add(
        "--health-port",
        type=_port,
        help="also serve grpc.health.v1 alone, in plaintext, on this port (probes that cannot present a client "
        "certificate); 0: off",
    )
    add(
        "--max-connection-age",
        type=_non_negative_float,
        help="seconds (±10%%) before a client is asked to reconnect (and so re-resolve the service's name and find "
        "new replicas); running streams get --max-connection-age-grace to finish; 0: never",
    )
    add(
        "--max-connection-age-grace",
        type=_non_negative_float,
        help="seconds the streams of such a connection get to finish before it closes",
    )
    add(
        "--otlp-endpoint",
        help="export OpenTelemetry trace spans (one per RPC and per phase) to this OTLP/gRPC collector, e.g. "
        "http://collector:4317; unset: the OTEL_EXPORTER_OTLP_* variables decide (none: no tracing)",
    )
    add("--health-check-interval", type=_positive_float, help="seconds between two looks at the engine's health")
    add(
        "--on-engine-failure",
        choices=("stay", "exit", "restart"),
        help="once the engine has failed: stay up reporting NOT_SERVING, exit with code 3 for a supervisor, or "
        "restart it (NOT_SERVING meanwhile; past --max-engine-restarts in 10 minutes, exit with code 3)",
    )
    add(
        "--max-engine-restarts",
        type=_positive_int,
        help="with --on-engine-failure restart: restarts allowed within 10 minutes before the server gives up",
    )
    add(
        "--engine-stuck-timeout",
        type=_non_negative_float,
        help="seconds an engine may hold requests without running a step (or its process go unanswered) before it "
        "counts as failed (--on-engine-failure applies); it is NOT_SERVING after 10 s; 0: never",
    )
    return parser


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Parse flags (and the environment) into a ServerConfig."""
    parser = build_parser(env)
    args = parser.parse_args(argv)
    # argparse checks `choices` only for values on the command line, not for
    # defaults, which is where ENTITY_LLM_* values arrive.
    for action in parser._actions:  # argparse has no public list of its actions
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            variable = ENV_PREFIX + action.dest.upper()
            parser.error(f"{variable}={value}: not one of {', '.join(map(str, action.choices))}")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if args.engine_replicas > 1 and (args.engine_process != "on" or args.engine == "sequential"):
        parser.error("--engine-replicas above 1 needs continuous or padded batching and --engine-process on")
    if args.tensor_parallel > 1 and (args.engine_process != "on" or args.engine not in ("auto", "batching")):
        parser.error("--tensor-parallel above 1 needs continuous batching and --engine-process on")
    try:
        placement(args.device, args.engine_replicas, args.tensor_parallel)
    except ValueError as exc:
        parser.error(f"--{exc}")
    # argparse applies `type` to string defaults taken from the environment too.
    return ServerConfig(**vars(args))
