"""The installed `entity-llm-server` run as an operator runs it: drain, health, TLS, API keys, logs."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from entity_llm_client import FinishReason, LLMClient, UnauthenticatedError, UnavailableError
from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc

from ..conftest import RunningServer, console_script, free_port
from ..pki import Pki, make_pki

pytestmark = pytest.mark.e2e

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_sigterm_drains_refuses_new_streams_finishes_the_open_one_and_exits_zero():
    with (
        RunningServer("--max-new-tokens", "480", "--shutdown-grace", "60") as server,
        LLMClient(server.target, timeout=120) as client,
        grpc.insecure_channel(server.target) as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == SERVING  # loaded and warmed before the port was announced
        # min_new_tokens: the length is the test's, never the model's EOS.
        first = client.generate("class Parser:", min_new_tokens=480)
        assert next(first).text

        # A reflection stream left open, as a grpcurl session might: it is in
        # flight too, so the drain is certainly still waiting when the second
        # stream arrives, however fast the first one finishes.
        asks: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
        holder = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(asks.get, None), timeout=120
        )
        asks.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        assert next(holder).list_services_response.service

        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING  # health goes first
        with pytest.raises(UnavailableError) as refused:
            list(client.generate("def second():"))
        assert refused.value.details == "server is shutting down"

        rest = list(first)
        assert rest[-1].finish_reason is FinishReason.MAX_TOKENS
        assert rest[-1].usage is not None
        assert rest[-1].usage.generated_tokens == 480
        asks.put(None)  # the reflection client half-closes: nothing is in flight any more
        assert list(holder) == []
        assert server.process.wait(timeout=60) == 0, server.stderr()
        log = server.stderr()
    assert "draining: 2 RPCs in flight" in log
    assert "code=UNAVAILABLE" in log
    assert "entity-llm-server stopped" in log


def test_a_second_signal_cuts_the_drain_short():
    with (
        RunningServer("--shutdown-grace", "300") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == SERVING
        # An RPC that never ends by itself: the drain would wait out all 300 s.
        asks: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
        holder = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(asks.get, None), timeout=120
        )
        asks.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        assert next(holder).list_services_response.service
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING  # the drain has begun
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.stderr()
        with pytest.raises(grpc.RpcError):
            next(holder)  # cancelled, not finished
        asks.put(None)
        log = server.stderr()
    assert "second signal" in log
    assert "entity-llm-server stopped" in log


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_api_keys_and_json_logs_with_request_ids(pki, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# the operators' key\ns3cret-key\n")
    args = ("--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"), "--api-key-file", str(keys))
    with RunningServer(*args, "--max-new-tokens", "8", "--log-format", "json") as server:
        ca = pki.read("ca.pem")
        with LLMClient(server.target, timeout=60, root_certificates=ca, api_key="s3cret-key") as client:
            done = client.complete("def f(x):", metadata=[("x-request-id", "e2e-trace-1")])
        assert done.request_id == "e2e-trace-1"
        assert done.text == " return (self, x): return ("  # greedy, 8 tokens
        with (
            LLMClient(server.target, timeout=60, root_certificates=ca) as client,
            pytest.raises(UnauthenticatedError, match="missing API key"),
        ):
            client.model_info()
        credentials = grpc.ssl_channel_credentials(ca)
        with grpc.secure_channel(server.target, credentials) as channel:  # a probe: TLS, no key
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert check.status == SERVING

        cli = [console_script("entity-llm"), "--target", server.target, "--tls", "--root-certificates"]
        env = {**os.environ, "ENTITY_LLM_API_KEY": "s3cret-key"}
        info = subprocess.run([*cli, pki.path("ca.pem"), "--json", "info"], capture_output=True, text=True, env=env,
                              timeout=120)  # fmt: skip
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["default_max_new_tokens"] == 8
        env.pop("ENTITY_LLM_API_KEY")
        denied = subprocess.run([*cli, pki.path("ca.pem"), "info"], capture_output=True, text=True, env=env,
                                timeout=120)  # fmt: skip
        assert denied.returncode == 1
        assert "UNAUTHENTICATED" in denied.stderr
        assert server.stop() == 0
        log = server.stderr()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    finished = [e for e in lines if e["message"].startswith("rpc finished")]
    ours = [e for e in finished if e["request_id"] == "e2e-trace-1"]
    assert len(ours) == 1
    assert ours[0]["grpc_method"] == "/entity.grpc.LLMService/Generate"
    assert (ours[0]["code"], ours[0]["tokens"]) == ("OK", 8)
    # Every RPC at INFO (health probes log at DEBUG): the SDK's two calls, then the command's two.
    assert [(e["grpc_method"].rsplit("/", 1)[1], e["code"]) for e in finished] == [
        ("Generate", "OK"),
        ("GetModelInfo", "UNAUTHENTICATED"),
        ("GetModelInfo", "OK"),
        ("GetModelInfo", "UNAUTHENTICATED"),
    ]
    assert all(e["request_id"] not in ("", "-") for e in finished)
    assert "s3cret-key" not in log


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--tls-cert", "server.pem"), "--tls-cert and --tls-key go together"),
        (("--api-key-file", "/nonexistent/keys"), "cannot read API key file"),
        (("--tls-cert", "/nonexistent/s.pem", "--tls-key", "/nonexistent/s.key"), "cannot read TLS"),
        (("--port", "50999", "--health-port", "50999"), "could not bind"),  # one port cannot serve both
    ],
)
def test_bad_operations_settings_fail_before_loading_with_a_clear_message(args, needle):
    out = subprocess.run(
        [console_script("entity-llm-server"), "--port", "0", *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert "loading model" not in out.stderr


def test_a_plaintext_health_port_answers_probes_when_the_main_port_needs_a_client_certificate(pki):
    health_port = free_port()
    args = ("--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"), "--tls-client-ca",
            pki.path("ca.pem"), "--health-port", str(health_port), "--max-new-tokens", "8")  # fmt: skip
    with RunningServer(*args) as server, grpc.insecure_channel(f"127.0.0.1:{health_port}") as probe:
        health = health_pb2_grpc.HealthStub(probe)
        llm = health_pb2.HealthCheckRequest(service="entity.grpc.LLMService")
        assert health.Check(llm, timeout=30).status == SERVING  # as kubelet's gRPC probe asks
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == SERVING
        watch = health.Watch(llm, timeout=120)
        assert next(watch).status == SERVING
        # The health service alone: nothing else is reachable without the certificate.
        with pytest.raises(grpc.RpcError) as only_health:
            llm_pb2_grpc.LLMServiceStub(probe).GetModelInfo(llm_pb2.GetModelInfoRequest(), timeout=30)
        assert only_health.value.code() is grpc.StatusCode.UNIMPLEMENTED
        ca = pki.read("ca.pem")
        with LLMClient(server.target, timeout=30, root_certificates=ca) as anonymous, pytest.raises(UnavailableError):
            anonymous.model_info()  # the main port still requires a client certificate
        with LLMClient(server.target, timeout=60, root_certificates=ca, client_certificate=pki.path("client.pem"),
                       client_key=pki.path("client.key")) as client:  # fmt: skip
            assert client.complete("def f(x):").text == " return (self, x): return ("
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING  # probes on the health port see the drain
        assert server.process.wait(60) == 0


def test_sigterm_while_the_model_loads_stops_at_once_and_cleanly():
    process = subprocess.Popen(
        [console_script("entity-llm-server"), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    try:
        for line in process.stderr:  # the load starts once the port is open and signals are handled
            if "loading model" in line:
                break
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "stopped before the model had loaded" in err
    assert "listening" not in out


def test_help_documents_the_operations_flags():
    out = subprocess.run([console_script("entity-llm-server"), "--help"], capture_output=True, text=True, timeout=60)
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca", "--api-key-file", "--metrics-port",
                 "--health-check-interval", "--log-format", "--health-port", "--max-connection-age",
                 "--max-connection-age-grace"):  # fmt: skip
        assert flag in out.stdout
    client = subprocess.run([console_script("entity-llm"), "--help"], capture_output=True, text=True, timeout=60)
    for flag in ("--tls", "--root-certificates", "--client-cert", "--client-key", "--api-key", "ENTITY_LLM_API_KEY"):
        assert flag in client.stdout


def test_a_probe_during_the_model_load_gets_not_serving_then_serving():
    # The port opens before the model loads (the "listening" line comes after
    # it): a probe in between must get NOT_SERVING, not a refused connection.
    port = free_port()
    argv = [console_script("entity-llm-server"), "--host", "127.0.0.1", "--port", str(port), "--max-new-tokens", "8"]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            probe = health_pb2.HealthCheckRequest(service="")
            first = health.Check(probe, timeout=60, wait_for_ready=True).status  # as soon as the port opens
            assert server.stdout is not None
            assert "listening on" in server.stdout.readline()  # the model is loaded now
            assert health.Check(probe, timeout=5).status == SERVING
        assert first == NOT_SERVING
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        if server.stdout is not None:
            server.stdout.close()
