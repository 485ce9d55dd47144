"""Structured output: a request's constraint (JSON schema, JSON object, regex, choice, grammar) as token masks.

llguidance does the matching: a constraint becomes an llguidance grammar
(`Constraint.grammar`), compiled once per content (`Grammars`, a bounded
cache) against the model's tokenizer, and each constrained sequence gets its
own `LLMatcher`. Before every step the engine asks each constrained row's
matcher for the tokens it allows (a bitmask of 32 tokens per int32), masks the
row's logits with it, and after the step feeds the chosen token back
(`Follower`). Rows without a constraint are not touched. When the constraint
is complete, the matcher allows only the end-of-sequence token, so the
stream ends with EOS and the usual final message.

Grammars are Lark, in llguidance's dialect (its `%json` and regex extensions
included). Limits on the work one constraint may cost (`LIMITS`) bound a
hostile schema or grammar; a constraint that does not compile, or that
llguidance does not support, is an InvalidRequestError naming the field.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import EngineError, InvalidRequestError

if TYPE_CHECKING:
    import torch

    from .core import ModelFacts

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# The most text one constraint may carry (a schema, a regex, a grammar, the choices).
MAX_CONSTRAINT_BYTES = 64 * 1024
# Compiled grammars kept, by content.
CACHED_GRAMMARS = 256
# JSON on one line, laid out as Python's json.dumps does. (llguidance allows any
# whitespace between tokens by default, and a small model may then emit
# newlines until its length runs out; a schema's own "x-guidance" may ask for that.)
JSON_LAYOUT: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class Constraint:
    """What a request's output must match.

    Attributes:
        kind: one of KINDS.
        text: the JSON Schema document, the regex or the Lark grammar; for
            `choice`, a JSON list of the strings; empty for `json_object`.
    """

    kind: str
    text: str = ""

    @property
    def field(self) -> str:
        """The GenerateRequest field it came from, for error messages."""
        return self.kind

    def grammar(self) -> str:
        """The llguidance grammar of this constraint (not yet checked).

        Raises:
            InvalidRequestError: the text is not what its kind needs (a schema that is not JSON, ...).
        """
        from llguidance import LLMatcher

        if self.kind not in KINDS:
            raise InvalidRequestError(self.field, f"{self.kind!r} is no constraint kind ({', '.join(KINDS)})")
        try:
            parsed = json.loads(self.text) if self.kind in ("json_schema", "choice") else None
        except ValueError as exc:
            raise InvalidRequestError(self.field, f"does not parse: {exc}") from exc
        if self.kind == "json_schema" and not isinstance(parsed, dict):
            raise InvalidRequestError(self.field, "a JSON Schema is a JSON object")
        if self.kind == "choice" and not (
            isinstance(parsed, list) and parsed and all(isinstance(o, str) for o in parsed)
        ):
            raise InvalidRequestError(self.field, "give at least one string to choose from")
        if self.kind == "json_schema":
            assert isinstance(parsed, dict)
            return str(LLMatcher.grammar_from_json_schema(parsed, defaults=JSON_LAYOUT))
        if self.kind == "json_object":
            return str(LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT))
        if self.kind == "regex":
            return str(LLMatcher.grammar_from_regex(self.text))
        if self.kind == "choice":
            assert isinstance(parsed, list)
            return str(LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in parsed)))
        return str(LLMatcher.grammar_from_lark(self.text))


def _one_line(error: str) -> str:
    """llguidance's message on one line: its first line and its `error:` lines (not the source it quotes)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return " ".join([lines[0], *(line for line in lines[1:] if line.startswith("error:"))])


def _limits() -> Any:
    from llguidance import LLParserLimits

    # llguidance's defaults, with a smaller grammar: a request's schema is not a language.
    return LLParserLimits(max_grammar_size=100_000, verbose_errors=False)


