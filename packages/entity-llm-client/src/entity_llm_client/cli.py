"""The `entity-llm` command: talk to an entity-llm server from a terminal.

entity-llm generate "def fibonacci(n):" --max-new-tokens 64 --stop $'\\n\\n'
entity-llm generate "import os" --temperature 0.8 --top-p 0.95 --seed 7
entity-llm generate --message system:"Answer in Python." --message user:"Add two numbers."
entity-llm generate --prompt-token-ids 319,290,11 --stop-token-id 304 --logit-bias 0=-100
entity-llm --json generate "import os" --top-logprobs 3   # one JSON object per chunk, with logprobs
entity-llm generate "def f(x):" --n 4 --temperature 0.8 --seed 7   # 4 samples, each under its own header
entity-llm generate "A cat:" --json-schema cat.schema.json   # the output is JSON valid under the schema
entity-llm generate "import os" --prompt-logprobs 2   # the prompt's tokens' logprobs, after the text
entity-llm score "The capital of France is Paris"   # each token's logprob and rank, and their sum
entity-llm tokenize "def f(x):"
entity-llm info
entity-llm --tls --root-certificates ca.pem --target llm.example:443 info   # key in $ENTITY_LLM_API_KEY
entity-llm --target dns:///entity-llm.default.svc:50051 info   # round_robin over every replica the name has
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._cli_flags import API_KEY_ENV, build_parser, generate_options, one_input, read_inputs
from ._cli_output import print_info, print_prompt_logprobs, print_samples, print_scores, print_stream, print_tokens
from ._errors import LLMError
from ._sync_client import LLMClient

__all__ = ["API_KEY_ENV", "build_parser", "main"]


def _generate(client: LLMClient, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    one_input(args, parser)
    several = args.n is not None and args.n > 1  # printed once all end; one sample streams as it comes
    try:
        prompt, messages, token_ids = read_inputs(args)
        options = generate_options(args)
        if several:
            # The whole call runs here; of these errors, only its checks (before it starts) raise.
            samples = client.samples(prompt, n=args.n, messages=messages, prompt_token_ids=token_ids, **options)
        else:
            stream = client.generate(prompt, messages=messages, prompt_token_ids=token_ids, n=args.n, **options)
    except (OSError, ValueError, TypeError) as error:  # bad flags or files, found before any call
        parser.error(f"generate: {error}")
    if several:
        print_samples(samples, as_json=args.json)
        if not args.json and args.prompt_logprobs is not None:
            print_prompt_logprobs(samples[0].prompt_logprobs)
        return
    print_stream(stream, as_json=args.json, prompt_logprobs=args.prompt_logprobs is not None)


def _score(client: LLMClient, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    one_input(args, parser)
    try:
        prompt, messages, token_ids = read_inputs(args)
        # The whole call runs here; of these errors, only its checks (before it starts) raise.
        entries = client.score(
            prompt,
            messages=messages,
            prompt_token_ids=token_ids,
            top_logprobs=args.top_logprobs,
            truncate_input_tokens=args.truncate_input_tokens,
        )
    except (OSError, ValueError, TypeError) as error:  # bad flags or files, found before any call
        parser.error(f"score: {error}")
    print_scores(entries, as_json=args.json)


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
            retries=args.retries,
            balancing=None if args.balancing == "auto" else args.balancing == "on",
            health_checks=args.health_checks,
        )
    except (OSError, ValueError) as error:
        print(f"entity-llm: {error}", file=sys.stderr)
        return 2
    try:
        with client:
            if args.command == "generate":
                _generate(client, args, parser)
            elif args.command == "score":
                _score(client, args, parser)
            elif args.command == "tokenize":
                try:
                    tokens = client.tokenize(args.text, truncate_input_tokens=args.truncate_input_tokens)
                except (ValueError, TypeError) as error:  # found before any call (text that is not UTF-8)
                    parser.error(f"tokenize: {error}")
                print_tokens(tokens, as_json=args.json)
            else:
                print_info(client.model_info(), as_json=args.json)
    except LLMError as error:
        print(f"entity-llm: {error.code.name}: {error.details}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
