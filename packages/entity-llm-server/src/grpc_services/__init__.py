"""The original `grpc_services` import surface, kept for existing users.

`from grpc_services import llm_pb2, llm_pb2_grpc` and
`from grpc_services.llm_service import LLMService` work as the seed documented;
the modules re-export the code generated into `entity_llm_server._gen` and the
servicer of `entity_llm_server`. New code should import `entity_llm_server`.
"""
