"""The operations flags: TLS, API keys, metrics, health interval, log format; flags and ENTITY_LLM_* alike."""

from __future__ import annotations

import pytest

from entity_llm_server import ServerConfig, parse_config


def test_operations_flags_and_their_defaults():
    defaults = parse_config([], env={})
    assert (defaults.tls_cert, defaults.tls_key, defaults.tls_client_ca, defaults.api_key_file) == (None,) * 4
    assert (defaults.metrics_port, defaults.health_check_interval, defaults.log_format) == (0, 1.0, "text")
    config = parse_config(
        ["--tls-cert", "s.pem", "--tls-key", "s.key", "--tls-client-ca", "ca.pem", "--api-key-file", "keys",
         "--metrics-port", "9464", "--health-check-interval", "0.25", "--log-format", "json"],
        env={},
    )  # fmt: skip
    assert config == ServerConfig(
        tls_cert="s.pem", tls_key="s.key", tls_client_ca="ca.pem", api_key_file="keys", metrics_port=9464,
        health_check_interval=0.25, log_format="json",
    )  # fmt: skip


def test_operations_settings_from_the_environment():
    env = {
        "ENTITY_LLM_TLS_CERT": "s.pem",
        "ENTITY_LLM_TLS_KEY": "s.key",
        "ENTITY_LLM_API_KEY_FILE": "/run/keys",
        "ENTITY_LLM_METRICS_PORT": "9000",
        "ENTITY_LLM_LOG_FORMAT": "json",
    }
    config = parse_config([], env=env)
    assert (config.tls_cert, config.tls_key, config.api_key_file) == ("s.pem", "s.key", "/run/keys")
    assert (config.metrics_port, config.log_format) == (9000, "json")
    assert parse_config(["--metrics-port", "0"], env=env).metrics_port == 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--tls-cert", "s.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "s.key"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs"),
        (["--metrics-port", "70000"], "--metrics-port"),
        (["--health-check-interval", "0"], "--health-check-interval"),
        (["--log-format", "xml"], "--log-format"),
    ],
)
def test_inconsistent_operations_flags_name_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_config(argv, env={})
    assert exited.value.code == 2
    assert needle in capsys.readouterr().err


def test_connection_age_and_health_port_flags_and_their_server_options():
    from entity_llm_server.server import SERVER_OPTIONS, server_options

    defaults = parse_config([], env={})
    assert (defaults.health_port, defaults.max_connection_age, defaults.max_connection_age_grace) == (0, 300.0, 3600.0)
    config = parse_config(["--health-port", "8081"], env={"ENTITY_LLM_MAX_CONNECTION_AGE": "30"})
    assert (config.health_port, config.max_connection_age) == (8081, 30.0)
    options = dict(server_options(config.max_connection_age, config.max_connection_age_grace))
    assert (options["grpc.max_connection_age_ms"], options["grpc.max_connection_age_grace_ms"]) == (30_000, 3_600_000)
    assert server_options(0, 600) == SERVER_OPTIONS  # 0: connections live on


@pytest.mark.parametrize(
    ("variable", "value"),
    [("ENTITY_LLM_LOG_FORMAT", "yaml"), ("ENTITY_LLM_ENGINE", "vllm"), ("ENTITY_LLM_TRUST_REMOTE_CODE", "yes")],
)
def test_a_choice_from_the_environment_is_checked_like_a_flag(variable, value, capsys):
    with pytest.raises(SystemExit):
        parse_config([], env={variable: value})
    assert f"{variable}={value}: not one of" in capsys.readouterr().err


def test_fair_share_flags():
    assert (parse_config([], env={}).max_streams_per_key, parse_config([], env={}).max_streams_per_peer) == (0, 0)
    config = parse_config(["--max-streams-per-key", "8"], env={"ENTITY_LLM_MAX_STREAMS_PER_PEER": "16"})
    assert (config.max_streams_per_key, config.max_streams_per_peer) == (8, 16)
