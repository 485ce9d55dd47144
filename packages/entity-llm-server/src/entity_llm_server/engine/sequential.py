"""A transformers causal LM one request at a time (`--engine sequential`).

`SequentialCore` decodes requests one after another on a single worker
thread with the model's own KV cache; the event loop never runs torch. The
worker checks a per-request cancel flag before every decode step, so a client
that leaves stops its generation within one step. Continuous batching is the
default; this one serves models that transformers' continuous batching
cannot run.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import rows as r
from .base import DEFAULT_MAX_NEW_TOKENS, CoreState, EngineError
from .constraints import Grammars, Masks, step_mask
from .core import CoreSink, ModelFacts, Pulse, SeqOutput
from .frontend import FrontEnd
from .inputs import Prepared
from .scoring import Scoring


class SequentialCore:
    """Decodes one request at a time, on a worker thread.

    Tokens are chosen by `sampling.warp`/`choose`, the same code the batching
    core runs per row, so a seed gives the same text on either core.

    Args:
        model: a transformers causal LM, already on its device and in eval mode.
        facts: the model's facts.
    """

    def __init__(self, model: Any, facts: ModelFacts, grammars: Grammars) -> None:
        self.model = model
        self.grammars = grammars  # compiles requests' constraints (structured output)
        self.eos_ids = frozenset(facts.eos_ids)
        # transformers 5.x renamed the KV-cache argument (and output) from
        # past_key_values to cache; models written for either keep working.
        forward = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in forward else "past_key_values"
        # Only the last position's logits are used: the prefill need not
        # project every prompt position onto the vocabulary.
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._executor: ThreadPoolExecutor | None = None
        self._emit: Callable[[SeqOutput], None] | None = None
        self._cancelled: dict[str, threading.Event] = {}
        self._held = 0  # requests submitted whose decode loop has not returned
        self._steps = 0  # forward passes run, written by the worker thread alone
        self.pulse = Pulse()
        self._count_lock = threading.Lock()
        self.scoring = Scoring(model)
        self.masks = Masks()

    @property
    def healthy(self) -> bool:
        return self._executor is not None and not self.stalled

    @property
    def stalled(self) -> bool:
        """A request is decoding and no forward pass has ended for the pulse's timeout."""
        return self._executor is not None and self.pulse.stuck(self._held > 0, self._steps)

    @property
    def active(self) -> int:
        return min(self._held, 1)

    def check_admission(self) -> None:
        if self.stalled:
            raise self.pulse.refusal()

    async def start(self, sink: CoreSink) -> None:
        loop = asyncio.get_running_loop()

        def emit(output: SeqOutput) -> None:
            # A closed loop means the server is gone and the result has no reader.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(sink.deliver, (output,))

        self._emit = emit
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entity-llm-decode")

    async def close(self) -> None:
        await asyncio.to_thread(self.scoring.close)
        for flag in list(self._cancelled.values()):
            flag.set()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        # Work cancelled before it ran never counted itself out.
        self._cancelled.clear()
        with self._count_lock:
            self._held = 0

    def add(self, rid: str, prepared: Prepared) -> None:
        executor, emit = self._executor, self._emit
        if executor is None or emit is None:
            raise EngineError("engine is not started")
        proceed = lambda: self._submit(executor, emit, rid, prepared)  # noqa: E731
        if not self.scoring.gate(rid, prepared, emit, proceed, lambda: self.cancel(rid)):
            self._submit(executor, emit, rid, prepared)

    def _submit(
        self, executor: ThreadPoolExecutor, emit: Callable[[SeqOutput], None], rid: str, prepared: Prepared
    ) -> None:
        cancelled = self._cancelled[rid] = threading.Event()

        def work() -> None:
            try:
                if not cancelled.is_set():
                    self._decode(rid, prepared, emit, cancelled)
            except BaseException as exc:  # reported to the request's stream
                emit(SeqOutput(rid, (), None, True, f"generation failed: {exc}"))
            finally:
                self._cancelled.pop(rid, None)
                with self._count_lock:
                    self._held -= 1

        with self._count_lock:
            self._held += 1
        executor.submit(work)

    def cancel(self, rid: str) -> None:
        self.scoring.cancel(rid)
        if (flag := self._cancelled.get(rid)) is not None:
            flag.set()

    def state(self) -> CoreState:
        """Requests submitted to the worker whose decode loop has not returned, and its forward passes."""
        return CoreState(self._held, self._steps)

    def _decode(
        self, rid: str, prepared: Prepared, emit: Callable[[SeqOutput], None], cancelled: threading.Event
    ) -> None:
        import torch  # deferred: nothing imports torch before a model is served

        device = self.model.device
        sampling = prepared.sampling
        sequence = list(prepared.ids)
        stops = sampling.stop_ids(self.eos_ids)
        count = 0
        follower = None if sampling.constraint is None else self.grammars.follower(sampling.constraint)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([prepared.ids], device=device), use_cache=True, **self._last_logits)
            self._steps += 1
            logits = out.logits[:, -1]
            vocab = logits.shape[-1]
            eos_mask = r.eos_mask(self.eos_ids, vocab, device)
            while count < prepared.max_new_tokens and not cancelled.is_set():
                allowed = step_mask([follower], [sequence[len(prepared.ids) :]], vocab, device, self.masks)
                (token,), (entry,) = r.pick(logits, [sampling], [count], [sequence], eos_mask, allowed)
                sequence.append(token)
                count += 1
                last = token in stops or count == prepared.max_new_tokens
                emit(SeqOutput(rid, (token,), None if entry is None else (entry,), last))
                if last:
                    break
                cache = {self._cache_name: getattr(out, self._cache_name)}
                out = self.model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **cache)
                self._steps += 1
                logits = out.logits[:, -1]


class TransformersEngine(FrontEnd):
    """Generation one request at a time, on a worker thread.

    Args:
        model: a transformers causal LM, already on its device and in eval mode.
        tokenizer: its fast tokenizer.
        default_max_new_tokens: the length used when a request leaves it unset.
    """

    kind = "sequential"

    def __init__(self, model: Any, tokenizer: Any, *, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        facts = ModelFacts.of(model, len(tokenizer), tokenizer.eos_token_id)
        grammars = Grammars.of(tokenizer, facts)
        self.sequential = SequentialCore(model, facts, grammars)
        super().__init__(
            self.sequential, facts, tokenizer, grammars=grammars, default_max_new_tokens=default_max_new_tokens
        )

    @property
    def model(self) -> Any:
        """The transformers model the core runs."""
        return self.sequential.model
