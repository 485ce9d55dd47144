"""Padded batches on the model's own KV cache: batching for every architecture (`--engine padded`).

transformers' continuous batching needs a model to run on its paged cache,
which some architectures do not (GPT-NeoX, OPT, Bloom, Falcon, StableLM in
transformers 5.24). `PaddedCore` batches them the way `generate` batches
prompts: requests that wait together (up to `max_batch_size`) are
left-padded into one batch with an attention mask (and position ids, where
the model takes them), prefilled in one forward pass, and decoded step by
step on the model's ordinary cache. A request that waits while a batch runs
joins the next one (a new batch waits a few milliseconds for requests sent
with its first). Each row chooses its token with its own sampling
(`sampling.pick`, the code every core uses), so a seed gives the same text
alone or in a batch; each row stops on its own (EOS, its length, a cancel
checked before every step). A finished row's later steps are computed and
discarded, so a batch runs as long as its longest row. One worker thread
runs the model; the event loop never does. The engine process (`worker`)
hosts this core too, when its probe finds continuous batching cannot run the
model and the server chose `--engine auto`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import rows as r
from .base import DEFAULT_MAX_NEW_TOKENS, CoreState, EngineError
from .constraints import Grammars, Masks, step_mask
from .core import CoreSink, ModelFacts, Pulse, SeqOutput
from .frontend import FrontEnd
from .inputs import Prepared
from .scoring import Scoring
from .settings import BatchingSettings

log = logging.getLogger(__name__)

Emit = Callable[[Sequence[SeqOutput]], None]

GATHER_WINDOW = 0.005  # seconds a new batch waits for requests that arrive with its first


class PaddedCore:
    """Decodes padded batches of waiting requests on one worker thread.

    Args:
        model: a transformers causal LM, already on its device and in eval mode.
        facts: the model's facts.
        max_batch_size: rows in one batch at most.
        pad_token_id: the id padding fills the left of shorter prompts with
            (masked out; any id the model embeds will do).
        grammars: compiles requests' constraints (structured output).
    """

    def __init__(
        self, model: Any, facts: ModelFacts, *, max_batch_size: int, pad_token_id: int | None, grammars: Grammars
    ) -> None:
        self.model = model
        self.grammars = grammars
        self.eos_ids = frozenset(facts.eos_ids)
        self.max_batch_size = max_batch_size
        self.pad_token_id = pad_token_id if pad_token_id is not None else (min(self.eos_ids, default=0))
        forward = inspect.signature(model.forward).parameters
        # transformers 5.x renamed the KV-cache argument (and output) from
        # past_key_values to cache; models written for either keep working.
        self._cache_name = "cache" if "cache" in forward else "past_key_values"
        # Left padding shifts every row's positions: models that take them get
        # them from the mask (the others, Bloom and OPT, derive them from it).
        self._positions = "position_ids" in forward
        # Only the last position's logits are used: the prefill need not
        # project every prompt position onto the vocabulary.
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._condition = threading.Condition()
        self._waiting: collections.deque[tuple[str, Prepared]] = collections.deque()
        self._cancelled: set[str] = set()  # requests of the running batch whose client left
        self._running: set[str] = set()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._emit: Emit | None = None
        self._steps = 0  # forward passes, written by the worker thread alone
        self.pulse = Pulse()
        self.scoring = Scoring(model)
        self.masks = Masks()  # the constrained rows' masks of a step

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.stalled

    @property
    def stalled(self) -> bool:
        """The batch thread holds requests and has run no forward pass for the pulse's timeout."""
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self.pulse.stuck(bool(self._waiting or self._running), self._steps)

    @property
    def active(self) -> int:
        return len(self._running)

    def check_admission(self) -> None:
        if self.stalled:  # the front end's capacity is otherwise this core's whole admission
            raise self.pulse.refusal()

    async def start(self, sink: CoreSink) -> None:
        loop = asyncio.get_running_loop()

        def post(callback: Callable[[Any], None], arg: Any) -> None:
            # A closed loop means the server is gone and the result has no reader.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(callback, arg)

        self.launch(lambda outputs: post(sink.deliver, outputs), lambda reason: post(sink.core_failed, reason))

    def launch(self, deliver: Emit, fail: Callable[[str], None]) -> None:
        """Start the worker thread; `deliver` gets each step's outputs and `fail`
        the reason if the thread itself dies (both called on that thread). The
        engine process (`worker`) hosts the core through this."""
        if self._thread is not None:
            return
        self._emit = deliver
        self._closing = False
        self._thread = threading.Thread(target=self._serve, args=(fail,), name="entity-llm-padded", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        """Drop every request and stop the worker thread (blocking)."""
        self.scoring.close()
        with self._condition:
            self._closing = True
            self._cancelled.update(self._running)
            self._waiting.clear()
            self._condition.notify_all()
        if self._thread is not None:
            thread, self._thread = self._thread, None
            thread.join(60)

    def add(self, rid: str, prepared: Prepared) -> None:
        if self._thread is None or self._closing or (emit := self._emit) is None:
            raise EngineError("engine is not started")
        scored = lambda output: emit([output])  # noqa: E731
        if not self.scoring.gate(rid, prepared, scored, lambda: self._queue(rid, prepared), lambda: self.cancel(rid)):
            self._queue(rid, prepared)

    def _queue(self, rid: str, prepared: Prepared) -> None:
        with self._condition:
            self._waiting.append((rid, prepared))
            self._condition.notify_all()

    def cancel(self, rid: str) -> None:
        self.scoring.cancel(rid)
        with self._condition:
            before = len(self._waiting)
            self._waiting = collections.deque(item for item in self._waiting if item[0] != rid)
            if len(self._waiting) == before and rid in self._running:
                self._cancelled.add(rid)

    def state(self) -> CoreState:
        """Requests waiting or in the running batch (not yet finished or dropped), and forward passes."""
        with self._condition:
            return CoreState(len(self._waiting) + len(self._running), self._steps)

    # -- the worker thread ------------------------------------------------------

    def _serve(self, fail: Callable[[str], None]) -> None:
        try:
            self._serve_batches()
        except BaseException as exc:  # a bug here would leave every stream waiting: fail them instead
            log.exception("the padded batching thread failed")
            fail(f"the padded batching thread stopped: {type(exc).__name__}: {exc}")

    def _serve_batches(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._waiting or self._closing)
                # Requests sent together arrive a little apart: give the rest
                # of them GATHER_WINDOW to join this batch rather than the next.
                deadline = time.monotonic() + GATHER_WINDOW
                while not self._closing and len(self._waiting) < self.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._condition.wait(left):
                        break
                if self._closing:
                    return
                batch = [self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))]
                self._running = {rid for rid, _ in batch}
            emit = self._emit
            assert emit is not None
            try:
                self._decode(batch, emit)
            except Exception as exc:  # this batch's requests fail; the next batch is served
                log.exception("a padded batch failed")
                failed = [SeqOutput(rid, (), None, True, f"generation failed: {exc}") for rid in self._still_running()]
                emit(failed)
            finally:
                with self._condition:
                    self._running = set()
                    self._cancelled.clear()

    def _still_running(self) -> list[str]:
        with self._condition:
            return [rid for rid in self._running if rid not in self._cancelled]

    def _drop(self, rid: str) -> None:
        with self._condition:
            self._running.discard(rid)
            self._cancelled.discard(rid)

    def _decode(self, batch: list[tuple[str, Prepared]], emit: Emit) -> None:
        import torch  # deferred: nothing imports torch before a model is served

        device = self.model.device
        width = max(len(prepared.ids) for _, prepared in batch)
        rows = [[self.pad_token_id] * (width - len(p.ids)) + list(p.ids) for _, p in batch]
        masks = [[0] * (width - len(p.ids)) + [1] * len(p.ids) for _, p in batch]
        input_ids = torch.tensor(rows, device=device)
        mask = torch.tensor(masks, device=device)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": True}
        inputs.update(self._last_logits)
        positions = None
        if self._positions:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            inputs["position_ids"] = positions
        samplings = [prepared.sampling for _, prepared in batch]
        followers = [None if x.constraint is None else self.grammars.follower(x.constraint) for x in samplings]
        sequences = [list(prepared.ids) for _, prepared in batch]
        stops = [x.stop_ids(self.eos_ids) for x in samplings]
        counts = [0] * len(batch)
        done = [False] * len(batch)
        order = list(range(len(batch)))  # the request (its index in `batch`) of each row of the tensors
        eos_mask: Any = None
        with torch.inference_mode():
            while True:
                out = self.model(**inputs)
                self._steps += 1
                logits = out.logits[:, -1]
                if eos_mask is None:
                    eos_mask = r.eos_mask(self.eos_ids, logits.shape[-1], device)
                with self._condition:
                    left = self._cancelled & self._running
                for i in order:
                    if not done[i] and batch[i][0] in left:  # its client left: dropped, nothing more sent
                        done[i] = True
                        self._drop(batch[i][0])
                live = [row for row, i in enumerate(order) if not done[i]]
                if not live:
                    return
                allowed = step_mask(
                    [followers[order[row]] for row in live],
                    [sequences[order[row]][len(batch[order[row]][1].ids) :] for row in live],
                    logits.shape[-1],
                    device,
                    self.masks,
                )
                tokens, entries = r.pick(
                    logits[live],
                    [samplings[order[row]] for row in live],
                    [counts[order[row]] for row in live],
                    [sequences[order[row]] for row in live],
                    eos_mask,
                    allowed,
                )
                following = [self.pad_token_id] * len(order)
                outputs = []
                for row, token, entry in zip(live, tokens, entries, strict=True):
                    i = order[row]
                    rid, prepared = batch[i]
                    sequences[i].append(token)
                    counts[i] += 1
                    following[row] = token
                    last = token in stops[i] or counts[i] >= prepared.max_new_tokens
                    outputs.append(SeqOutput(rid, (token,), None if entry is None else (entry,), last))
                    if last:
                        done[i] = True
                        self._drop(rid)
                emit(outputs)
                if all(done):
                    return
                cache = getattr(out, self._cache_name)
                mask = torch.cat([mask, torch.ones((len(order), 1), dtype=mask.dtype, device=device)], dim=-1)
                next_ids = torch.tensor(following, device=device)[:, None]
                if positions is not None:
                    positions = positions[:, -1:] + 1
                # Rows whose request ended still cost a row of every step: once they are a
                # quarter of the batch, the batch (its cache included) keeps only the others.
                kept = [row for row, i in enumerate(order) if not done[i]]
                if (len(order) - len(kept)) * 4 >= len(order) and hasattr(cache, "batch_select_indices"):
                    index = torch.tensor(kept, device=device)
                    cache.batch_select_indices(index)
                    mask, next_ids = mask[index], next_ids[index]
                    if positions is not None:
                        positions = positions[index]
                    order = [order[row] for row in kept]
                inputs = {"input_ids": next_ids, "attention_mask": mask, "use_cache": True, self._cache_name: cache}
                if positions is not None:
                    inputs["position_ids"] = positions


