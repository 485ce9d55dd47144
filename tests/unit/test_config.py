"""Flags and ENTITY_LLM_* variables configure the server from one place."""

from __future__ import annotations

import pytest

from entity_llm_server import BatchingSettings, ServerConfig, parse_config


def test_no_flags_serve_the_default_model_on_50051():
    config = parse_config([], env={})
    assert config == ServerConfig()
    assert config.model is None
    assert config.port == 50051


def test_flags_set_every_field():
    config = parse_config(
        ["--model", "/m", "--host", "127.0.0.1", "--port", "0", "--device", "cuda:1", "--dtype", "bfloat16",
         "--max-new-tokens", "7", "--shutdown-grace", "2.5", "--log-level", "DEBUG", "--engine", "sequential",
         "--max-batch-size", "3", "--max-queue", "0", "--kv-cache-tokens", "4096", "--kv-block-size", "32",
         "--max-batch-tokens", "512", "--cuda-graphs", "off", "--engine-process", "off", "--on-engine-failure", "exit",
         "--prefix-caching", "off"],
        env={},
    )  # fmt: skip
    assert config == ServerConfig(
        "/m",
        "127.0.0.1",
        0,
        "cuda:1",
        "bfloat16",
        7,
        2.5,
        "DEBUG",
        "sequential",
        3,
        0,
        4096,
        32,
        512,
        "off",
        engine_process="off",
        on_engine_failure="exit",
        prefix_caching="off",
    )
    assert config.batching() == BatchingSettings(
        max_batch_size=3,
        max_queue=0,
        kv_block_size=32,
        kv_cache_tokens=4096,
        max_batch_tokens=512,
        cuda_graphs=False,
        prefix_caching=False,
    )
    assert parse_config([], env={}).batching().prefix_caching  # on unless turned off
    assert parse_config([], env={}).batching().cuda_graphs is None  # auto: on CUDA devices only


def test_remote_code_is_off_unless_asked_for():
    assert parse_config([], env={}).trust_remote_code == "off"
    assert parse_config(["--trust-remote-code"], env={}).trust_remote_code == "on"
    assert parse_config(["--trust-remote-code", "off"], env={}).trust_remote_code == "off"
    assert parse_config([], env={"ENTITY_LLM_TRUST_REMOTE_CODE": "on"}).trust_remote_code == "on"


def test_the_engine_is_chosen_automatically_unless_named():
    assert parse_config([], env={}).engine == "auto"
    assert parse_config(["--engine", "batching"], env={}).engine == "batching"


def test_environment_sets_defaults_and_flags_win():
    env = {"ENTITY_LLM_PORT": "6000", "ENTITY_LLM_MAX_NEW_TOKENS": "9", "ENTITY_LLM_MODEL": "/env-model"}
    assert parse_config([], env=env) == ServerConfig(model="/env-model", port=6000, max_new_tokens=9)
    assert parse_config(["--port", "7000"], env=env).port == 7000


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--port", "70000"], {}, "--port"),
        (["--max-new-tokens", "0"], {}, "--max-new-tokens"),
        (["--dtype", "int3"], {}, "--dtype"),
        (["--max-batch-size", "0"], {}, "--max-batch-size"),
        (["--max-queue", "-1"], {}, "--max-queue"),
        (["--engine", "vllm"], {}, "--engine"),
        (["--cuda-graphs", "yes"], {}, "--cuda-graphs"),
        (["--on-engine-failure", "reboot"], {}, "--on-engine-failure"),
        (["--trust-remote-code", "yes"], {}, "--trust-remote-code"),
        (["--max-prompt-logprobs-tokens", "16385"], {}, "--max-prompt-logprobs-tokens"),
        (["--prefix-caching", "maybe"], {}, "--prefix-caching"),
        ([], {"ENTITY_LLM_PORT": "-1"}, "--port"),
    ],
)
def test_bad_values_name_the_flag(argv, env, needle, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_config(argv, env=env)
    assert exited.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "printed"),
    [("[::]", "[::]"), ("::", "[::]"), ("::1", "[::1]"), ("127.0.0.2", "127.0.0.2"), ("localhost", "localhost")],
)
def test_the_listening_line_prints_an_address_a_client_can_dial(host, printed):
    """The default host, [::], was printed as ":::50051", which no client can dial."""
    from entity_llm_server.server import printable_host

    assert printable_host(host) == printed
