"""A stand-in causal LM whose greedy choice follows a script of token ids.

It lets a test make the real engine emit any token sequence (multi-byte text
split across byte-level tokens, an EOS at a chosen step) with a real tokenizer.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch


class ScriptedLM(torch.nn.Module):
    def __init__(
        self, script: list[int], vocab_size: int, eos_id: int, context: int = 512, step_seconds: float = 0.0
    ) -> None:
        super().__init__()
        self.script = script
        self.step_seconds = step_seconds
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.generation_config = SimpleNamespace(eos_token_id=eos_id)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids: torch.Tensor, cache: int | None = None, use_cache: bool = True):
        step = 0 if cache is None else cache
        time.sleep(self.step_seconds)  # a slow decode step, for cancellation tests
        logits = torch.zeros(1, input_ids.shape[1], self.vocab_size)
        logits[0, -1, self.script[min(step, len(self.script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, cache=step + 1)
