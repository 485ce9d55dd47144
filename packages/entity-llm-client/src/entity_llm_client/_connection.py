"""Opening channels: TLS and mutual TLS credentials, API-key metadata, channel options."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

# PEM data as bytes, or the path of a PEM file.
Pem = bytes | str | os.PathLike[str]
ChannelOptions = Sequence[tuple[str, Any]]

# Keepalive the server accepts (it allows pings 5 s apart and never counts
# them as abuse): a ping after 30 s without traffic finds a dead connection in
# a long, quiet stream; pings continue while a stream waits for data.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


# Retries are gRPC's own (gRFC A6, "When Retries are Valid"): an attempt may be
# retried only until the call is committed, and it commits when the client
# receives the server's response headers, which a gRPC server sends with its
# first message. So a Generate stream is retried only if it failed before its
# first token; one that has yielded text ends with the error, never replayed.
# Only UNAVAILABLE is retried: the server was unreachable or refused the call
# before doing anything for it. Throttling stops retries while most calls fail.
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "entity.grpc.LLMService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
)


def _pem(source: Pem | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def channel_credentials(
    tls: bool, root_certificates: Pem | None, client_certificate: Pem | None, client_key: Pem | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext (no TLS asked for and no certificate given)."""
    if (client_certificate is None) != (client_key is None):
        raise ValueError("client_certificate and client_key go together")
    if not (tls or root_certificates is not None or client_certificate is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates),
        private_key=_pem(client_key),
        certificate_chain=_pem(client_certificate),
    )


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that presents `api_key` to the server."""
    if api_key is None:
        return ()
    if not api_key or not all("!" <= c <= "~" for c in api_key):
        raise ValueError("api_key must be non-empty printable ASCII, without spaces (it travels in a header)")
    return (("authorization", f"Bearer {api_key}"),)


def channel_options(overrides: ChannelOptions, retries: bool = True) -> list[tuple[str, Any]]:
    """The default channel options (with the retry policy or retries off), `overrides` replacing same-named ones."""
    defaults = [
        *CHANNEL_OPTIONS,
        *(
            [("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG)]
            if retries
            else [("grpc.enable_retries", 0)]
        ),
    ]
    given = dict(overrides)
    return [(name, value) for name, value in defaults if name not in given] + list(given.items())


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    options: ChannelOptions,
    *,
    aio: bool,
    retries: bool = True,
) -> Any:
    """A sync or grpc.aio channel to `target`, TLS when `credentials` are given."""
    opts = channel_options(options, retries)
    if aio:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=opts)
        return grpc.aio.secure_channel(target, credentials, options=opts)
    if credentials is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, credentials, options=opts)


def connect(
    target: str,
    channel: Any,
    *,
    aio: bool,
    tls: bool,
    root_certificates: Pem | None,
    client_certificate: Pem | None,
    client_key: Pem | None,
    options: ChannelOptions,
    retries: bool,
) -> tuple[Any, bool]:
    """The client's channel and whether the client owns it: `channel` as given, or a new one."""
    if channel is None:
        credentials = channel_credentials(tls, root_certificates, client_certificate, client_key)
        return open_channel(target, credentials, options, aio=aio, retries=retries), True
    if tls or options or any(c is not None for c in (root_certificates, client_certificate, client_key)):
        raise ValueError("pass TLS settings and options, or a channel, not both")
    return channel, False
