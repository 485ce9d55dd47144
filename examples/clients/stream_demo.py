"""The main job, end to end: start `entity-llm-server`, stream a prompt with the SDK.

    python examples/clients/stream_demo.py [PROMPT] [--async]

Starts the installed console script on a free loopback port (the embedded
default model unless ENTITY_LLM_MODEL says otherwise), streams the prompt's
tokens to the terminal through `entity_llm_client`, then stops the server with
SIGTERM, as an operator would.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys

from entity_llm_client import AsyncLLMClient, LLMClient

PROMPT = "def fibonacci(n):"


def start_server() -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        # Warnings only: the access log would interleave with the streamed text.
        ["entity-llm-server", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    for line in server.stdout:
        if match := re.search(r"listening on (\S+)", line):
            return server, match.group(1)
    raise SystemExit(f"entity-llm-server exited with {server.wait()} before listening")


async def stream_async(target: str, prompt: str) -> None:
    async with AsyncLLMClient(target, timeout=120) as client:
        async for piece in client.generate(prompt):
            print(piece, end="", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default=PROMPT)
    parser.add_argument("--async", dest="use_async", action="store_true", help="use AsyncLLMClient")
    args = parser.parse_args()
    server, target = start_server()
    try:
        print(f"# streaming from entity-llm-server at {target}\n", flush=True)
        print(args.prompt, end="", flush=True)
        if args.use_async:
            asyncio.run(stream_async(target, args.prompt))
        else:
            with LLMClient(target, timeout=120) as client:
                for piece in client.generate(args.prompt):
                    print(piece, end="", flush=True)
        print("\n")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    print(f"# server stopped with exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
