"""The `entity-llm` command's flags: its parser, and the prompt and request parameters they give."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ._types import SampleOptions

API_KEY_ENV = "ENTITY_LLM_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    # No abbreviations of the global flags: argparse matches every later argument against them
    # too, so `generate --n 4` was "ambiguous option: --n could match --no-health-checks, --no-retries".
    parser = argparse.ArgumentParser(
        prog="entity-llm", description="Client for an entity-llm gRPC server.", allow_abbrev=False
    )
    parser.add_argument(
        "--target",
        default="localhost:50051",
        help="server address, any gRPC target (dns:///name:port, ipv4:a:p,b:p, xds:///name), or several "
        "ip:port addresses separated by commas (default: %(default)s)",
    )
    parser.add_argument(
        "--balancing",
        choices=("auto", "on", "off"),
        default="auto",
        help="round_robin over the target's servers (auto: when it may name several) (default: %(default)s)",
    )
    parser.add_argument(
        "--no-health-checks",
        dest="health_checks",
        action="store_false",
        help="when balancing, also send calls to servers that do not report SERVING",
    )
    parser.add_argument(
        "--no-retries",
        dest="retries",
        action="store_false",
        help="do not retry calls refused before their first response",
    )
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

    generate = commands.add_parser(
        "generate",
        help="stream the continuation of a prompt or a chat",
        description="Give a prompt, a chat with --message or --messages-json, or --prompt-token-ids (exactly one).",
    )
    _add_inputs(generate, "continue")
    generate.add_argument("--max-new-tokens", type=int, help="the most tokens to generate")
    generate.add_argument("--min-new-tokens", type=int, help="the fewest tokens before end-of-sequence may end it")
    generate.add_argument("--stop", action="append", default=[], dest="stop_sequences", help="a stop sequence")
    generate.add_argument("--include-stop-sequence", action="store_true", help="keep the matched stop text")
    generate.add_argument(
        "--stop-token-id",
        type=int,
        action="append",
        default=[],
        dest="stop_token_ids",
        metavar="ID",
        help="a token id that ends generation (repeat the flag)",
    )
    generate.add_argument("--ignore-eos", action="store_true", help="do not end at the model's end-of-sequence tokens")
    generate.add_argument("--truncate-input-tokens", type=int, help="keep only the prompt's last N tokens")
    generate.add_argument("--time-limit-ms", type=int, help="end normally after this many milliseconds")
    generate.add_argument("--request-id", default="", help="an id echoed by the server")
    generate.add_argument(
        "--n",
        type=int,
        metavar="N",
        help="generate N independent samples in one call (above 1: each printed, in order, once all end)",
    )
    sampling = generate.add_argument_group("sampling (unset: the server's defaults, greedy)")
    sampling.add_argument("--temperature", type=float, help="0 is greedy; above 0 samples")
    sampling.add_argument("--top-p", type=float, help="sample from the smallest set of tokens this likely")
    sampling.add_argument("--top-k", type=int, help="sample from the K most likely tokens only")
    sampling.add_argument("--repetition-penalty", type=float, help="above 1 discourages repeated tokens")
    sampling.add_argument("--min-p", type=float, help="keep only tokens at least MIN_P times as likely as the top one")
    sampling.add_argument("--typical-p", type=float, help="locally typical sampling, up to this probability mass")
    sampling.add_argument("--presence-penalty", type=float, help="subtracted from the logit of each token generated")
    sampling.add_argument(
        "--frequency-penalty", type=float, help="subtracted from a token's logit once per time it was generated"
    )
    sampling.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=BIAS",
        help="add BIAS (-100 to 100) to the logit of token ID (repeat the flag)",
    )
    sampling.add_argument("--seed", type=int, help="the sampler's seed, to repeat a sampled stream")
    shape = generate.add_argument_group("structured output (at most one)")
    exclusive = shape.add_mutually_exclusive_group()
    exclusive.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid under this JSON Schema file")
    exclusive.add_argument("--json-object", action="store_true", help="the output is any JSON object")
    exclusive.add_argument("--regex", help="the whole output matches this regular expression")
    exclusive.add_argument("--choice", action="append", help="the output is one of these (repeat the flag)")
    exclusive.add_argument("--grammar", metavar="FILE", help="the output is a sentence of this Lark grammar file")
    scores = generate.add_argument_group("log-probabilities")
    scores.add_argument(
        "--logprobs", action="store_true", help="return each generated token's log-probability (shown with --json)"
    )
    scores.add_argument(
        "--top-logprobs", type=int, default=0, metavar="N", help="also return the N most likely alternatives"
    )
    scores.add_argument(
        "--prompt-logprobs",
        type=int,
        metavar="N",
        help="score the prompt: each token's logprob and rank after the first, with N alternatives (0 to 10), "
        "printed after the text; with --max-new-tokens 0, only that",
    )

    score = commands.add_parser(
        "score",
        help="score a prompt: each token's logprob and rank under the model",
        description="Give a prompt, a chat with --message or --messages-json, or --prompt-token-ids (exactly one). "
        "Prints every token after the first with its logprob, rank and alternatives, under their sum: the "
        "prompt's log-likelihood given its first token. Generates nothing.",
    )
    _add_inputs(score, "score")
    score.add_argument(
        "--top-logprobs", type=int, default=0, metavar="N", help="also show the N most likely alternatives (0 to 10)"
    )
    score.add_argument("--truncate-input-tokens", type=int, metavar="N", help="score only the prompt's last N tokens")

    tokenize = commands.add_parser("tokenize", help="show a text's tokens")
    tokenize.add_argument("text")
    tokenize.add_argument("--truncate-input-tokens", type=int)

    info = commands.add_parser("info", help="describe the served model")
    for command in (generate, score, tokenize, info):
        # `--json` belongs to entity-llm itself; written after the command, it is taken there too
        # (else argparse reads it as an abbreviation of --json-schema and --json-object).
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    return parser


def _add_inputs(command: argparse.ArgumentParser, verb: str) -> None:
    """The flags that give `command` its prompt: a text, a chat or token ids."""
    command.add_argument("prompt", nargs="?", help=f"the text to {verb} ('-' reads standard input)")
    chat = command.add_argument_group("chat (instead of a prompt)")
    chat.add_argument(
        "--message",
        action="append",
        dest="messages",
        metavar="ROLE:CONTENT",
        help="one turn of a conversation, e.g. user:Hello (repeat it, in order)",
    )
    chat.add_argument(
        "--messages-json",
        metavar="FILE",
        help='a JSON array of {"role": ..., "content": ...} objects (\'-\' reads standard input)',
    )
    command.add_argument(
        "--prompt-token-ids",
        metavar="ID,ID,...",
        help="the prompt as token ids, used as they are (instead of a prompt)",
    )


def one_input(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Exit 2 unless the flags give exactly one prompt."""
    inputs = (args.prompt, args.messages, args.messages_json, args.prompt_token_ids)
    if sum(x is not None for x in inputs) != 1:
        parser.error(f"{args.command}: give a prompt, --message, --messages-json or --prompt-token-ids (exactly one)")


