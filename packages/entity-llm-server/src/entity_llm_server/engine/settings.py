"""How a batching core is sized."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchingSettings:
    """How the continuous-batching engine is sized.

    Attributes:
        max_batch_size: sequences decoded together in one step.
        max_queue: admitted requests that may wait beyond those.
        kv_block_size: tokens per KV-cache block.
        kv_cache_tokens: KV-cache capacity in tokens across all sequences;
            0 sizes it for `max_batch_size` sequences of the model's context
            (capped at 1024 tokens each, which keeps a CPU server small).
        max_batch_tokens: tokens processed per forward pass (prefill chunks
            plus decodes); 0 picks 256 on CPU and 2048 elsewhere.
        cuda_graphs: capture CUDA graphs (None: on CUDA devices only).
        prefix_caching: requests whose prompts begin alike share the KV
            blocks of that beginning, which is prefilled once (`prefix`).
        attention: `sdpa` (transformers' own, a mask over the step's
            batch) or `varlen` (`attention`: sequence boundaries, no mask).
    """

    max_batch_size: int = 32
    max_queue: int = 64
    kv_block_size: int = 16
    kv_cache_tokens: int = 0
    max_batch_tokens: int = 0
    cuda_graphs: bool | None = None
    prefix_caching: bool = True
    attention: str = "sdpa"

    @property
    def capacity(self) -> int:
        """Requests held at most: decoding plus queued."""
        return self.max_batch_size + self.max_queue

    @property
    def capacity_note(self) -> str:
        """How the capacity is made up, for a refusal's message."""
        return f" (max batch size {self.max_batch_size} + max queue {self.max_queue})"

    def cache_tokens(self, context_length: int) -> int:
        """The KV cache's capacity in tokens for a model of `context_length`."""
        return self.kv_cache_tokens or self.max_batch_size * min(context_length, 1024)

    def graphs_on(self, device_type: str) -> bool:
        """Whether the manager captures CUDA graphs on a device of this type."""
        return device_type == "cuda" if self.cuda_graphs is None else self.cuda_graphs
