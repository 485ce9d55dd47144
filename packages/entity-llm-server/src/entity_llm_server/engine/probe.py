"""The start-up probe: before a batching core serves, it proves that continuous batching runs the model.

Some architectures load and warm up under transformers' continuous batching,
then fail every request (a cache layout they do not support). The probe runs
a real batched generation first, two prompts of different lengths in one
batch, each made to generate PROBE_TOKENS (a prefill, then decode steps), and
refuses the model, naming its architecture and the error, if that fails.
"""

from __future__ import annotations

import time
from typing import Any

from .base import BatchingUnsupportedError
from .sampling import Sampling

PROBE_TOKENS = 3
PROBE_TIMEOUT = 120.0  # seconds; a first CUDA step may compile kernels


def prove(manager: Any, architecture: str, vocab_size: int) -> None:
    """Run the probe on a started `ContinuousBatchingManager` (blocking).

    Raises:
        BatchingUnsupportedError: continuous batching cannot run this model.
    """
    vocab = max(vocab_size, 2)
    prompts = {"entity-llm-probe-0": [1, 2, 3], "entity-llm-probe-1": [4, 5, 6, 7, 8, 9, 10]}
    pending = set(prompts)

    def refuse(reason: str) -> BatchingUnsupportedError:
        return BatchingUnsupportedError(f"continuous batching cannot run {architecture}: {reason}")

    for rid, ids in prompts.items():
        ids = [i % vocab for i in ids]
        manager.add_request(  # a no-op on the ranks of a tensor-parallel group other than 0
            ids,
            request_id=rid,
            max_new_tokens=PROBE_TOKENS,
            streaming=False,
            sampling=Sampling(min_new_tokens=PROBE_TOKENS),
            prompt_len=len(ids),
        )
    deadline = time.monotonic() + PROBE_TIMEOUT
    while pending:  # every rank gets the outputs of every request
        output = manager.get_result(timeout=0.1)
        if output is None:
            if not manager.is_running():
                error = manager.background_thread_status.fatal_error
                raise refuse(f"the batching thread stopped: {type(error).__name__}: {error}")
            if time.monotonic() > deadline:
                raise refuse(f"no result within {PROBE_TIMEOUT:g} s")
            continue
        if output.error is not None:
            raise refuse(str(output.error))
        if output.request_id in pending and output.is_finished():
            if len(output.generated_tokens) != PROBE_TOKENS:
                raise refuse(f"{len(output.generated_tokens)} tokens generated, not {PROBE_TOKENS}")
            pending.discard(output.request_id)
