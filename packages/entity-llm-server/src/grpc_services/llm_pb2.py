"""Compatibility alias of the generated `entity.grpc` messages."""

from entity_llm_server._gen.entity.grpc.llm_pb2 import *  # noqa: F403  # re-export whatever the proto defines
