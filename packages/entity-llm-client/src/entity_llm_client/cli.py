"""The `entity-llm` command: talk to an entity-llm server from a terminal.

entity-llm generate "def fibonacci(n):" --max-new-tokens 64 --stop $'\\n\\n'
entity-llm generate "import os" --json        # one JSON object per chunk
entity-llm tokenize "def f(x):"
entity-llm info
entity-llm --tls --root-certificates ca.pem --target llm.example:443 info   # key in $ENTITY_LLM_API_KEY
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._client import LLMClient
from ._errors import LLMError

API_KEY_ENV = "ENTITY_LLM_API_KEY"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(prog="entity-llm", description="Client for an entity-llm gRPC server.")
    parser.add_argument("--target", default="localhost:50051", help="server address (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (implied by the certificate flags)")
    parser.add_argument("--root-certificates", metavar="PEM", help="CA certificates that signed the server's")
    parser.add_argument("--client-cert", metavar="PEM", help="client certificate chain, for mutual TLS")
    parser.add_argument("--client-key", metavar="PEM", help="private key of --client-cert")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"API key sent as 'authorization: Bearer KEY' (default: ${API_KEY_ENV}, which keeps it out of `ps`)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="stream the continuation of a prompt")
    generate.add_argument("prompt", help="the text to continue ('-' reads standard input)")
    generate.add_argument("--max-new-tokens", type=int, help="the most tokens to generate")
    generate.add_argument("--stop", action="append", default=[], dest="stop_sequences", help="a stop sequence")
    generate.add_argument("--include-stop-sequence", action="store_true", help="keep the matched stop text")
    generate.add_argument("--truncate-input-tokens", type=int, help="keep only the prompt's last N tokens")
    generate.add_argument("--time-limit-ms", type=int, help="end normally after this many milliseconds")
    generate.add_argument("--request-id", default="", help="an id echoed by the server")

    tokenize = commands.add_parser("tokenize", help="show a text's tokens")
    tokenize.add_argument("text")
    tokenize.add_argument("--truncate-input-tokens", type=int)

    commands.add_parser("info", help="describe the served model")
    return parser


def _generate(client: LLMClient, args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    stream = client.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        stop_sequences=args.stop_sequences,
        include_stop_sequence=args.include_stop_sequence,
        truncate_input_tokens=args.truncate_input_tokens,
        time_limit_ms=args.time_limit_ms,
        request_id=args.request_id,
    )
    for chunk in stream:
        if args.json:
            print(json.dumps(_jsonable(chunk)), flush=True)
        else:
            print(chunk.text, end="", flush=True)
            if chunk.finish_reason is not None:
                usage = chunk.usage
                counts = f", {usage.input_tokens} in / {usage.generated_tokens} out" if usage else ""
                print()
                print(f"[{chunk.finish_reason.value}{counts}]", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code (1 for a failed call, with the status on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.client_cert is None) != (args.client_key is None):
        parser.error("--client-cert and --client-key go together")
    try:
        client = LLMClient(
            args.target,
            timeout=args.timeout,
            tls=args.tls,
            root_certificates=args.root_certificates,
            client_certificate=args.client_cert,
            client_key=args.client_key,
            api_key=args.api_key,
        )
    except (OSError, ValueError) as error:
        print(f"entity-llm: {error}", file=sys.stderr)
        return 2
    try:
        with client:
            if args.command == "generate":
                _generate(client, args)
            elif args.command == "tokenize":
                tokens = client.tokenize(args.text, truncate_input_tokens=args.truncate_input_tokens)
                if args.json:
                    print(json.dumps({"ids": list(tokens.ids), "pieces": list(tokens.pieces), "count": tokens.count}))
                else:
                    print(f"{tokens.count} tokens")
                    for token_id, piece in zip(tokens.ids, tokens.pieces, strict=True):
                        print(f"{token_id:>8}  {piece!r}")
            else:
                info = client.model_info()
                if args.json:
                    print(json.dumps(_jsonable(info)))
                else:
                    for field in dataclasses.fields(info):
                        print(f"{field.name}: {getattr(info, field.name)}")
    except LLMError as error:
        print(f"entity-llm: {error.code.name}: {error.details}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
