"""The client's connection settings: TLS arguments, API-key metadata, channel options."""

from __future__ import annotations

import json

import grpc
import pytest

from entity_llm_client import AsyncLLMClient, LLMClient
from entity_llm_client._connection import (
    CHANNEL_OPTIONS,
    auth_metadata,
    channel_credentials,
    channel_options,
    resolve_target,
    service_config,
)


def test_options_override_the_defaults_by_name():
    merged = dict(channel_options([("grpc.keepalive_time_ms", 1_000), ("grpc.primary_user_agent", "me")]))
    assert merged["grpc.keepalive_time_ms"] == 1_000
    assert merged["grpc.primary_user_agent"] == "me"
    assert merged["grpc.keepalive_timeout_ms"] == dict(CHANNEL_OPTIONS)["grpc.keepalive_timeout_ms"]
    one = service_config(retries=True, balancing=False, health_checks=True)
    assert channel_options([]) == [*CHANNEL_OPTIONS, ("grpc.enable_retries", 1), ("grpc.service_config", one)]
    # The docs' promise for one server: UNAVAILABLE, and only it, is
    # retried, up to 3 attempts, throttled; gRPC's own pick_first.
    config = json.loads(one)
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "entity.grpc.LLMService"}]
    assert (method["retryPolicy"]["maxAttempts"], method["retryPolicy"]["retryableStatusCodes"]) == (3, ["UNAVAILABLE"])
    assert set(config) == {"methodConfig", "retryThrottling"}
    assert channel_options([], retries=False) == [*CHANNEL_OPTIONS, ("grpc.enable_retries", 0)]
    # A service config of the caller's own replaces the one the switches make.
    mine = dict(channel_options([("grpc.service_config", "{}")], balancing=True))
    assert mine["grpc.service_config"] == "{}"


def test_balancing_adds_round_robin_health_checks_and_retries_of_full_replicas():
    config = json.loads(service_config(retries=True, balancing=True, health_checks=True) or "")
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "entity.grpc.LLMService"}
    (method,) = config["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert method["retryPolicy"]["maxAttempts"] == 5
    # A success earns back what a failure costs: throttled only while most attempts fail.
    assert config["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 1.0}
    assert '"tokenRatio": 1.0' in (service_config(retries=True, balancing=True, health_checks=True) or "")
    # Each part turns off alone.
    no_health = json.loads(service_config(retries=True, balancing=True, health_checks=False) or "")
    assert "healthCheckConfig" not in no_health
    assert no_health["loadBalancingConfig"]
    no_retries = json.loads(service_config(retries=False, balancing=True, health_checks=True) or "")
    assert "methodConfig" not in no_retries
    assert "retryThrottling" not in no_retries
    assert service_config(retries=False, balancing=False, health_checks=True) is None


@pytest.mark.parametrize(
    ("target", "resolved", "several"),
    [
        ("localhost:50051", "localhost:50051", False),
        ("10.0.0.1:50051", "10.0.0.1:50051", False),
        ("dns:///llm.default.svc:50051", "dns:///llm.default.svc:50051", True),
        ("xds:///llm", "xds:///llm", True),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1", True),
        ("ipv4:10.0.0.1:1", "ipv4:10.0.0.1:1", False),
        ("unix:/run/llm.sock", "unix:/run/llm.sock", False),
        (["127.0.0.2:7", "127.0.0.3:7"], "ipv4:127.0.0.2:7,127.0.0.3:7", True),
        ("127.0.0.2:7, 127.0.0.3:7", "ipv4:127.0.0.2:7,127.0.0.3:7", True),
        (["[::1]:7", "[::2]:7"], "ipv6:[::1]:7,[::2]:7", True),
        (["127.0.0.2:7"], "127.0.0.2:7", False),
    ],
)
def test_targets(target, resolved, several):
    assert resolve_target(target) == (resolved, several)


@pytest.mark.parametrize(
    "target", [[], "", ["a.example:1", "b.example:1"], ["127.0.0.1:1", "[::1]:1"], ["127.0.0.1", "127.0.0.2"]]
)
def test_a_list_of_servers_takes_ip_addresses_of_one_family(target):
    with pytest.raises(ValueError, match=r"target must name a server|ip:port addresses of one family"):
        resolve_target(target)


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
