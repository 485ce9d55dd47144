"""Builds and runs the grpc.aio server: services, options, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import grpc

from ._gen.entity.grpc import llm_pb2_grpc
from .config import ServerConfig
from .resource import UnifiedLLMResource
from .service import LLMService

log = logging.getLogger(__name__)

# Long generations can stream for minutes between client messages: accept
# client keepalive pings without counting them as abuse ("too many pings").
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    # gRPC sets SO_REUSEPORT by default, letting a second server silently share
    # a port that is already serving; fail to bind instead.
    ("grpc.so_reuseport", 0),
]


def build_server(service: LLMService) -> grpc.aio.Server:
    """A grpc.aio server with LLMService registered and no ports bound yet."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    llm_pb2_grpc.add_LLMServiceServicer_to_server(service, server)
    return server


async def serve(config: ServerConfig, *, ready: asyncio.Event | None = None) -> int:
    """Load the model, serve until SIGTERM/SIGINT, drain, and return an exit code."""
    resource = UnifiedLLMResource(
        config.model,
        device=config.device,
        dtype=config.dtype,
        default_max_new_tokens=config.max_new_tokens,
        engine=config.engine,
        batching=config.batching(),
    )
    service = LLMService(resource)
    server = build_server(service)
    address = f"{config.host}:{config.port}"
    # Bind first: a taken port fails in a moment, not after loading a model.
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"could not bind {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"could not bind {address}")
    try:
        await service.engine()  # load before accepting traffic
    except BaseException:
        await resource.close()  # stop any engine thread before the process exits
        raise
    await server.start()
    host = config.host.strip("[]")
    # The one line scripts and tests read to find the port.
    print(f"entity-llm-server listening on {host}:{port}", flush=True)
    log.info("serving %s on %s:%d", resource.model_id, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    waiter = asyncio.create_task(server.wait_for_termination())
    await asyncio.wait([waiter, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down; in-flight streams get %.1fs", config.shutdown_grace)
    await server.stop(config.shutdown_grace)
    await resource.close()
    print("entity-llm-server stopped", file=sys.stderr, flush=True)
    return 0
