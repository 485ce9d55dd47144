"""The seam between the front end and a core: what a core is, and what it reports.

A core runs the model: it takes prepared requests (token ids, a length, a
sampling), and reports each decode step's new tokens per request. The front
end (`frontend.FrontEnd`) does everything around it: tokenizing, admission,
detokenizing, stop sequences, time limits. Cores: `batching.BatchingCore`
(transformers' continuous batching on a thread of this process),
`process.ProcessCore` (the same in an engine process of its own) and
`sequential.SequentialCore` (one request at a time).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .base import CoreState, EngineUnavailableError

if TYPE_CHECKING:
    from .inputs import Prepared
    from .sampling import TokenLogprob


def settle() -> None:
    """Once a process holds what it serves with (the model, the tokenizer, the server): collect, then
    freeze what is left (CPython's `gc.freeze`), so that the collections serving sets off walk only
    the objects serving makes. Called when a core has warmed up, in the process that runs it, and
    by the server once its engine is ready."""
    import gc

    gc.collect()
    gc.freeze()


# A core that holds requests and has run no step for LIVENESS_TIMEOUT seconds
# is stuck (a kernel that never returns, a deadlock): unhealthy and refusing
# new requests until it steps again. The front end gives the engine process's
# pings the same time to be answered.
LIVENESS_TIMEOUT = 10.0


class Pulse:
    """Tells a core that is stuck from one that is idle or busy: whether the
    steps it counts still move while it holds requests.

    It judges from the moments it is asked (the health watcher asks every
    second), so it can be late to call a core stuck, never early.
    """

    def __init__(self, timeout: float = LIVENESS_TIMEOUT) -> None:
        self.timeout = timeout
        self._steps = -1  # the step count when last seen moving; -1: not holding requests then
        self._since = 0.0

    def stuck(self, holding: bool, steps: int) -> bool:
        """Whether a core holding requests (`holding`) has counted no step beyond `steps` for `timeout` seconds."""
        now = time.monotonic()
        if not holding or steps != self._steps:
            self._steps, self._since = (steps if holding else -1), now
            return False
        return now - self._since >= self.timeout

    def refusal(self) -> EngineUnavailableError:
        """What a request that comes to a stuck core gets."""
        return EngineUnavailableError(
            f"the engine has run no step for {self.timeout:g} s while holding requests (stuck); try again later"
        )


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the front end needs to know of the model a core runs.

    Attributes:
        model_id: the model's name or path, as loaded.
        context_length: the most tokens (prompt + generated) the model takes.
        vocab_size: the size of the model's output layer.
        eos_ids: the ids that end a generation.
        device_type: "cpu", "cuda", ... (the device the core runs on).
    """

    model_id: str
    context_length: int
    vocab_size: int
    eos_ids: tuple[int, ...]
    device_type: str

    @classmethod
    def of(cls, model: Any, tokenizer_size: int, tokenizer_eos: int | None) -> ModelFacts:
        """The facts of a loaded transformers model (and its tokenizer's size and EOS, where the model has none)."""
        config = model.config
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer_eos
        return cls(
            model_id=str(getattr(model, "name_or_path", "") or ""),
            context_length=int(getattr(config, "max_position_embeddings", 0) or 2048),
            vocab_size=int(getattr(config, "vocab_size", 0) or tokenizer_size),
            eos_ids=tuple(sorted([eos] if isinstance(eos, int) else (eos or []))),
            device_type=str(model.device.type),
        )


@dataclass(frozen=True, slots=True)
class SeqOutput:
    """What one decode step brought one request.

    Attributes:
        rid: the request's id in the core.
        ids: the tokens generated since the last output of this request.
        logprobs: their logprobs (one per id), when the request asked for them.
        finished: the core has dropped the request (it ended, or failed).
        error: why the request failed, if it did (then `finished` is true).
        cached: prompt tokens the request took from the prefix cache rather
            than computing them (reported with its first output).
        prompt: the prompt's logprobs (`scoring`), in an output of their own
            before any token, when the request asked for them.
    """

    rid: str
    ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finished: bool = False
    error: str | None = None
    cached: int = 0
    prompt: tuple[TokenLogprob, ...] | None = None


class CoreSink(Protocol):
    """Where a core reports to (the front end); called on the front end's event loop."""

    def deliver(self, outputs: Sequence[SeqOutput]) -> None:
        """One or more requests' news, in order."""
        ...

    def core_failed(self, reason: str) -> None:
        """The core can serve no request any more; every waiting request fails."""
        ...


class Core(Protocol):
    """A model runner behind the front end: requests in, per-step token ids out."""

    @property
    def healthy(self) -> bool:
        """Whether the core is started and can serve now (not stalled)."""
        ...

    @property
    def stalled(self) -> bool:
        """Not failed, but not running (stuck, or its process not answering): unhealthy, yet it may recover."""
        ...

    @property
    def active(self) -> int:
        """Requests decoding now (not waiting), as of the latest step: for metrics."""
        ...

    async def start(self, sink: CoreSink) -> None:
        """Start serving; outputs and failures go to `sink` from then on."""
        ...

    async def close(self) -> None:
        """Stop serving and release the model; idempotent."""
        ...

    def check_admission(self) -> None:
        """Refuse a request now (raise EngineUnavailableError) when the core cannot take one."""
        ...

    def add(self, rid: str, prepared: Prepared) -> None:
        """Start generating for `prepared`; its outputs arrive under `rid`. Raise EngineError if refused."""
        ...

    def cancel(self, rid: str) -> None:
        """Drop request `rid` at the next step (its client left); no more outputs come for it."""
        ...

    def state(self) -> CoreState:
        """The requests the core holds and the decode steps it has run (blocking, briefly)."""
        ...
