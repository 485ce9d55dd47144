"""A request turned into model input: its prompt ids and the checks it must pass against the model.

The prompt comes as text (encoded as the tokenizer encodes a text, its start
token kept, not doubled), as a conversation (the chat template's markup as it
writes it, each message's content as data), or as token ids used as given;
truncation keeps the start token and the last ids. The request is checked
against the model before it takes a place in a core: ids in the vocabulary,
a prompt that leaves room in the context, a length within it, a constraint
that compiles, prompt logprobs the engine scores.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import Any

from . import chat
from .base import EngineRequest, InvalidRequestError
from .constraints import Grammars
from .sampling import GREEDY, Sampling
from .text import special_ids

# The longest prompt whose logprobs a request may ask for, unless the server is started with another.
MAX_PROMPT_LOGPROBS_TOKENS = 4096


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


class Inputs:
    """Turns requests into prompt ids for one model, checking them against it.

    Args:
        tokenizer: the model's tokenizer.
        grammars: compiles requests' constraints (checked here, before admission).
        vocab_size: the model's vocabulary (its output layer).
        eos_ids: the ids that end a generation.
        max_sequence_tokens: the most tokens one sequence may hold.
        default_max_new_tokens: the length of a request that leaves it unset.

    Attributes:
        scores_prompts: whether the engine computes prompt logprobs (not with
            tensor parallelism).
        max_prompt_logprobs_tokens: the longest prompt a request may ask
            prompt logprobs of (`--max-prompt-logprobs-tokens`).
    """

    def __init__(
        self,
        tokenizer: Any,
        grammars: Grammars,
        *,
        vocab_size: int,
        eos_ids: frozenset[int],
        max_sequence_tokens: int,
        default_max_new_tokens: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.max_sequence_tokens = max_sequence_tokens
        self.default_max_new_tokens = default_max_new_tokens
        self.scores_prompts = True
        self.max_prompt_logprobs_tokens = MAX_PROMPT_LOGPROBS_TOKENS
        # Read now, not on a first request: those may encode on the event loop
        # and in a worker thread at once, and a tokenizer's first call may set it up.
        self._specials = special_ids(tokenizer)
        self._special_texts = chat.special_texts(tokenizer)

    def encode(self, text: str, truncate: int | None = None, *, specials: bool = True) -> list[int]:
        """The token ids of `text` as the model takes a prompt: with the
        tokenizer's special tokens (its start token), as `tokenizer(text)`
        gives them, unless `specials` is false (a rendered chat template
        writes its own). A text that already starts with the start token
        (a chat template rendered by the caller) does not get a second one.
        With `truncate`, the start token and the last tokens are kept, at
        most `truncate` in all when it leaves room for the special ones."""
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._framed(ids, truncate, specials)

    def encode_chat(self, messages: tuple[tuple[str, str], ...], truncate: int | None = None) -> list[int]:
        """A conversation's prompt ids: the chat template's markup as it writes it (its
        special tokens included), each message's content as data (`chat.pieces`)."""
        ids: list[int] = []
        for piece, data in chat.pieces(self.tokenizer, messages, self._special_texts):
            ids += self.tokenizer(piece, add_special_tokens=False, split_special_tokens=data)["input_ids"]
        return self._framed(ids, truncate, specials=False)  # the template writes its own (BOS)

    def _framed(self, ids: list[int], truncate: int | None, specials: bool) -> list[int]:
        start, end = self._specials
        tail = end if specials else []
        if start and ids[: len(start)] == start:  # the text's own start token: kept, not doubled
            head, ids = start, ids[len(start) :]
        else:
            head = start if specials else []
        if truncate:
            keep = max(truncate - len(head) - len(tail), 0)
            ids = ids[max(len(ids) - keep, 0) :]
        return [*head, *ids, *tail]

    def prepare(self, request: EngineRequest) -> Prepared:
        """Validate a request against the model and turn it into input ids (its constraint, if any, is
        compiled: blocking)."""
        if (constraint := request.sampling.constraint) is not None:
            if request.sampling.min_new_tokens:
                raise InvalidRequestError(
                    "min_new_tokens", "cannot be combined with a constraint, which ends the output when it is complete"
                )
            if request.sampling.ignore_eos:
                raise InvalidRequestError(
                    "ignore_eos",
                    "cannot be combined with a constraint, which ends the output with an end-of-sequence token",
                )
            self.grammars.check(constraint)
        self._check_ids(request)
        if request.prompt_token_ids:  # as they are: no special tokens added
            ids = self._framed(list(request.prompt_token_ids), request.truncate_input_tokens, specials=False)
        elif request.messages:
            ids = self.encode_chat(request.messages, request.truncate_input_tokens)
        else:
            ids = self.encode(request.prompt, request.truncate_input_tokens)
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
        self._check_scoring(request, len(ids))
        wanted = (
            min(self.default_max_new_tokens, limit - 1) if request.max_new_tokens is None else request.max_new_tokens
        )
        sampling = request.sampling
        if sampling.sampled and sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        return Prepared(ids, min(wanted, room), clipped=wanted > room, sampling=sampling)

    def _check_scoring(self, request: EngineRequest, prompt_tokens: int) -> None:
        """Refuse prompt logprobs this engine cannot or may not compute, and a request that would do nothing."""
        asked = request.sampling.prompt_logprobs is not None
        if request.max_new_tokens == 0 and not asked:
            raise InvalidRequestError("max_new_tokens", "0 only scores the prompt: set prompt_logprobs")
        if request.max_new_tokens == 0 and request.n > 1:
            raise InvalidRequestError("n", "more than one sample of nothing: max_new_tokens 0 only scores the prompt")
        if not asked:
            return
        if not self.scores_prompts:
            raise InvalidRequestError(
                "prompt_logprobs", "this server's engine does not score prompts (tensor parallel)"
            )
        if prompt_tokens > (bound := self.max_prompt_logprobs_tokens):
            raise InvalidRequestError(
                "prompt_logprobs",
                f"the prompt's {prompt_tokens} tokens are more than this server scores ({bound}: "
                "--max-prompt-logprobs-tokens); send a shorter prompt or set truncate_input_tokens",
            )

    def _check_ids(self, request: EngineRequest) -> None:
        """Refuse token ids a request names that are not in the model's vocabulary."""
        named = [(f"prompt_token_ids[{i}]", t) for i, t in enumerate(request.prompt_token_ids)]
        named += [(f"stop_token_ids[{i}]", t) for i, t in enumerate(request.sampling.stop_token_ids)]
        named += [(f"logit_bias[{t}]", t) for t, _ in request.sampling.logit_bias]
        for field, token in named:
            if token >= self.vocab_size:
                said = f"{token} is not a token id of this model (its vocabulary has {self.vocab_size})"
                raise InvalidRequestError(field, said)
