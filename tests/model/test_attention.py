"""`--attention varlen`: continuous batching's attention over each sequence's own keys, no batch mask.

The function (engine/attention.py) runs torch's FlashAttention kernel on CUDA; here, on CPU, its
plain-PyTorch reference runs, and these tests hold it to transformers' SDPA path: the same greedy
and seeded tokens, the same scores, on the demo model and on a model with grouped KV heads.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers.generation.continuous_batching.utils import attn_mask_is_needed
from transformers.utils.generic import is_flash_attention_requested

from entity_llm_server import EngineRequest, UnifiedLLMResource
from entity_llm_server.config import parse_config
from entity_llm_server.engine import BatchingEngine, BatchingSettings, Finished, Sampling, Scored
from entity_llm_server.engine import attention as a

pytestmark = pytest.mark.model

PROMPTS = [
    "def fibonacci(n):",
    "import os\n",
    "class Stack:\n    def push(self, item):",
    "x = [i * i for i in range(10)]\n" * 6,  # longer than a step's tokens: prefilled in chunks
]


def masked_reference(query, key, value, cu_q, cu_k, scale):
    """Attention written out: softmax of each sequence's scores under a bottom-right causal mask."""
    out = torch.zeros_like(query)
    groups = query.shape[1] // key.shape[1]
    for i in range(len(cu_q) - 1):
        q = query[cu_q[i] : cu_q[i + 1]]  # [lq, heads, dim]
        k = key[cu_k[i] : cu_k[i + 1]].repeat_interleave(groups, dim=1)
        v = value[cu_k[i] : cu_k[i + 1]].repeat_interleave(groups, dim=1)
        lq, lk = q.shape[0], k.shape[0]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[cu_q[i] : cu_q[i + 1]] = torch.einsum("hqk,khd->qhd", weights, v)
    return out


def test_the_reference_is_causal_from_the_end_with_grouped_heads_and_zero_padding():
    torch.manual_seed(0)
    heads, kv_heads, dim = 8, 2, 16
    # Five sequences: a decode (1 query over 9 keys), a prefill chunk over cached keys (4 over
    # 10), a fresh prompt (5 over 5), two more decodes (1 over 3, 1 over 1); then 3 padding rows
    # past the last sequence. Decodes and the others run as two batches, each padded to its longest.
    cu_q, cu_k = [0, 1, 5, 10, 11, 12], [0, 9, 19, 24, 27, 28]
    query = torch.randn(1, heads, 15, dim)
    key, value = torch.randn(1, kv_heads, 28, dim), torch.randn(1, kv_heads, 28, dim)
    out, _ = a.varlen_attention(
        None,
        query,
        key,
        value,
        None,
        scaling=dim**-0.5,
        cu_seq_lens_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_seq_lens_k=torch.tensor(cu_k, dtype=torch.int32),
        max_length_q=5,
        max_length_k=10,
    )
    assert out.shape == (1, 15, heads, dim)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    expected = masked_reference(q, k, v, cu_q, cu_k, dim**-0.5)
    torch.testing.assert_close(out[0, :12], expected[:12])
    assert torch.count_nonzero(out[0, 12:]) == 0
    # The decode's one query sees all 9 keys: the mean of the values when every score is equal.
    flat_q = torch.zeros_like(query)
    out, _ = a.varlen_attention(
        None, flat_q, key, value, None, scaling=1.0,
        cu_seq_lens_q=torch.tensor(cu_q), cu_seq_lens_k=torch.tensor(cu_k), max_length_q=5, max_length_k=10,
    )  # fmt: skip
    torch.testing.assert_close(out[0, 0], value[0, :, :9].mean(1).repeat_interleave(4, dim=0))


def engine(attention: str, model=None, **sizes) -> BatchingEngine:
    settings = BatchingSettings(max_batch_size=4, max_queue=8, max_batch_tokens=32, attention=attention, **sizes)
    built = UnifiedLLMResource(model, batching=settings).load_engine()
    assert isinstance(built, BatchingEngine)
    return built


def requests() -> list[EngineRequest]:
    greedy = [EngineRequest(p, max_new_tokens=16) for p in PROMPTS]
    seeded = [
        EngineRequest(p, max_new_tokens=16, sampling=Sampling(temperature=0.8, seed=i)) for i, p in enumerate(PROMPTS)
    ]
    scored = [EngineRequest(PROMPTS[2], max_new_tokens=4, sampling=Sampling(prompt_logprobs=2))]
    return greedy + seeded + scored


def serve_all(built: BatchingEngine, batch: list[EngineRequest] | None = None) -> list[tuple[list[int], list[float]]]:
    """Every request at once (more than a batch): each one's tokens, and its prompt's logprobs."""

    async def one(request: EngineRequest) -> tuple[list[int], list[float]]:
        events = [event async for event in built.generate(request)]
        assert isinstance(events[-1], Finished)
        scores = [e.logprob for event in events if isinstance(event, Scored) for e in event.prompt_logprobs]
        return events[-1].token_ids, scores

    async def main():
        await built.start()
        try:
            return await asyncio.gather(*(one(r) for r in batch or requests()))
        finally:
            await built.close()

    return asyncio.run(main())


@pytest.mark.parametrize("model", ["demo", "llama-gqa"])
def test_varlen_attention_gives_what_sdpa_gives(model, tiny_model):
    folder = None if model == "demo" else str(tiny_model("llama"))
    varlen = engine("varlen", folder)
    results = serve_all(varlen)
    assert varlen.core.model.config._attn_implementation == a.NAME
    sdpa = engine("sdpa", folder)
    expected = serve_all(sdpa)
    assert sdpa.core.model.config._attn_implementation == "sdpa"
    assert [tokens for tokens, _ in results] == [tokens for tokens, _ in expected]
    for (_, scores), (_, reference) in zip(results, expected, strict=True):
        assert scores == pytest.approx(reference, abs=1e-4)
    assert results[-1][1], "the scored request reported its prompt's logprobs"


def test_continuous_batching_runs_the_varlen_function_and_builds_no_mask(monkeypatch):
    # The private hook this rests on: transformers 5.24 decides from the implementation's name
    # whether a step needs a mask over the batch. If that moves, this fails rather than silently
    # building the mask (and never calling the function).
    calls = []
    original = a.varlen_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("cu_seq_lens_q") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(a, "varlen_attention", counted)
    built = engine("varlen")
    config = built.core.model.config
    serve_all(built, [EngineRequest(p, max_new_tokens=8) for p in PROMPTS])  # generation only: no scoring pass
    assert is_flash_attention_requested(config)
    assert not attn_mask_is_needed(config)
    assert calls, "continuous batching called the varlen function"
    assert all(calls), "every attention call of a step came with the sequences' boundaries"


def test_the_flag_reaches_the_batching_settings():
    assert parse_config([]).batching().attention == "sdpa"
    assert parse_config(["--attention", "varlen"]).batching().attention == "varlen"
    assert parse_config([], env={"ENTITY_LLM_ATTENTION": "varlen"}).batching().attention == "varlen"