def fallback_message(exc: BaseException) -> str:
    """The one log line a server writes when it serves a model in padded batches
    because continuous batching cannot run it (`exc`: the probe's error)."""
    return f"{exc}; serving it in padded batches on the model's own cache (--engine padded)"


class PaddedEngine(FrontEnd):
    """Padded batches of requests on the model's own cache, in this process.

    For models transformers' continuous batching cannot run; `--engine auto`
    chooses it for them.

    Args:
        model: a transformers causal LM, already on its device and in eval mode.
        tokenizer: its fast tokenizer.
        settings: `max_batch_size` rows in one batch, `max_queue` more waiting.
        default_max_new_tokens: the length used when a request leaves it unset.
    """

    kind = "padded"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        settings: BatchingSettings | None = None,
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        self.settings = settings or BatchingSettings()
        facts = ModelFacts.of(model, len(tokenizer), tokenizer.eos_token_id)
        grammars = Grammars.of(tokenizer, facts)
        self.padded = PaddedCore(
            model,
            facts,
            max_batch_size=self.settings.max_batch_size,
            pad_token_id=tokenizer.pad_token_id,
            grammars=grammars,
        )
        super().__init__(
            self.padded,
            facts,
            tokenizer,
            grammars=grammars,
            capacity=self.settings.capacity,
            capacity_note=self.settings.capacity_note,
            default_max_new_tokens=default_max_new_tokens,
        )

    @property
    def model(self) -> Any:
        """The transformers model the core runs."""
        return self.padded.model
