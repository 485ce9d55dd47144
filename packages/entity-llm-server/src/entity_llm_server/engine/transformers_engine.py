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
from typing import Any

from .base import EngineError, EngineEvent, EngineRequest, Finished, FinishReason, InvalidRequestError, TextDelta

_DONE = object()


class TransformersEngine:
    """Greedy generation from a loaded model and fast tokenizer.

    Args:
        model: a transformers causal LM, already on its device and in eval mode.
        tokenizer: its fast tokenizer (the incremental detokenizer needs the
            Rust backend).
        default_max_new_tokens: the length used when a request leaves it unset.
    """

    def __init__(self, model: Any, tokenizer: Any, *, default_max_new_tokens: int = 128) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.default_max_new_tokens = default_max_new_tokens
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        # transformers 5.x renamed the KV-cache argument (and output) from
        # past_key_values to cache; models written for either keep working.
        forward = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in forward else "past_key_values"
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight = 0  # requests submitted whose decode loop has not returned
        self._count_lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Requests the engine still holds (queued or decoding)."""
        return self._in_flight

    @property
    def healthy(self) -> bool:
        return self._executor is not None

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entity-llm-decode")

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _encode(self, request: EngineRequest) -> tuple[list[int], int]:
        ids: list[int] = self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            start = self.tokenizer.bos_token_id
            ids = [start if start is not None else next(iter(self.eos_ids))]
        if len(ids) >= self.context_length:
            raise InvalidRequestError(
                "prompt", f"{len(ids)} tokens leave no room in the model's {self.context_length}-token context"
            )
        wanted = request.max_new_tokens or self.default_max_new_tokens
        return ids, min(wanted, self.context_length - len(ids))

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        if self._executor is None:
            raise EngineError("engine is not started")
        ids, max_new = self._encode(request)
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
                    self._decode(ids, max_new, emit, cancelled)
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
                yield item  # type: ignore[misc]  # the worker emits only events
        finally:
            cancelled.set()

    def _decode(self, ids: list[int], max_new: int, emit: Callable[[object], None], cancelled: threading.Event) -> None:
        import torch  # deferred: nothing imports torch before a model is served
        from tokenizers.decoders import DecodeStream

        backend = self.tokenizer.backend_tokenizer
        stream = DecodeStream(ids=list(ids), skip_special_tokens=True)
        device = self.model.device
        pending: list[int] = []
        generated: list[int] = []
        reason = FinishReason.MAX_TOKENS
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True)
            while len(generated) < max_new and not cancelled.is_set():
                token = int(out.logits[0, -1].argmax())
                generated.append(token)
                if token in self.eos_ids:
                    reason = FinishReason.EOS
                    break
                pending.append(token)
                text = stream.step(backend, token)
                if text:
                    emit(TextDelta(text, tuple(pending)))
                    pending = []
                if len(generated) < max_new:
                    cache = {self._cache_name: getattr(out, self._cache_name)}
                    out = self.model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **cache)
        if not cancelled.is_set():
            emit(Finished(reason, len(ids), len(generated), tuple(generated)))
