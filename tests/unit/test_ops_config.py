"""The operations flags: metrics, health interval, log format; flags and ENTITY_LLM_* alike."""

from __future__ import annotations

import pytest

from entity_llm_server import ServerConfig, parse_config


def test_operations_flags_and_their_defaults():
    defaults = parse_config([], env={})
    assert (defaults.metrics_port, defaults.health_check_interval, defaults.log_format) == (0, 1.0, "text")
    config = parse_config(
        ["--metrics-port", "9464", "--health-check-interval", "0.25", "--log-format", "json"],
        env={},
    )  # fmt: skip
    assert config == ServerConfig(metrics_port=9464, health_check_interval=0.25, log_format="json")


def test_operations_settings_from_the_environment():
    env = {"ENTITY_LLM_METRICS_PORT": "9000", "ENTITY_LLM_LOG_FORMAT": "json"}
    config = parse_config([], env=env)
    assert (config.metrics_port, config.log_format) == (9000, "json")
    assert parse_config(["--metrics-port", "0"], env=env).metrics_port == 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
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
