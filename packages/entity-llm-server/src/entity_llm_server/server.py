"""Builds and runs the grpc.aio server: services, health, reflection, interceptors, TLS, drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._gen.entity.grpc import llm_pb2_grpc
from .auth import ApiKeys, load_api_keys
from .config import (
    ENGINE_STUCK_TIMEOUT,
    MAX_CONNECTION_AGE,
    MAX_CONNECTION_AGE_GRACE,
    STALLED_STREAM_TIMEOUT,
    ServerConfig,
)
from .drain import DrainGate
from .engine.core import settle
from .health import HEALTH_SERVICE, LLM_SERVICE, HealthMonitor
from .interceptors import OperationsInterceptor
from .metrics import Metrics
from .resource import UnifiedLLMResource
from .restarts import Restarts, restart
from .service import LLMService
from .shares import Shares
from .stalls import StalledStreams
from .tls import server_credentials
from .tracing import Tracing, otlp_provider, wanted
from .validation import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

# How long a drain waits, once every RPC's handler is done, for their last
# messages and status to go out before the remaining streams are cancelled.
FLUSH_GRACE = 1.0
# --on-engine-failure exit: the exit code, and the drain's longest grace (every
# Generate has failed already; this is for a Tokenize or GetModelInfo in flight).
ENGINE_FAILED = 3
ENGINE_FAILURE_GRACE = 2.0
# --on-engine-failure restart: --max-engine-restarts within this many seconds.
ENGINE_RESTART_WINDOW = 600.0

# Long generations can stream for minutes between client messages: accept
# client keepalive pings without counting them as abuse ("too many pings").
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    # Explicit, not grpcio's defaults (4 MiB in, unlimited out): a larger
    # request gets RESOURCE_EXHAUSTED before it is read into memory.
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # gRPC sets SO_REUSEPORT by default, letting a second server silently share
    # a port that is already serving; fail to bind instead.
    ("grpc.so_reuseport", 0),
]


def printable_host(host: str) -> str:
    """`host` as it goes before `:port` in an address: an IPv6 literal in brackets ("[::]"), any
    other host as it is, so that the address printed is one a client can dial."""
    bare = host.strip("[]")
    return f"[{bare}]" if ":" in bare else bare


def server_options(
    max_connection_age: float = MAX_CONNECTION_AGE, max_connection_age_grace: float = MAX_CONNECTION_AGE_GRACE
) -> list[tuple[str, int]]:
    """SERVER_OPTIONS with a maximum connection age (seconds; 0: connections live on) and its grace."""
    if not max_connection_age:
        return list(SERVER_OPTIONS)
    return [
        *SERVER_OPTIONS,
        ("grpc.max_connection_age_ms", round(max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", round(max_connection_age_grace * 1000)),
    ]


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Listen on `address` (TLS with `credentials`); the port, which `:0` picks, or OSError."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"could not bind {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port


def build_server(service: LLMService) -> grpc.aio.Server:
    """A bare grpc.aio server with LLMService registered and no ports bound yet.

    For embedding LLMService beside other services; `LLMServer` adds health,
    reflection, API keys, draining, metrics and request ids.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    llm_pb2_grpc.add_LLMServiceServicer_to_server(service, server)
    return server


