"""The front end every engine shares: requests in, text events out, over one core.

The front end turns a request into prompt ids (chat template, truncation,
context limits), admits it (a bounded number in flight), hands it to its
core (`core.Core`) and turns the token ids that come back into events:
incremental detokenization that never splits a UTF-8 character, stop
sequences matched on text across token boundaries, the time limit, and the
one `Finished` event that ends every successful stream. A stream closed
early (its client left) cancels its request in the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

from . import chat
from .base import (
    DEFAULT_MAX_NEW_TOKENS,
    HANDOFF,
    CoreState,
    EngineError,
    EngineEvent,
    EngineOverloadedError,
    EngineRequest,
    Finished,
    FinishReason,
    ModelInfo,
    Scored,
    TextDelta,
    Tokens,
)
from .constraints import KINDS, Grammars
from .core import Core, ModelFacts, SeqOutput
from .inputs import Inputs, Prepared
from .samples import merged
from .sampling import TokenLogprob, sample_seed
from .text import Decoder, StopMatcher, sized_call

log = logging.getLogger(__name__)

_DEAD = object()  # put in every waiting request's queue when the core fails

# What `_steps` yields: new token ids, their logprobs (one per id) when the
# request asked for them, prompt tokens the core took from its prefix cache,
# and the prompt's logprobs when they come.
Step = tuple[tuple[int, ...], tuple[TokenLogprob, ...] | None, int, tuple[TokenLogprob, ...] | None]


class FrontEnd:
    """An `Engine`: a transformers model's tokenizer here, its core wherever it runs.

    `kind` names how its core generates, for GetModelInfo and the start-up
    line: "batching" (continuous batching) unless a subclass says otherwise.

    Args:
        core: what runs the model.
        facts: the model's facts (context, vocabulary, EOS ids).
        tokenizer: the model's fast tokenizer (the incremental detokenizer
            needs the Rust backend).
        capacity: requests held at most, decoding plus waiting (None: no limit).
        capacity_note: how `capacity` is made up, for the refusal's message.
        max_sequence_tokens: the most tokens one sequence may hold, when the
            core allows fewer than the model's context.
        default_max_new_tokens: the length used when a request leaves it unset.
        grammars: compiles requests' constraints (structured output); the
            core's own when it runs in this process.
    """

    kind = "batching"
    # Whether the core shares prompt prefixes (a prefix cache): then n samples prefill once.
    shares_prefixes = False

    def __init__(
        self,
        core: Core,
        facts: ModelFacts,
        tokenizer: Any,
        *,
        capacity: int | None = None,
        capacity_note: str = "",
        max_sequence_tokens: int | None = None,
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        grammars: Grammars | None = None,
    ) -> None:
        self.core = core
        self.facts = facts
        self.tokenizer = tokenizer
        # Requests' constraints are checked here, before admission (the core has its own for matching).
        self.grammars = grammars or Grammars.of(tokenizer, facts)
        self.capacity = capacity
        self._capacity_note = capacity_note
        self.default_max_new_tokens = default_max_new_tokens
        self.context_length = facts.context_length
        self.vocab_size = facts.vocab_size
        self.eos_ids = frozenset(facts.eos_ids)
        self.max_sequence_tokens = min(facts.context_length, max_sequence_tokens or facts.context_length)
        # Requests admitted whose `generate()` has not ended: they hold a place
        # from admission on, through any await before the core has them (a big
        # prompt's tokenization, the first step's wait).
        self.in_flight = 0
        # Requests turned into prompt ids and checked against the model.
        self.inputs = Inputs(
            tokenizer,
            self.grammars,
            vocab_size=facts.vocab_size,
            eos_ids=self.eos_ids,
            max_sequence_tokens=self.max_sequence_tokens,
            default_max_new_tokens=default_max_new_tokens,
        )
        # A token's text decoded alone, for top_logprobs alternatives.
        self._piece_text = functools.lru_cache(maxsize=65536)(lambda token: str(tokenizer.decode([token])))
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._ids = itertools.count()
        self._started = False
        self._failure: str | None = None
        self._start_lock = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Started, not failed, and the core can serve."""
        return self._started and self._failure is None and self.core.healthy

    @property
    def stalled(self) -> bool:
        """Not failed, but its core does not run (stuck, or its process not answering): it may recover."""
        return self._started and self._failure is None and self.core.stalled

    async def start(self) -> None:
        # The first requests may all call start() at once: one starts the core.
        async with self._start_lock:
            if self._started:
                return
            await self.core.start(self)
            self._started = True

    async def close(self) -> None:
        self._started = False
        await self.core.close()
        self._fail_waiting()
        self._start_lock = asyncio.Lock()  # a later start() may run on another event loop

    # -- what the core reports (on the event loop) -----------------------------

    def deliver(self, outputs: Sequence[SeqOutput]) -> None:
        for output in outputs:
            queue = self._queues.get(output.rid)
            if queue is not None:  # None: the request was cancelled; drop its stragglers
                queue.put_nowait(output)

    def core_failed(self, reason: str) -> None:
        log.error("engine failed: %s", reason)
        self._failure = reason
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        for queue in self._queues.values():
            queue.put_nowait(_DEAD)

    # -- the model, as requests see it ----------------------------------------

    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id=self.facts.model_id,
            context_length=self.max_sequence_tokens,
            vocab_size=self.vocab_size,
            # What a request that leaves max_new_tokens unset gets: never more than fits.
            default_max_new_tokens=min(self.default_max_new_tokens, self.max_sequence_tokens - 1),
            max_max_new_tokens=self.max_sequence_tokens - 1,
            eos_token_ids=tuple(sorted(self.eos_ids)),
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
            engine=self.kind,
            constraint_kinds=KINDS,
        )

    def tokenize(self, text: str, truncate: int | None = None) -> Tokens:
        ids = self.encode(text, truncate)
        return Tokens(tuple(ids), tuple(self.tokenizer.convert_ids_to_tokens(ids)))

    def encode(self, text: str, truncate: int | None = None, *, specials: bool = True) -> list[int]:
        """The token ids of `text` as the model takes a prompt (`Inputs.encode`)."""
        return self.inputs.encode(text, truncate, specials=specials)

    def encode_chat(self, messages: tuple[tuple[str, str], ...], truncate: int | None = None) -> list[int]:
        """A conversation's prompt ids (`Inputs.encode_chat`)."""
        return self.inputs.encode_chat(messages, truncate)

    def render(self, messages: tuple[tuple[str, str], ...]) -> str:
        """A conversation as prompt text: the chat template with a generation prompt."""
        return chat.render(self.tokenizer, messages)

    def prepare(self, request: EngineRequest) -> Prepared:
        """A request checked against the model and turned into input ids (`Inputs.prepare`; a
        constraint is compiled: blocking)."""
        return self.inputs.prepare(request)

    # -- requests -------------------------------------------------------------

    def _admit(self, places: int = 1) -> None:
        """Refuse a request before any work: an unstarted or failed engine, a full house (it takes
        `places`: one per sample)."""
        if not self._started:
            raise EngineError("engine is not started")
        if self._failure is not None:
            raise EngineError(f"engine has failed: {self._failure}")
        if self.capacity is not None and self.in_flight + places > self.capacity:
            raise EngineOverloadedError(f"server at capacity: {self.in_flight} requests in flight{self._capacity_note}")
        self.core.check_admission()

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        places = request.n
        self._admit(places)
        self.in_flight += places
        try:
            # aclosing: a client that leaves closes the inner stream (and so
            # cancels the request in the core) at once, not at collection.
            async with aclosing(self._generate(request)) as events:
                async for event in events:
                    yield event
        finally:
            self.in_flight -= places

    async def _steps(self, prepared: Prepared) -> AsyncGenerator[Step, None]:
        """The core's new ids (and logprobs) for `prepared` until it ends; closing it cancels the request."""
        rid = f"req-{next(self._ids)}"
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[rid] = queue
        done = False
        try:
            if not self._started:  # closed while it was being prepared
                raise EngineError("engine is not started")
            if self._failure is not None:  # failed meanwhile
                raise EngineError(f"engine has failed: {self._failure}")
            self.core.add(rid, prepared)
            if (moments := HANDOFF.get()) is not None:
                moments.append(time.perf_counter())
            while not done:
                item = await queue.get()
                # A stream that fell behind takes every step waiting as one.
                ids: tuple[int, ...] = ()
                logprobs: tuple[TokenLogprob, ...] | None = None
                cached = 0
                prompt: tuple[TokenLogprob, ...] | None = None
                while True:
                    if item is _DEAD:
                        raise EngineError(f"engine has failed: {self._failure or 'stopped'}")
                    output: SeqOutput = item
                    ids += output.ids
                    cached += output.cached
                    prompt = output.prompt if output.prompt is not None else prompt
                    if output.logprobs is not None:
                        logprobs = (logprobs or ()) + output.logprobs
                    done = output.finished
                    if output.error is not None:
                        raise EngineError(output.error)  # the core has dropped it already
                    if done or queue.empty():
                        break
                    item = queue.get_nowait()
                if ids or prompt is not None:
                    yield ids, logprobs, cached, prompt
        finally:
            del self._queues[rid]
            if not done and self._failure is None:
                with contextlib.suppress(EngineError):  # the core is gone: nothing holds the request any more
                    self.core.cancel(rid)

    async def _generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        size = len(request.prompt) + len(request.prompt_token_ids)
        size += sum(len(role) + len(content) for role, content in request.messages)
        if request.sampling.constraint is not None:  # compiling a schema or a grammar: off the event loop
            prepared = await asyncio.to_thread(self.prepare, request)
        else:
            prepared = await sized_call(size, self.prepare, request)
        if request.n == 1:
            events = self._sample(request, prepared)
        else:

            def sample(index: int, first: asyncio.Event | None) -> AsyncGenerator[EngineEvent, None]:
                seed = prepared.sampling.seed
                sampling = prepared.sampling
                if sampling.sampled and seed is not None:
                    sampling = dataclasses.replace(sampling, seed=sample_seed(seed, index))
                if index:  # sample 0 carries the prompt's logprobs
                    sampling = dataclasses.replace(sampling, prompt_logprobs=None)
                return self._sample(request, dataclasses.replace(prepared, sampling=sampling), index, first)

            # Sample 0 first where the core shares prefixes (one prefill), and where it scores the prompt
            # (its logprobs come before any sample's text).
            scoring = prepared.sampling.prompt_logprobs is not None
            events = merged(sample, request.n, staggered=self.shares_prefixes or scoring)
        async with aclosing(events) as stream:
            async for event in stream:
                yield event

    async def _sample(
        self, request: EngineRequest, prepared: Prepared, index: int = 0, first: asyncio.Event | None = None
    ) -> AsyncGenerator[EngineEvent, None]:
        """One generation of `prepared`, its events marked `index`; `first` is set once the core's first
        step for it has come (its prompt is prefilled)."""
        decoder = Decoder(self.tokenizer, prepared.ids)
        stops = StopMatcher(request.stop_sequences, request.include_stop_sequence)
        deadline = None if request.time_limit_ms is None else time.monotonic() + request.time_limit_ms / 1000
        generated: list[int] = []
        # Ids (and logprobs) of tokens whose text is not out yet.
        pending: list[int] = []
        pending_lp: list[TokenLogprob] = []
        reason = FinishReason.TOKEN_LIMIT if prepared.clipped else FinishReason.MAX_TOKENS
        stop: str | None = None
        stop_ids = prepared.sampling.stop_ids(self.eos_ids)
        stop_token: int | None = None
        cached = 0
        async with aclosing(self._steps(prepared)) as steps:
            while stop is None and stop_token is None:
                try:
                    timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
                    ids, logprobs, hits, prompt = await asyncio.wait_for(anext(steps), timeout)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    reason = FinishReason.TIME_LIMIT
                    break
                cached += hits
                if prompt is not None:
                    yield Scored(await sized_call(len(prompt) * 8, self._named_all, prompt), index)
                if first is not None and ids:
                    first.set()
                # Everything this step brought goes out as one event: a stream
                # that fell behind catches up in fewer, larger messages.
                text: list[str] = []
                out_ids: list[int] = []
                out_lp: list[TokenLogprob] = []
                if logprobs is not None and prepared.sampling.top_logprobs:
                    logprobs = tuple(self._named(entry) for entry in logprobs)
                for at, token in enumerate(ids):
                    generated.append(token)
                    pending.append(token)
                    if logprobs is not None:
                        pending_lp.append(logprobs[at])
                    if token in stop_ids:  # not text: it goes out with the last message
                        stop_token = token
                        stopped = token in prepared.sampling.stop_token_ids
                        reason = FinishReason.STOP_TOKEN if stopped else FinishReason.EOS
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
                    yield TextDelta("".join(text), tuple(out_ids), tuple(out_lp), index)
        if (rest := stops.flush()) and stop is None:
            tail = [] if stop_token is None else pending[-1:]
            keep = len(pending) - len(tail)
            yield TextDelta(rest, tuple(pending[:keep]), tuple(pending_lp[:keep]), index)
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
            stop_token if reason is FinishReason.STOP_TOKEN else None,
            cached,
            index,
        )

    def _named_all(self, entries: tuple[TokenLogprob, ...]) -> tuple[TokenLogprob, ...]:
        return tuple(self._named(entry) for entry in entries)

    def _named(self, entry: TokenLogprob) -> TokenLogprob:
        return dataclasses.replace(entry, top_text=tuple(self._piece_text(token) for token, _ in entry.top))

    # -- diagnostics ----------------------------------------------------------

    def core_state(self) -> CoreState:
        """What the core holds now and the decode steps it has run (blocking, briefly;
        for a core in another process, call it from a thread other than the event loop)."""
        return self.core.state()

    def per_core(self) -> list[tuple[int, bool]]:
        """Each core's (requests it has, whether it serves), for metrics: here, one core."""
        return [(self.in_flight, self.core.healthy)]

    def occupancy(self) -> tuple[int, int]:
        """(decoding, waiting) requests now, for metrics; may be read from another thread."""
        held = self.in_flight
        active = min(self.core.active, held)
        return (active, held - active)
