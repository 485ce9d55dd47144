"""A transformers causal LM behind the Engine protocol, one request at a time.

Requests are decoded one at a time on a single worker thread with the model's
KV cache; the event loop never runs torch. The worker checks a per-request
cancel flag before every decode step, so a client that leaves stops its
generation within one step. `BatchingEngine` is the default; this one serves
models that transformers' continuous batching cannot run (`--engine sequential`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from . import sampling as s
from .base import CoreState, EngineError, EngineRequest
from .sampling import TokenLogprob
from .tokens import Prepared, Step, TokenStreamEngine

_DONE = object()


class TransformersEngine(TokenStreamEngine):
    """Generation one request at a time, on a worker thread.

    Tokens are chosen by `sampling.warp`/`choose`, the same code the batching
    engine runs per row, so a seed gives the same text on either engine.

    Args:
        model: a transformers causal LM, already on its device and in eval mode.
        tokenizer: its fast tokenizer.
        default_max_new_tokens: the length used when a request leaves it unset.
    """

    def __init__(self, model: Any, tokenizer: Any, *, default_max_new_tokens: int = 128) -> None:
        super().__init__(model, tokenizer, default_max_new_tokens=default_max_new_tokens)
        # transformers 5.x renamed the KV-cache argument (and output) from
        # past_key_values to cache; models written for either keep working.
        forward = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in forward else "past_key_values"
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight = 0  # requests submitted whose decode loop has not returned
        self._steps = 0  # forward passes run, written by the worker thread alone
        self._count_lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Requests the engine still holds (queued or decoding)."""
        return self._in_flight

    @property
    def healthy(self) -> bool:
        return self._executor is not None

    def core_state(self) -> CoreState:
        """Requests submitted to the worker whose decode loop has not returned, and its forward passes."""
        return CoreState(self._in_flight, self._steps)

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entity-llm-decode")

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _admit(self) -> None:
        if self._executor is None:
            raise EngineError("engine is not started")

    async def _token_ids(self, prepared: Prepared, request: EngineRequest) -> AsyncGenerator[Step, None]:
        if self._executor is None:  # closed while the request was being prepared
            raise EngineError("engine is not started")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: object) -> None:
            # A closed loop means the server is gone and the result has no reader.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                if not cancelled.is_set():
                    self._decode(prepared, emit, cancelled)
            except BaseException as exc:  # handed to the awaiting coroutine
                emit(exc)
            finally:
                with self._count_lock:
                    self._in_flight -= 1
                emit(_DONE)

        with self._count_lock:
            self._in_flight += 1
        self._executor.submit(work)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed: {item}") from item
                token, logprob = cast("tuple[int, TokenLogprob | None]", item)  # what the worker emits
                yield [token], None if logprob is None else [logprob]
        finally:
            cancelled.set()

    def _decode(self, prepared: Prepared, emit: Callable[[object], None], cancelled: threading.Event) -> None:
        import torch  # deferred: nothing imports torch before a model is served

        device = self.model.device
        sampling = prepared.sampling
        sequence = list(prepared.ids)
        count = 0
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([prepared.ids], device=device), use_cache=True)
            self._steps += 1
            logits = out.logits[:, -1]
            vocab = logits.shape[-1]
            eos_mask = s.eos_mask(self.eos_ids, vocab, device)
            while count < prepared.max_new_tokens and not cancelled.is_set():
                entry = None
                if sampling.plain:
                    token = int(logits[0].argmax())
                else:
                    seen = [sequence if sampling.penalised else None]
                    rows = s.rows_for([s.row_values(sampling, count, vocab)], seen, vocab, device)
                    logprobs = s.warp(logits, rows, eos_mask, sort=sampling.top_k > 0 or sampling.top_p < 1)
                    chosen = s.choose(logprobs, rows) if sampling.sampled else logprobs.argmax(dim=-1)
                    token = int(chosen[0])
                    if sampling.wants_logprobs:
                        entry = s.logprob_entries(logprobs, chosen, [sampling.top_logprobs])[0]
                emit((token, entry))
                sequence.append(token)
                count += 1
                if token in self.eos_ids or count == prepared.max_new_tokens:
                    break
                cache = {self._cache_name: getattr(out, self._cache_name)}
                out = self.model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **cache)
                self._steps += 1
                logits = out.logits[:, -1]

    def load(self) -> tuple[int, int]:
        """(decoding, waiting): one request decodes at a time, the others wait."""
        held = self._in_flight
        return (min(held, 1), max(0, held - 1))