class LLMServer:
    """LLMService on a grpc.aio server, with what running it in production takes.

    Registers `grpc.health.v1.Health` (`health`) and server reflection, and
    routes every RPC through one interceptor for request ids, API keys, the
    drain, undecodable requests, metrics (`metrics`) and access logs.
    `add_health_port` serves the health service alone on a port of its own.

    Args:
        service: the servicer.
        api_keys: accepted API keys; empty: calls need no key.
        health_check_interval: seconds between two looks at the engine's health.
        engine_stuck_timeout: seconds an engine may stay stalled (stuck, or
            its process not answering) before `health.engine_failed` is set.
        options: grpc.aio server options.
        token_timings: time each Generate message for the TTFT and
            inter-token histograms (the console script turns it on with
            --metrics-port only).
        tracing: trace every RPC but health checks with OpenTelemetry
            (`Tracing(tracer_provider)`); None traces nothing.
        max_streams_per_key: Generate streams one API key may hold at once
            (0: no limit); more get RESOURCE_EXHAUSTED.
        max_streams_per_peer: the same for one client host.
        stalled_stream_timeout: seconds a Generate stream may wait for its
            client to read before it is ended (`stalls.py`); 0: never.
    """

    def __init__(
        self,
        service: LLMService,
        *,
        api_keys: Sequence[str] = (),
        health_check_interval: float = 1.0,
        engine_stuck_timeout: float = ENGINE_STUCK_TIMEOUT,
        options: Sequence[tuple[str, Any]] = SERVER_OPTIONS,
        token_timings: bool = True,
        tracing: Tracing | None = None,
        max_streams_per_key: int = 0,
        max_streams_per_peer: int = 0,
        stalled_stream_timeout: float = STALLED_STREAM_TIMEOUT,
    ) -> None:
        self.service = service
        self.tracing = tracing
        self.health = HealthMonitor(service, interval=health_check_interval, stuck_timeout=engine_stuck_timeout)
        self.gate = DrainGate()
        self.metrics = Metrics(engine_load=self._engine_load, engine_cores=self._engine_cores)
        self.stalls = (
            StalledStreams(stalled_stream_timeout, self.metrics.stalled_streams.inc) if stalled_stream_timeout else None
        )
        interceptor = OperationsInterceptor(
            api_keys=ApiKeys(api_keys),
            gate=self.gate,
            metrics=self.metrics,
            token_timings=token_timings,
            tracing=tracing,
            shares=Shares(max_streams_per_key, max_streams_per_peer),
            stalls=self.stalls,
        )
        self.grpc_server = grpc.aio.server(options=list(options), interceptors=[interceptor])
        llm_pb2_grpc.add_LLMServiceServicer_to_server(service, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.grpc_server)
        reflection.enable_server_reflection((LLM_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self.grpc_server)
        self.health_server: grpc.aio.Server | None = None

    def _engine_load(self) -> tuple[int, int] | None:
        engine = self.service.current_engine
        return None if engine is None else engine.occupancy()

    def _engine_cores(self) -> list[tuple[int, bool]] | None:
        engine = self.service.current_engine
        per_core = getattr(engine, "per_core", None)  # engines with cores (FakeEngine has none)
        return None if per_core is None else list(per_core())

    def add_port(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        """Listen on `address` (TLS with `credentials`); return the port, which `:0` picks.

        Raises:
            OSError: the address cannot be bound.
        """
        return _bind(self.grpc_server, address, credentials)

    def add_health_port(self, address: str) -> int:
        """Serve grpc.health.v1 alone, in plaintext, on `address`; return the port (`:0` picks one).

        For probes that cannot present a client certificate (Kubernetes'
        gRPC probes) when the main port requires mutual TLS: the health
        service tells nothing a caller could misuse. Its statuses are the
        main port's, through the drain.

        Raises:
            OSError: the address cannot be bound.
        """
        if self.health_server is None:
            self.health_server = grpc.aio.server(options=SERVER_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.health_server)
        return _bind(self.health_server, address, None)

    def add_insecure_port(self, address: str) -> int:
        """`add_port` without TLS (grpc.aio.Server's name for it)."""
        return self.add_port(address)

    def serve_metrics(self, host: str, port: int) -> int:
        """Serve Prometheus metrics at http://host:port/metrics; return the port (0 picks one).

        Raises:
            OSError: the address cannot be bound.
        """
        try:
            return self.metrics.serve(host, port)
        except OSError as exc:
            raise OSError(f"could not serve metrics on {host}:{port}: {exc}") from exc

    async def start(self) -> None:
        """Publish the health status, start its watcher, and start serving."""
        await self.health.start()
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server.start()

    async def stop(self, grace: float | None) -> None:
        """Drain, then stop.

        Health turns NOT_SERVING, new RPCs get UNAVAILABLE ("server is
        shutting down"), and RPCs in flight get `grace` seconds to finish;
        what is left then (health Watch streams, stragglers) is cancelled.
        """
        grace = grace or 0.0
        await self.health.drain()
        self.gate.close()
        if self.gate.in_flight:
            log.info("draining: %d RPCs in flight get %.1fs to finish", self.gate.in_flight, grace)
        loop = asyncio.get_running_loop()
        started = loop.time()
        if await self.gate.wait_idle(grace):
            # Their handlers are done; let grpcio send their last messages and status.
            remaining = min(FLUSH_GRACE, max(0.0, grace - (loop.time() - started)))
        else:
            log.warning("drain over (grace spent, or a second signal): cancelling %d RPCs", self.gate.in_flight)
            remaining = 0.0
        await self.grpc_server.stop(remaining)
        if self.health_server is not None:  # probes read NOT_SERVING until the very end
            await self.health_server.stop(0)
        await self.health.stop()
        if self.stalls is not None:
            await self.stalls.close()
        self.metrics.close()

    async def wait_for_termination(self) -> None:
        """Wait until the server stops."""
        await self.grpc_server.wait_for_termination()


async def serve(config: ServerConfig, *, ready: asyncio.Event | None = None) -> int:
    """Load the model, serve until SIGTERM/SIGINT, drain, and return an exit code."""
    # Settings that can be wrong fail now, before a model loads for minutes.
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    api_keys = load_api_keys(config.api_key_file) if config.api_key_file else ()
    tracing = Tracing(otlp_provider(config.otlp_endpoint)) if wanted(config.otlp_endpoint) else None
    try:
        return await _serve(config, credentials, api_keys, tracing, ready)
    finally:
        if tracing is not None:  # export the last spans (the exporter blocks while it flushes)
            await asyncio.to_thread(tracing.shutdown)


async def _serve(
    config: ServerConfig,
    credentials: grpc.ServerCredentials | None,
    api_keys: Sequence[str],
    tracing: Tracing | None,
    ready: asyncio.Event | None,
) -> int:
    resource = UnifiedLLMResource(
        config.model,
        device=config.device,
        dtype=config.dtype,
        default_max_new_tokens=config.max_new_tokens,
        max_prompt_logprobs_tokens=config.max_prompt_logprobs_tokens,
        engine=config.engine,
        batching=config.batching(),
        engine_process=config.engine_process == "on",
        engine_replicas=config.engine_replicas,
        tensor_parallel=config.tensor_parallel,
        trust_remote_code=config.trust_remote_code == "on",
        log_level=config.log_level,
        log_format=config.log_format,
    )
    service = LLMService(resource, restarts=config.on_engine_failure == "restart")
    server = LLMServer(
        service,
        api_keys=api_keys,
        health_check_interval=config.health_check_interval,
        engine_stuck_timeout=config.engine_stuck_timeout,
        options=server_options(config.max_connection_age, config.max_connection_age_grace),
        token_timings=bool(config.metrics_port),
        tracing=tracing,
        max_streams_per_key=config.max_streams_per_key,
        max_streams_per_peer=config.max_streams_per_peer,
        stalled_stream_timeout=config.stalled_stream_timeout,
    )
    host = printable_host(config.host)
    # Bind first: a taken port fails in a moment, not after loading a model.
    port = server.add_port(f"{config.host}:{config.port}", credentials)
    # Signals are handled from now on, the model's load included: as a
    # container's PID 1 the process would otherwise ignore SIGTERM until then.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        metrics_port = server.serve_metrics(config.host, config.metrics_port) if config.metrics_port else None
        health_port = server.add_health_port(f"{config.host}:{config.health_port}") if config.health_port else None
        # Open the port while the model loads: health probes get NOT_SERVING
        # (not a refused connection) until it is loaded and warmed up, and a
        # call that comes early waits for the load.
        await server.start()
        loading = asyncio.ensure_future(service.engine())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((loading, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not loading.done():
            loading.cancel()
            log.info("stopped before the model had loaded")
            await server.stop(0)
            await resource.close()
            return 0
        info = loading.result().info()
        settle()
        await server.health.update()  # SERVING now, not at the watcher's next look
    except BaseException:
        await server.stop(0)
        server.metrics.close()
        await resource.close()  # stop any engine thread before the process exits
        raise
    # The one line scripts and tests read to find the port.
    print(f"entity-llm-server listening on {host}:{port}", flush=True)
    log.info(
        "serving %s on %s:%d (%s engine; %s%s)",
        resource.model_id,
        host,
        port,
        info.engine,
        "plaintext" if credentials is None else ("mutual TLS" if config.tls_client_ca else "TLS"),
        f", {len(api_keys)} API keys" if api_keys else "",
    )
    if metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", host, metrics_port)
    if health_port is not None:
        log.info("health (grpc.health.v1 alone, plaintext) on %s:%d", host, health_port)
    if tracing is not None:
        log.info("tracing: spans go to %s over OTLP", config.otlp_endpoint or "the OTEL_EXPORTER_OTLP_* endpoint")
    if config.max_new_tokens > info.max_max_new_tokens:
        log.warning(
            "--max-new-tokens %d is more than the model's %d-token context allows: "
            "requests that leave max_new_tokens unset get at most %d",
            config.max_new_tokens,
            info.context_length,
            info.default_max_new_tokens,
        )
    if ready is not None:
        ready.set()
    waiter = asyncio.create_task(server.wait_for_termination())
    stopped = asyncio.create_task(stop.wait())
    restarts = Restarts(config.max_engine_restarts, ENGINE_RESTART_WINDOW)
    watching = config.on_engine_failure in ("exit", "restart")
    while True:
        failed = asyncio.create_task(server.health.engine_failed.wait()) if watching else None
        await asyncio.wait([waiter, stopped, *([failed] if failed else [])], return_when=asyncio.FIRST_COMPLETED)
        if failed is None or not failed.done():
            if failed is not None:
                failed.cancel()
            break
        if config.on_engine_failure == "restart" and restarts.allow():
            log.error("the engine has failed: loading it again in %.1fs", restarts.backoff)
            try:
                await restart(service, server.health, server.metrics, restarts.backoff)
                continue
            except Exception:
                log.exception("the engine could not be loaded again")
        elif config.on_engine_failure == "restart":
            log.error("the engine failed %d times in %.0fs: giving up", restarts.limit + 1, restarts.window)
        # Every Generate already ends INTERNAL; what may be left in flight is
        # quick (Tokenize, GetModelInfo) or endless (health Watch streams).
        log.error("the engine has failed: exiting (code %d) for a supervisor to restart the server", ENGINE_FAILED)
        await server.stop(min(config.shutdown_grace, ENGINE_FAILURE_GRACE))
        await resource.close()
        return ENGINE_FAILED
    log.info("shutting down; in-flight streams get %.1fs (signal again to stop now)", config.shutdown_grace)

    def hurry() -> None:
        log.warning("second signal: cancelling the RPCs still in flight")
        server.gate.cut()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, hurry)
    await server.stop(config.shutdown_grace)
    await resource.close()
    print("entity-llm-server stopped", file=sys.stderr, flush=True)
    return 0
