"""What every transformers engine shares: prompts in, text events out.

An engine subclass only produces token ids (`_token_ids`); this layer turns a
request into prompt ids (truncation, context limits), and ids into events:
incremental detokenization that never splits a UTF-8 character, stop
sequences matched on text across token boundaries, the time limit, and the one
`Finished` event that ends every successful stream.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from .base import (
    CoreState,
    EngineEvent,
    EngineRequest,
    Finished,
    FinishReason,
    InvalidRequestError,
    ModelInfo,
    TextDelta,
    Tokens,
)
from .sampling import GREEDY, Sampling, TokenLogprob

# What an engine's `_token_ids` yields: new token ids and, when the request
# asked for them, their logprobs (one per id).
Step = tuple[list[int], list[TokenLogprob] | None]

# Inputs longer than this (characters of prompt or chat messages) are encoded
# in a worker thread: tokenizing megabytes takes seconds, and on the event loop
# it would stall every other stream and health probe meanwhile.
BIG_INPUT_CHARS = 16_384
_T = TypeVar("_T")


async def sized_call(chars: int, work: Callable[..., _T], *args: Any) -> _T:
    """`work(*args)` here for an input of `chars` characters, or in a worker thread past BIG_INPUT_CHARS."""
    return work(*args) if chars <= BIG_INPUT_CHARS else await asyncio.to_thread(work, *args)


def _special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids `tokenizer` puts before and after a text (for most causal LMs: one start token)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request turned into model input.

    Attributes:
        ids: the prompt's token ids, after truncation.
        max_new_tokens: the tokens to generate, after clipping to the context.
        clipped: whether the context, not the request, set `max_new_tokens`.
        sampling: the request's sampling, its seed chosen when it had none.
    """

    ids: list[int]
    max_new_tokens: int
    clipped: bool
    sampling: Sampling = GREEDY


