"""The packages' public surfaces change only on purpose."""

from __future__ import annotations

import subprocess
import sys

import entity_llm_client
import entity_llm_server


def test_client_surface():
    assert sorted(entity_llm_client.__all__) == [
        "AsyncLLMClient",
        "CancelledError",
        "Chunk",
        "Completion",
        "DeadlineExceededError",
        "FieldViolation",
        "FinishReason",
        "GenerateOptions",
        "InvalidArgumentError",
        "LLMClient",
        "LLMError",
        "ModelInfo",
        "OverloadedError",
        "TokenLogprob",
        "Tokens",
        "TopLogprob",
        "UnauthenticatedError",
        "UnavailableError",
        "Usage",
    ]
    for name in entity_llm_client.__all__:
        assert getattr(entity_llm_client, name).__module__.startswith("entity_llm_client")


def test_server_surface():
    assert sorted(entity_llm_server.__all__) == [
        "BatchingEngine",
        "BatchingSettings",
        "Engine",
        "EngineRequest",
        "LLMServer",
        "LLMService",
        "ServerConfig",
        "TransformersEngine",
        "UnifiedLLMResource",
        "build_server",
        "default_model_path",
        "parse_config",
        "serve",
    ]


def test_fakes_for_users_tests_live_in_the_testing_module():
    import entity_llm_server.testing

    assert entity_llm_server.testing.__all__ == ["FakeEngine"]
    assert not hasattr(entity_llm_server, "FakeEngine")


def test_seed_compat_surface():
    from grpc_services import llm_pb2, llm_pb2_grpc
    from grpc_services.llm_service import LLMService, UnifiedLLMResource

    assert LLMService is entity_llm_server.LLMService
    assert UnifiedLLMResource is entity_llm_server.UnifiedLLMResource
    assert llm_pb2.GenerateRequest(prompt="p").prompt == "p"
    assert llm_pb2.GenerateResponse(token="t").token == "t"
    assert llm_pb2.DESCRIPTOR.package == "entity.grpc"
    assert callable(llm_pb2_grpc.add_LLMServiceServicer_to_server)
    assert issubclass(LLMService, llm_pb2_grpc.LLMServiceServicer)
    # the generated modules themselves, importable under the seed's dotted names too
    import grpc_services.llm_pb2
    import grpc_services.llm_pb2_grpc
    from entity_llm_server._gen.entity.grpc import llm_pb2 as generated

    assert grpc_services.llm_pb2 is llm_pb2 is generated
    assert grpc_services.llm_pb2_grpc is llm_pb2_grpc


def test_importing_both_packages_loads_no_torch_and_no_model():
    code = (
        "import sys, entity_llm_client, entity_llm_server, grpc_services.llm_service\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_constructing_the_seed_servicer_loads_nothing():
    service = entity_llm_server.LLMService()
    assert service.resource is not None
    assert not service.resource.loaded
    assert service.resource.model_id == str(entity_llm_server.default_model_path())