def read_inputs(args: argparse.Namespace) -> tuple[str | None, list[tuple[str, str]] | None, list[int] | None]:
    """The prompt, chat or token ids the flags give (files and standard input read now)."""
    messages = _messages(args)
    token_ids = None if args.prompt_token_ids is None else _token_ids(args.prompt_token_ids)
    prompt = None if args.prompt is None else sys.stdin.read() if args.prompt == "-" else args.prompt
    return prompt, messages, token_ids


def _messages(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """The chat the flags give, or None for a prompt; ValueError if it is malformed."""
    if args.messages_json is not None:
        source = args.messages_json
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        data = json.loads(text)
        if not isinstance(data, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in data
        ):
            raise ValueError('--messages-json: expected a JSON array of {"role": ..., "content": ...} objects')
        return [(m["role"], m["content"]) for m in data]
    if args.messages is not None:
        turns = [tuple(message.split(":", 1)) for message in args.messages]
        if not all(len(turn) == 2 and turn[0] for turn in turns):
            raise ValueError("--message: expected ROLE:CONTENT, e.g. user:Hello")
        return [(role, content) for role, content in turns]
    return None


def _token_ids(text: str) -> list[int]:
    """--prompt-token-ids' value as ids; ValueError if it is malformed."""
    try:
        return [int(token_id) for token_id in text.split(",")]
    except ValueError:
        raise ValueError("--prompt-token-ids: expected token ids separated by commas, e.g. 1,2,3") from None


def _logit_bias(entries: list[str]) -> dict[int, float]:
    """--logit-bias' values as a map; ValueError if one is malformed."""
    bias: dict[int, float] = {}
    for entry in entries:
        token_id, _, value = entry.partition("=")
        try:
            bias[int(token_id)] = float(value)
        except ValueError:
            raise ValueError(f"--logit-bias: expected ID=BIAS, e.g. 50256=-100, got {entry!r}") from None
    return bias


def generate_options(args: argparse.Namespace) -> SampleOptions:
    """The request parameters `generate`'s flags give (files read now); ValueError or OSError if one is bad."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "stop_sequences": args.stop_sequences,
        "include_stop_sequence": args.include_stop_sequence,
        "stop_token_ids": args.stop_token_ids,
        "ignore_eos": args.ignore_eos,
        "truncate_input_tokens": args.truncate_input_tokens,
        "time_limit_ms": args.time_limit_ms,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "min_p": args.min_p,
        "typical_p": args.typical_p,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "logit_bias": _logit_bias(args.logit_bias),
        "seed": args.seed,
        "logprobs": args.logprobs,
        "top_logprobs": args.top_logprobs,
        "prompt_logprobs": args.prompt_logprobs,
        "request_id": args.request_id,
        **_constraint(args),
    }


def _constraint(args: argparse.Namespace) -> SampleOptions:
    """The structured-output option the flags ask for (files read now)."""
    if args.json_schema is not None:
        return {"json_schema": Path(args.json_schema).read_text(encoding="utf-8")}
    if args.grammar is not None:
        return {"grammar": Path(args.grammar).read_text(encoding="utf-8")}
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice:
        return {"choice": args.choice}
    return {}
