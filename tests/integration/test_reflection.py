"""Server reflection lists the services and describes their methods, as grpcurl reads them."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from entity_llm_server import LLMService
from entity_llm_server.testing import FakeEngine


def test_reflection_lists_the_services_and_resolves_generate(serve):
    server = serve(LLMService(engine=FakeEngine())).start()
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"entity.grpc.LLMService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= (
            services
        )
        # A pool fed only by reflection: nothing here comes from this process's generated code.
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("entity.grpc.LLMService")
        generate = service.methods_by_name["Generate"]
        assert generate.server_streaming
        assert not generate.client_streaming
        assert generate.input_type.full_name == "entity.grpc.GenerateRequest"
        assert generate.output_type.full_name == "entity.grpc.GenerateResponse"
        assert generate.input_type.fields_by_name["prompt"].number == 1
        assert {"Generate", "Tokenize", "GetModelInfo"} <= set(service.methods_by_name)