class Grammars:
    """Compiles constraints against one tokenizer, and makes matchers for them.

    Args:
        tokenizer: the model's fast tokenizer.
        vocab_size: the model's output size (the masks' width), which may exceed the tokenizer's.
        eos_ids: the ids that end a generation; a complete constraint allows only these.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.compiled = functools.lru_cache(maxsize=CACHED_GRAMMARS)(self._compile)

    @classmethod
    def of(cls, tokenizer: Any, facts: ModelFacts) -> Grammars:
        """The grammars of a model with these facts and this tokenizer."""
        return cls(tokenizer, facts.vocab_size, facts.eos_ids)

    @functools.cached_property
    def tokenizer(self) -> Any:
        """llguidance's view of the tokenizer (built on the first constraint: up to a second)."""
        import llguidance.hf

        eos = list(self.eos_ids) or self.hf_tokenizer.eos_token_id
        return llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos)

    @functools.cached_property
    def limits(self) -> Any:
        return _limits()

    def _compile(self, constraint: Constraint) -> str:
        from llguidance import LLMatcher

        grammar = constraint.grammar()
        error = LLMatcher.validate_grammar(grammar, self.tokenizer, limits=self.limits)
        if error:
            raise InvalidRequestError(constraint.field, f"cannot be used: {_one_line(error)}")
        return grammar

    def check(self, constraint: Constraint) -> None:
        """Raise InvalidRequestError, naming the field, if the constraint cannot be used (blocking)."""
        if len(constraint.text.encode()) > MAX_CONSTRAINT_BYTES:
            raise InvalidRequestError(constraint.field, f"is over {MAX_CONSTRAINT_BYTES // 1024} KiB")
        self.compiled(constraint)

    def follower(self, constraint: Constraint) -> Follower:
        """A new matcher for one sequence under `constraint` (checked already)."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, self.compiled(constraint), limits=self.limits)
        if matcher.is_error():
            raise InvalidRequestError(constraint.field, f"cannot be used: {_one_line(matcher.get_error())}")
        return Follower(matcher)


class Follower:
    """One constrained sequence's matcher: the tokens allowed next, and the tokens chosen so far."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.consumed = 0  # generated tokens fed to the matcher

    @property
    def error(self) -> str | None:
        """Why the sequence left the constraint (a bug, or a limit hit), if it did."""
        return str(self.matcher.get_error()) if self.matcher.is_error() else None

    def follow(self, generated: list[int]) -> None:
        """Feed the tokens of `generated` (the sequence's tokens so far) that the matcher has not seen."""
        new = generated[self.consumed :]
        if new:
            self.matcher.consume_tokens(new)
            self.consumed = len(generated)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of an int32 [rows, words] CPU bitmask."""
        import torch

        line = bitmask[row]
        if line.dtype != torch.int32 or not line.is_cpu or not line.is_contiguous():
            raise ValueError("a bitmask row is contiguous int32 in CPU memory")
        # What llguidance.torch.fill_next_token_bitmask does, without importing that
        # module (it compiles a torch kernel at import, and warns while doing so).
        self.matcher.unsafe_compute_mask_ptr(line.data_ptr(), line.numel() * line.element_size())


class Masks:
    """The constrained rows' masks of a step, computed together: with llguidance's executor, in its
    own thread pool and off the GIL, when more than one row is constrained."""

    def __init__(self) -> None:
        self._executor: Any = None

    def fill(self, rows: list[tuple[Follower, int]], bitmask: torch.Tensor) -> None:
        """Write each (follower, row)'s allowed next tokens into its row of an int32 [rows, words]
        contiguous CPU bitmask (the followers have seen their sequences' tokens)."""
        import torch

        if len(rows) == 1:
            follower, row = rows[0]
            follower.fill(bitmask, row)
            return
        if bitmask.dtype != torch.int32 or not bitmask.is_cpu or not bitmask.is_contiguous():
            raise ValueError("a bitmask is contiguous int32 in CPU memory")
        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor()
        matchers = [(follower.matcher, row) for follower, row in rows]
        # What llguidance.torch.fill_next_token_bitmask_par does (see Follower.fill).
        self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


def words(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def allowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A bool [rows, vocab] mask from an int32 [rows, words] bitmask (on its device): elementwise, so
    it runs inside a captured CUDA graph too."""
    import torch

    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    unpacked = (bitmask[:, :, None] >> bits[None, None, :]) & 1
    return unpacked.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def step_mask(
    followers: list[Follower | None], generated: list[list[int]], vocab_size: int, device: Any, masks: Masks
) -> torch.Tensor | None:
    """The tokens each row may take this step, bool [rows, vocab], after each constrained row's
    follower has seen its sequence's newest tokens (`generated[row]`); None when no row is constrained.

    Raises:
        EngineError: a constrained sequence left its constraint (a limit of llguidance's hit).
    """
    import torch

    if all(f is None for f in followers):
        return None
    bitmask = torch.full((len(followers), words(vocab_size)), -1, dtype=torch.int32)
    rows: list[tuple[Follower, int]] = []
    for row, (follower, tokens) in enumerate(zip(followers, generated, strict=True)):
        if follower is not None:
            follower.follow(tokens)
            if (error := follower.error) is not None:
                raise EngineError(f"the output left its constraint: {error}")
            rows.append((follower, row))
    masks.fill(rows, bitmask)
    return allowed(bitmask.to(device), vocab_size)
