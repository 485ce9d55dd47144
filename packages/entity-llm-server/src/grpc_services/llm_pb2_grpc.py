"""Compatibility alias of the generated `entity.grpc` service stubs and servicer base."""

from entity_llm_server._gen.entity.grpc.llm_pb2_grpc import *  # noqa: F403  # re-export whatever the proto defines
