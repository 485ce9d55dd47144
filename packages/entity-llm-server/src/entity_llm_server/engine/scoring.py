"""Prompt logprobs: each prompt token's log-probability and rank under the model.

A request that asks (`Sampling.prompt_logprobs`) is scored before its
generation starts, on a thread of the core's own (one request at a time, so
scoring never takes more than one forward pass's worth of memory and threads
from the decoding), by the model's ordinary forward pass with its KV cache:
the prompt goes through in chunks of `CHUNK` positions, and only a chunk's
logits are ever projected onto the vocabulary at once. The numbers are those
of one plain forward pass over the whole prompt (chunked attention over a
cache gives the same logits, within float rounding).

Every core runs it the same way (`Scoring.gate`): scored first, reported as
a `SeqOutput` with `prompt` and no ids, then handed to the core's own
generation, or finished there when the request generates nothing
(max_new_tokens 0). Tensor-parallel groups do not score: a forward pass there
needs every rank, and their batching loop owns them.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .core import SeqOutput
from .sampling import TokenLogprob

if TYPE_CHECKING:
    from .inputs import Prepared

# Prompt positions whose logits are computed at once.
CHUNK = 256


def score(
    model: Any, ids: list[int], top_n: int, chunk: int = CHUNK, on_chunk: Callable[[], None] | None = None
) -> tuple[TokenLogprob, ...]:
    """Each of `ids[1:]`'s logprob and rank given the ids before it, with the `top_n` likeliest
    alternatives at its position (blocking: a forward pass over the prompt, in chunks; `on_chunk` is
    called after each)."""
    import torch

    forward = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in forward else "past_key_values"
    entries: list[TokenLogprob] = []
    cache: Any = None
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, chunk):
            piece = ids[start : start + chunk]
            inputs: dict[str, Any] = {"input_ids": torch.tensor([piece], device=model.device), "use_cache": True}
            if cache is not None:
                inputs[cache_name] = cache
            out = model(**inputs)
            if on_chunk is not None:
                on_chunk()
            cache = getattr(out, cache_name)
            targets = ids[start + 1 : start + 1 + len(piece)]
            logprobs = out.logits[0, : len(targets)].float().log_softmax(dim=-1)
            wanted = torch.tensor(targets, device=logprobs.device)
            picked = logprobs.gather(1, wanted[:, None])[:, 0]
            ranks = (logprobs > picked[:, None]).sum(dim=-1) + 1
            top: list[tuple[tuple[int, float], ...]] = [()] * len(targets)
            if top_n:
                values, alternatives = torch.topk(logprobs, top_n, dim=-1)
                pairs = zip(alternatives.tolist(), values.tolist(), strict=True)
                top = [tuple(zip(i, v, strict=True)) for i, v in pairs]
            for token, logprob, rank, best in zip(targets, picked.tolist(), ranks.tolist(), top, strict=True):
                entries.append(TokenLogprob(token, logprob, best, rank=rank))
    return tuple(entries)


def one_forward_at_a_time(model: Any) -> None:
    """Make the model's forward passes take turns, whichever thread calls them.

    The scoring thread's forward pass must not overlap the core's own: on the CPU, a plain forward
    pass that runs while continuous batching's SDPA step runs on another thread computes wrong
    attention (seen with transformers 5.24 and torch 2.13: a prompt's logprobs off by several nats,
    `tests/model/test_scoring.py`). A lock taken in a forward pre-hook and released in a hook that
    runs even when the pass raises; only by the thread that took it. Installed once per model."""
    if getattr(model, "_entity_llm_forward_lock", None) is not None:
        return
    lock = threading.Lock()
    held = threading.local()

    def take(*_: Any) -> None:
        lock.acquire()
        held.yes = True

    def give(*_: Any) -> None:
        if getattr(held, "yes", False):
            held.yes = False
            lock.release()

    model._entity_llm_forward_lock = lock
    model.register_forward_pre_hook(take)
    model.register_forward_hook(give, always_call=True)


class Scoring:
    """A core's prompt scoring: one thread, requests scored one at a time before they generate.

    Args:
        model: the core's model; its forward passes take turns from now on (`one_forward_at_a_time`).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        one_forward_at_a_time(model)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._scoring: set[str] = set()
        # Forward passes run, written by the scoring thread alone: a core's liveness counts them
        # with its own steps (a request being scored is held, and the core's loop may not step).
        self.chunks = 0

    def gate(
        self,
        rid: str,
        prepared: Prepared,
        deliver: Callable[[SeqOutput], None],
        proceed: Callable[[], None],
        cancel: Callable[[], None],
    ) -> bool:
        """Take a request that asks for prompt logprobs: score it on the scoring thread, `deliver` the
        result, then `proceed` to its generation (or deliver its end, when it generates nothing); a
        request that left while `proceed` handed it to the core is then `cancel`led there. False, and
        nothing done, for a request that does not ask."""
        top_n = prepared.sampling.prompt_logprobs
        if top_n is None:
            return False
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entity-llm-score")
            self._scoring.add(rid)
            self._executor.submit(self._run, rid, prepared, top_n, deliver, proceed, cancel)
        return True

    def _run(
        self,
        rid: str,
        prepared: Prepared,
        top_n: int,
        deliver: Callable[[SeqOutput], None],
        proceed: Callable[[], None],
        cancel: Callable[[], None],
    ) -> None:
        try:
            if self._left(rid):
                return
            entries = score(self.model, prepared.ids, top_n, on_chunk=self._chunk_done)
            last = prepared.max_new_tokens == 0
            if self._left(rid):
                return
            deliver(SeqOutput(rid, (), None, last, prompt=entries))
            if not last:
                proceed()
                if self._left(rid):  # it left while being handed over: the core may have it now
                    cancel()
        except Exception as exc:  # reported to the request's stream
            deliver(SeqOutput(rid, (), None, True, f"scoring the prompt failed: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._scoring.discard(rid)
                self._cancelled.discard(rid)

    def _chunk_done(self) -> None:
        self.chunks += 1

    def _left(self, rid: str) -> bool:
        with self._lock:
            return rid in self._cancelled

    def cancel(self, rid: str) -> None:
        """A request that left while it waited or was scored: it goes no further."""
        with self._lock:
            if rid in self._scoring:
                self._cancelled.add(rid)

    def close(self) -> None:
        """Stop the scoring thread (blocking); requests not scored yet are dropped."""
        with self._lock:
            executor, self._executor = self._executor, None
            self._cancelled |= self._scoring
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
