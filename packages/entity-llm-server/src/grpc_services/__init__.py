"""The original `grpc_services` import surface, kept for existing users.

`from grpc_services import llm_pb2, llm_pb2_grpc` and
`from grpc_services.llm_service import LLMService` work as the seed documented.
`grpc_services.llm_pb2` and `grpc_services.llm_pb2_grpc` *are* the modules
generated into `entity_llm_server._gen` (registered under these names too, so
`import grpc_services.llm_pb2` works), not copies. New code should import
`entity_llm_server`.
"""

from __future__ import annotations

import sys

from entity_llm_server._gen.entity.grpc import llm_pb2, llm_pb2_grpc

sys.modules[f"{__name__}.llm_pb2"] = llm_pb2
sys.modules[f"{__name__}.llm_pb2_grpc"] = llm_pb2_grpc

__all__ = ["llm_pb2", "llm_pb2_grpc"]
