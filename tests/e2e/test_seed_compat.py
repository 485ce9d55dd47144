"""The seed's users keep working: its snippet, its example and clients built from its proto."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from entity_llm_client import LLMClient

from ..conftest import free_port, wait_until
from .conftest import FIBONACCI, FIBONACCI_32, FIBONACCI_GREEDY

ROOT = Path(__file__).resolve().parents[2]
SEED_PROTO = ROOT / "tests" / "pipeline" / "seed" / "llm.proto"

pytestmark = pytest.mark.e2e

# Verbatim from the seed's documentation (grpc_services, "The server leverages grpc.aio").
SEED_SNIPPET = """\
import asyncio
import grpc

from grpc_services import llm_pb2, llm_pb2_grpc
from grpc_services.llm_service import LLMService

async def serve() -> None:
    server = grpc.aio.server()
    llm_pb2_grpc.add_LLMServiceServicer_to_server(LLMService(), server)
    server.add_insecure_port("[::]:50051")
    await server.start()
    await server.wait_for_termination()

if __name__ == "__main__":
    asyncio.run(serve())
"""

SEED_CLIENT = """\
import sys
import grpc
import llm_pb2, llm_pb2_grpc

with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = llm_pb2_grpc.LLMServiceStub(channel)
    for response in stub.Generate(llm_pb2.GenerateRequest(prompt=sys.argv[2]), timeout=60):
        sys.stdout.write(response.token)
"""


def _listening(port: int, process: subprocess.Popen[bytes]) -> bool:
    """Whether the snippet's server accepts connections on `port` (it prints nothing to wait on)."""
    assert process.poll() is None, "the snippet's server exited"
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_seed_snippet_runs_with_only_its_port_changed(tmp_path):
    # Only the port changes: the snippet's fixed 50051 would collide with any
    # other server on this machine (or a second run of this suite).
    port = free_port()
    script = tmp_path / "seed_server.py"
    script.write_text(SEED_SNIPPET.replace('"[::]:50051"', f'"[::]:{port}"'))
    assert str(port) in script.read_text()
    # Ctrl-C as a terminal gives it: a suite started in the background (`nohup ... &`) passes its
    # processes SIGINT ignored, and Python then leaves it ignored. The snippet itself runs unchanged.
    ctrl_c = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); exec(open(sys.argv[1]).read())"
    )
    with subprocess.Popen([sys.executable, "-c", ctrl_c, str(script)], stderr=subprocess.DEVNULL) as process:
        try:
            assert wait_until(lambda: _listening(port, process), timeout=120), f"nothing listens on {port}"
            from grpc_services import llm_pb2, llm_pb2_grpc

            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = llm_pb2_grpc.LLMServiceStub(channel)
                tokens = [r.token for r in stub.Generate(llm_pb2.GenerateRequest(prompt=FIBONACCI), timeout=120)]
            assert "".join(tokens) == FIBONACCI_GREEDY  # the embedded model, greedy, up to its EOS
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:  # fail, and leave no server behind
                process.kill()
                raise


def test_the_seed_example_prints_tokens_and_exits_zero():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "servers" / "grpc_server.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == FIBONACCI + FIBONACCI_GREEDY + "\n"


def test_a_client_compiled_from_the_seeds_proto_streams_from_the_server(tmp_path, console_server):
    # The seed's own regeneration recipe: grpcio-tools, the proto at the top level.
    seed_proto = tmp_path / "llm.proto"
    seed_proto.write_text(SEED_PROTO.read_text())
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", str(seed_proto)],
        check=True,
    )  # fmt: skip
    (tmp_path / "seed_client.py").write_text(SEED_CLIENT)
    out = subprocess.run(
        [sys.executable, "seed_client.py", console_server.target, FIBONACCI],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    with LLMClient(console_server.target, timeout=60) as client:
        expected = "".join(c.text for c in client.generate(FIBONACCI))
    assert out.stdout == expected == FIBONACCI_32  # the server's --max-new-tokens 32
