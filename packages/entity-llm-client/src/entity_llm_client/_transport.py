"""Method handles: betterproto2 messages on grpcio channels (sync and aio)."""

from __future__ import annotations

from typing import Any

import grpc

from ._gen.entity.grpc import GenerateRequest, GenerateResponse

SERVICE = "entity.grpc.LLMService"
GENERATE = f"/{SERVICE}/Generate"

# Clients keep long quiet streams alive with pings the server is set to accept.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


def generate_sync(channel: grpc.Channel) -> grpc.UnaryStreamMultiCallable[GenerateRequest, GenerateResponse]:
    return channel.unary_stream(
        GENERATE,
        request_serializer=GenerateRequest.SerializeToString,
        response_deserializer=GenerateResponse.FromString,
    )


def generate_aio(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryStreamMultiCallable[GenerateRequest, GenerateResponse]:
    return channel.unary_stream(
        GENERATE,
        request_serializer=GenerateRequest.SerializeToString,
        response_deserializer=GenerateResponse.FromString,
    )
