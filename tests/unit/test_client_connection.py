"""The client's connection settings: TLS arguments, API-key metadata, channel options."""

from __future__ import annotations

import json

import grpc
import pytest

from entity_llm_client import AsyncLLMClient, LLMClient
from entity_llm_client._connection import (
    CHANNEL_OPTIONS,
    SERVICE_CONFIG,
    auth_metadata,
    channel_credentials,
    channel_options,
)


def test_options_override_the_defaults_by_name():
    merged = dict(channel_options([("grpc.keepalive_time_ms", 1_000), ("grpc.primary_user_agent", "me")]))
    assert merged["grpc.keepalive_time_ms"] == 1_000
    assert merged["grpc.primary_user_agent"] == "me"
    assert merged["grpc.keepalive_timeout_ms"] == dict(CHANNEL_OPTIONS)["grpc.keepalive_timeout_ms"]
    defaults = channel_options([])
    assert defaults == [*CHANNEL_OPTIONS, ("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG)]
    # The README's promise: UNAVAILABLE, and only it, is retried, up to 3 attempts.
    (method,) = json.loads(SERVICE_CONFIG)["methodConfig"]
    assert method["name"] == [{"service": "entity.grpc.LLMService"}]
    assert (method["retryPolicy"]["maxAttempts"], method["retryPolicy"]["retryableStatusCodes"]) == (3, ["UNAVAILABLE"])
    assert channel_options([], retries=False) == [*CHANNEL_OPTIONS, ("grpc.enable_retries", 0)]


def test_api_key_metadata():
    assert auth_metadata(None) == ()
    assert auth_metadata("k-1") == (("authorization", "Bearer k-1"),)
    # A header value: printable ASCII only ("é" once went out and came back INTERNAL).
    for bad in ("", "two words", "tab\there", "clé", "k\x7f"):
        with pytest.raises(ValueError, match="api_key"):
            auth_metadata(bad)


def test_tls_is_off_unless_asked_for_or_implied_by_a_certificate(tmp_path):
    assert channel_credentials(False, None, None, None) is None
    assert isinstance(channel_credentials(True, None, None, None), grpc.ChannelCredentials)
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    assert isinstance(channel_credentials(False, str(pem), None, None), grpc.ChannelCredentials)
    with pytest.raises(ValueError, match="go together"):
        channel_credentials(True, None, b"cert", None)
    with pytest.raises(FileNotFoundError):
        channel_credentials(True, tmp_path / "missing.pem", None, None)


def test_a_given_channel_excludes_tls_settings_but_takes_an_api_key():
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(ValueError, match="not both"):
            LLMClient("x", channel=channel, tls=True)
        with pytest.raises(ValueError, match="not both"):
            LLMClient("x", channel=channel, options=[("grpc.keepalive_time_ms", 1)])
        LLMClient("x", channel=channel, api_key="k").close()
    with pytest.raises(ValueError, match="not both"):
        AsyncLLMClient("x", channel=object(), root_certificates=b"pem")  # type: ignore[arg-type]
