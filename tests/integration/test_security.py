"""TLS, mutual TLS and API keys, with certificates made at test time."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from entity_llm_client import AsyncLLMClient, LLMClient, UnauthenticatedError, UnavailableError
from entity_llm_server import LLMService
from entity_llm_server.testing import FakeEngine
from entity_llm_server.tls import server_credentials

from ..pki import Pki, make_pki

KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: Pki, *, mutual: bool = False) -> grpc.ServerCredentials:
    client_ca = pki.path("ca.pem") if mutual else None
    credentials = server_credentials(pki.path("server.pem"), pki.path("server.key"), client_ca)
    assert credentials is not None
    return credentials


def test_tls_serves_a_client_that_trusts_the_ca(serve, pki):
    server = serve(LLMService(engine=FakeEngine()), credentials=_tls(pki)).start()
    with LLMClient(server.target, timeout=10, root_certificates=pki.read("ca.pem")) as client:
        assert client.complete("x").text == "Hello, world!"

    async def run() -> str:  # a path works as well as PEM bytes
        async with AsyncLLMClient(server.target, timeout=10, root_certificates=pki.path("ca.pem")) as client:
            return (await client.complete("x")).text

    assert asyncio.run(run()) == "Hello, world!"


def test_plaintext_and_untrusting_clients_fail_cleanly_against_tls(serve, pki, tmp_path):
    server = serve(LLMService(engine=FakeEngine()), credentials=_tls(pki)).start()
    with LLMClient(server.target, timeout=10) as client, pytest.raises(UnavailableError):
        client.complete("x")
    other = make_pki(tmp_path / "other", ca_name="another CA")
    with (
        LLMClient(server.target, timeout=10, root_certificates=other.read("ca.pem")) as client,
        pytest.raises(UnavailableError),
    ):
        client.complete("x")


def test_mutual_tls_refuses_a_client_without_a_certificate(serve, pki):
    server = serve(LLMService(engine=FakeEngine()), credentials=_tls(pki, mutual=True)).start()
    with (
        LLMClient(server.target, timeout=10, root_certificates=pki.read("ca.pem")) as client,
        pytest.raises(UnavailableError),
    ):
        client.complete("x")
    with LLMClient(
        server.target,
        timeout=10,
        root_certificates=pki.read("ca.pem"),
        client_certificate=pki.read("client.pem"),
        client_key=pki.path("client.key"),
    ) as client:
        assert client.complete("x").text == "Hello, world!"


def test_api_keys_missing_or_wrong_are_unauthenticated_and_the_right_one_is_served(serve):
    server = serve(LLMService(engine=FakeEngine()), api_keys=KEYS).start()
    with LLMClient(server.target, timeout=10) as client, pytest.raises(UnauthenticatedError) as missing:
        client.complete("x")
    assert missing.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert "missing API key" in missing.value.details
    with LLMClient(server.target, timeout=10, api_key="key-three") as client:
        with pytest.raises(UnauthenticatedError, match="invalid API key"):
            client.complete("x")
        with pytest.raises(UnauthenticatedError, match="invalid API key"):
            client.model_info()
    for key in KEYS:
        with LLMClient(server.target, timeout=10, api_key=key) as client:
            assert client.complete("x").text == "Hello, world!"
            assert client.tokenize("a b").ids == (0, 1)

    async def run() -> str:
        async with AsyncLLMClient(server.target, timeout=10, api_key="key-two") as client:
            return (await client.complete("x")).text

    assert asyncio.run(run()) == "Hello, world!"


def test_health_needs_no_key_and_reflection_does(serve):
    server = serve(LLMService(engine=FakeEngine()), api_keys=KEYS).start()
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        # An answer, not UNAUTHENTICATED: NOT_SERVING, since no call has started the engine yet.
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_calls_own_authorization_replaces_the_clients_key(serve):
    # Two authorization entries are refused; a per-call key must not add a second one.
    server = serve(LLMService(engine=FakeEngine()), api_keys=KEYS).start()
    with LLMClient(server.target, timeout=10, api_key="not-a-key") as client:
        assert client.complete("x", metadata=[("authorization", "Bearer key-one")]).text == "Hello, world!"
        with pytest.raises(UnauthenticatedError, match="invalid API key"):
            client.complete("x")
    with (
        LLMClient(server.target, timeout=10, api_key="key-one") as client,
        pytest.raises(UnauthenticatedError, match="invalid API key"),
    ):
        client.complete("x", metadata=[("authorization", "Bearer nope")])