class StopMatcher:
    """Finds stop sequences in streamed text, holding back possible beginnings.

    Text that could be the start of a stop sequence is held until the next
    piece shows whether it is; a match trims the text at the stop (or after
    it, when the stop is to be included).
    """

    def __init__(self, stops: Iterable[str], include: bool) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include = include
        self.held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit now, the matched stop or None)."""
        self.held += text
        if not self.stops:
            out, self.held = self.held, ""
            return out, None
        found = [(i, s) for s in self.stops if (i := self.held.find(s)) >= 0]
        if found:
            index, stop = min(found)
            end = index + len(stop) if self.include else index
            out, self.held = self.held[:end], ""
            return out, stop
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, None

    def flush(self) -> str:
        """Release held text at the end of the stream."""
        out, self.held = self.held, ""
        return out


class TokenStreamEngine(abc.ABC):
    """Base of the engines that serve a transformers model and its fast tokenizer.

    Args:
        model: a transformers causal LM on its device, in eval mode.
        tokenizer: its fast tokenizer (the incremental detokenizer needs the
            Rust backend).
        default_max_new_tokens: the length used when a request leaves it unset.
    """

    def __init__(self, model: Any, tokenizer: Any, *, default_max_new_tokens: int = 128) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.default_max_new_tokens = default_max_new_tokens
        # Requests past `_admit()` whose `generate()` has not ended: they hold
        # a place from admission on, through any await before the engine
        # registers them (a big prompt's tokenization, the first step's wait).
        self.admitted = 0
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.vocab_size = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))
        # Read now, not on a first request: those may encode on the event loop
        # and in a worker thread at once, and a tokenizer's first call may set
        # it up. (The engine process holds only TokenizerFacts: it never encodes.)
        self._specials = _special_ids(tokenizer) if callable(tokenizer) else ([], [])
        # A token's text decoded alone, for top_logprobs alternatives.
        self._piece_text = functools.lru_cache(maxsize=65536)(lambda token: str(tokenizer.decode([token])))

    @property
    def max_sequence_tokens(self) -> int:
        """The most tokens (prompt + generated) one sequence may hold."""
        return self.context_length

    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id=str(getattr(self.model, "name_or_path", "") or ""),
            context_length=self.max_sequence_tokens,
            vocab_size=self.vocab_size,
            # What a request that leaves max_new_tokens unset gets: never more than fits.
            default_max_new_tokens=min(self.default_max_new_tokens, self.max_sequence_tokens - 1),
            max_max_new_tokens=self.max_sequence_tokens - 1,
            eos_token_ids=tuple(sorted(self.eos_ids)),
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
        )

    def tokenize(self, text: str, truncate: int | None = None) -> Tokens:
        ids = self.encode(text, truncate)
        return Tokens(tuple(ids), tuple(self.tokenizer.convert_ids_to_tokens(ids)))

    def encode(self, text: str, truncate: int | None = None, *, specials: bool = True) -> list[int]:
        """The token ids of `text` as the model takes a prompt: with the
        tokenizer's special tokens (its start token), as `tokenizer(text)`
        gives them, unless `specials` is false (a rendered chat template
        writes its own). A text that already starts with the start token
        (a chat template rendered by the caller) does not get a second one.
        With `truncate`, the start token and the last tokens are kept, at
        most `truncate` in all when it leaves room for the special ones."""
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        start, end = self._specials
        tail = end if specials else []
        if start and ids[: len(start)] == start:  # the text's own start token: kept, not doubled
            head, ids = start, ids[len(start) :]
        else:
            head = start if specials else []
        if truncate:
            keep = max(truncate - len(head) - len(tail), 0)
            ids = ids[len(ids) - keep :]
        return [*head, *ids, *tail]

    def render(self, messages: tuple[tuple[str, str], ...]) -> str:
        """A conversation as prompt text: the chat template with a generation prompt."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("messages", "this model has no chat template; send a prompt instead")
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # the template's own checks (jinja raise_exception) name the problem
            raise InvalidRequestError("messages", f"the chat template rejected them: {exc}") from exc
        return str(text)

    def check_sampling(self, sampling: Sampling) -> None:  # noqa: B027  # a hook: engines refuse what they cannot do
        """Refuse sampling features this engine cannot apply (raise InvalidRequestError)."""

    def prepare(self, request: EngineRequest) -> Prepared:
        """Validate a request against the model and turn it into input ids."""
        self.check_sampling(request.sampling)
        # The template writes its own special tokens (BOS): encode its text as is.
        prompt = self.render(request.messages) if request.messages else request.prompt
        ids = self.encode(prompt, request.truncate_input_tokens, specials=not request.messages)
        if not ids:
            start = self.tokenizer.bos_token_id
            ids = [start if start is not None else min(self.eos_ids, default=0)]
        if max(ids) >= self.vocab_size:
            raise InvalidRequestError("prompt", "the tokenizer produced ids outside the model's vocabulary")
        limit = self.max_sequence_tokens
        room = limit - len(ids)
        if room <= 0:
            raise InvalidRequestError(
                "prompt",
                f"{len(ids)} tokens leave no room in the model's {limit}-token context; "
                "set truncate_input_tokens to keep only the last ones",
            )
        if request.max_new_tokens is not None and request.max_new_tokens > limit - 1:
            raise InvalidRequestError(
                "max_new_tokens", f"{request.max_new_tokens} is more than this model's context allows ({limit - 1})"
            )
        wanted = request.max_new_tokens or min(self.default_max_new_tokens, limit - 1)
        sampling = request.sampling
        if sampling.sampled and sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        return Prepared(ids, min(wanted, room), clipped=wanted > room, sampling=sampling)

    @abc.abstractmethod
    def core_state(self) -> CoreState:
        """What the core holds now and the decode steps it has run (blocking, briefly)."""

    @abc.abstractmethod
    def _admit(self) -> None:
        """Refuse a request before any work: an unstarted or failed engine, a full house."""

    @abc.abstractmethod
    def _token_ids(self, prepared: Prepared, request: EngineRequest) -> AsyncGenerator[Step, None]:
        """Yield newly generated ids (and logprobs) until generation ends; closing it cancels the request."""

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        self._admit()
        self.admitted += 1
        try:
            # aclosing: a client that leaves closes the inner stream (and so
            # cancels the request in the engine) at once, not at collection.
            async with aclosing(self._generate(request)) as events:
                async for event in events:
                    yield event
        finally:
            self.admitted -= 1

    async def _generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        size = len(request.prompt) + sum(len(role) + len(content) for role, content in request.messages)
        prepared = await sized_call(size, self.prepare, request)
        decoder = _Decoder(self.tokenizer, prepared.ids)
        stops = StopMatcher(request.stop_sequences, request.include_stop_sequence)
        deadline = None if request.time_limit_ms is None else time.monotonic() + request.time_limit_ms / 1000
        generated: list[int] = []
        # Ids (and logprobs) of tokens whose text is not out yet.
        pending: list[int] = []
        pending_lp: list[TokenLogprob] = []
        reason = FinishReason.TOKEN_LIMIT if prepared.clipped else FinishReason.MAX_TOKENS
        stop: str | None = None
        async with aclosing(self._token_ids(prepared, request)) as steps:
            while stop is None and reason is not FinishReason.EOS:
                try:
                    timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
                    ids, logprobs = await asyncio.wait_for(anext(steps), timeout)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    reason = FinishReason.TIME_LIMIT
                    break
                # Everything this step brought goes out as one event: a stream
                # that fell behind catches up in fewer, larger messages.
                text: list[str] = []
                out_ids: list[int] = []
                out_lp: list[TokenLogprob] = []
                if logprobs is not None and prepared.sampling.top_logprobs:
                    logprobs = [self._named(entry) for entry in logprobs]
                for index, token in enumerate(ids):
                    generated.append(token)
                    pending.append(token)
                    if logprobs is not None:
                        pending_lp.append(logprobs[index])
                    if token in self.eos_ids:
                        reason = FinishReason.EOS
                        break
                    out, stop = stops.feed(decoder.step(token))
                    if out:
                        text.append(out)
                        out_ids += pending
                        out_lp += pending_lp
                        pending, pending_lp = [], []
                    if stop is not None:
                        reason = FinishReason.STOP_SEQUENCE
                        break
                if text:
                    yield TextDelta("".join(text), tuple(out_ids), tuple(out_lp))
        if (rest := stops.flush()) and stop is None:
            tail = [] if reason is not FinishReason.EOS else pending[-1:]
            keep = len(pending) - len(tail)
            yield TextDelta(rest, tuple(pending[:keep]), tuple(pending_lp[:keep]))
            pending, pending_lp = tail, pending_lp[keep:]
        yield Finished(
            reason,
            len(prepared.ids),
            len(generated),
            tuple(generated),
            stop or "",
            tuple(pending),
            tuple(pending_lp),
            prepared.sampling.seed if prepared.sampling.sampled else None,
        )

    def _named(self, entry: TokenLogprob) -> TokenLogprob:
        return dataclasses.replace(entry, top_text=tuple(self._piece_text(token) for token, _ in entry.top))


class _Decoder:
    """Incremental detokenization with the tokenizer's Rust DecodeStream."""

    def __init__(self, tokenizer: Any, prompt: list[int]) -> None:
        from tokenizers.decoders import DecodeStream  # deferred: no tokenizers work at import

        self._backend = tokenizer.backend_tokenizer
        # Seeded with the prompt so the first piece decodes in context (a
        # leading space, a character begun by the prompt's last bytes).
        self._stream = DecodeStream(ids=list(prompt), skip_special_tokens=True)

    def step(self, token: int) -> str:
        return self._stream.step(self._backend, token) or ""
