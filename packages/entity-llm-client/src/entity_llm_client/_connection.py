"""Opening channels: TLS and mutual TLS credentials, API-key metadata, channel options."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ._transport import SERVICE

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


# Resolvers whose names can stand for several servers (gRPC's naming doc).
_MANY = ("dns:", "xds:", "google-c2p:")
_SCHEMES = (*_MANY, "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def _family(address: str) -> int | None:
    """4 or 6 for an `ip:port` address (`[v6]:port` for IPv6), else None."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        return None
    if ip.version == 6 and not bracketed:
        return None
    return ip.version


def resolve_target(target: str | Sequence[str]) -> tuple[str, bool]:
    """The gRPC target for `target`, and whether it may name several servers.

    `target` is a gRPC target (`host:port`, `dns:///name:port`,
    `ipv4:10.0.0.1:50051,10.0.0.2:50051`, `xds:///name`, `unix:path`), or
    several `ip:port` addresses: a list, or one string with commas. A name
    that DNS may resolve to several servers is balanced only when written
    `dns:///name:port`: a plain `host:port` keeps to one connection.

    Raises:
        ValueError: an empty target, or a list that is not IP addresses of one family.
    """
    if isinstance(target, str):
        if target.startswith(_SCHEMES):
            return target, target.startswith(_MANY) or "," in target
        addresses = [a.strip() for a in target.split(",")] if "," in target else [target]
    else:
        addresses = list(target)
    if not addresses or not all(isinstance(a, str) and a for a in addresses):
        raise ValueError(f"target must name a server, got {target!r}")
    if len(addresses) == 1:
        return addresses[0], False
    families = {_family(a) for a in addresses}
    if None in families or len(families) != 1:
        raise ValueError(
            "a list of servers takes ip:port addresses of one family (10.0.0.1:50051, [::1]:50051); "
            f"for a name that resolves to several servers, use 'dns:///name:port' (got {addresses!r})"
        )
    return f"ipv{families.pop()}:{','.join(addresses)}", True


def service_config(*, retries: bool, balancing: bool, health_checks: bool) -> str | None:
    """The channel's gRPC service config (JSON), or None for gRPC's defaults.

    Retries are gRPC's own (gRFC A6, "When Retries are Valid"): an attempt
    may be retried only until the call is committed, and it commits when the
    client receives the server's response headers, which the server sends
    with its first message. So a Generate stream is retried only if it failed
    before its first token; one that has yielded text ends with the error,
    never replayed. UNAVAILABLE is retried (the server was unreachable or
    refused the call before doing anything for it) and, when balancing,
    RESOURCE_EXHAUSTED too (a full replica's refusal: another may have room),
    with up to 5 attempts, gRPC's most, since round_robin may pick a full
    replica again. Throttling stops retries once failed attempts outnumber
    successful calls by 5 (each failure costs a token, each success earns
    one back): a fleet where one replica of three is full keeps retrying, a
    fleet that refuses everything stops within a few calls.

    Balancing is gRPC's `round_robin` over every address the target resolves
    to, with client-side health checking (gRFC A17): a replica whose
    grpc.health.v1 status for the service is not SERVING gets no new calls,
    and a change of status reaches the client through `Health.Watch`.
    """
    config: dict[str, Any] = {}
    if retries:
        codes = ["UNAVAILABLE", *(["RESOURCE_EXHAUSTED"] if balancing else [])]
        policy = {
            "maxAttempts": 5 if balancing else 3,
            "initialBackoff": "0.2s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": codes,
        }
        config["methodConfig"] = [{"name": [{"service": SERVICE}], "retryPolicy": policy}]
        # 1.0, not 1: grpcio reads an integral tokenRatio as no ratio at all,
        # and then successes never earn tokens back (seen with grpcio 1.85).
        config["retryThrottling"] = {"maxTokens": 10, "tokenRatio": 1.0}
    if balancing:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        if health_checks:
            config["healthCheckConfig"] = {"serviceName": SERVICE}
    return json.dumps(config) if config else None


@dataclass(frozen=True, slots=True)
class Connection:
    """A client's channel.

    Attributes:
        channel: the grpcio channel (sync or aio).
        owned: the client opened it (and closes it).
        balanced: calls are spread over several servers by round_robin.
        target: the gRPC target it was opened to ("" for a channel given).
    """

    channel: Any
    owned: bool
    balanced: bool
    target: str = ""


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


def channel_options(
    overrides: ChannelOptions, retries: bool = True, balancing: bool = False, health_checks: bool = True
) -> list[tuple[str, Any]]:
    """The default channel options (with the service config that the switches make), `overrides`
    replacing same-named ones."""
    config = service_config(retries=retries, balancing=balancing, health_checks=health_checks)
    defaults = [
        *CHANNEL_OPTIONS,
        ("grpc.enable_retries", int(retries)),
        *([("grpc.service_config", config)] if config else []),
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
    balancing: bool = False,
    health_checks: bool = True,
) -> Any:
    """A sync or grpc.aio channel to `target`, TLS when `credentials` are given."""
    opts = channel_options(options, retries, balancing, health_checks)
    if aio:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=opts)
        return grpc.aio.secure_channel(target, credentials, options=opts)
    if credentials is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, credentials, options=opts)


def connect(
    target: str | Sequence[str],
    channel: Any,
    *,
    aio: bool,
    tls: bool,
    root_certificates: Pem | None,
    client_certificate: Pem | None,
    client_key: Pem | None,
    options: ChannelOptions,
    retries: bool,
    balancing: bool | None = None,
    health_checks: bool = True,
) -> Connection:
    """The client's channel: `channel` as given, or a new one to `target`.

    `balancing` None balances when the target may name several servers.
    """
    if channel is None:
        resolved, several = resolve_target(target)
        balanced = several if balancing is None else balancing
        credentials = channel_credentials(tls, root_certificates, client_certificate, client_key)
        opened = open_channel(
            resolved, credentials, options, aio=aio, retries=retries, balancing=balanced, health_checks=health_checks
        )
        return Connection(opened, owned=True, balanced=balanced, target=resolved)
    if tls or options or any(c is not None for c in (root_certificates, client_certificate, client_key)):
        raise ValueError("pass TLS settings and options, or a channel, not both")
    return Connection(channel, owned=False, balanced=False)
