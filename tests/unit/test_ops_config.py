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
