"""Attention over a continuous batch as variable-length sequences, with no mask over the whole batch.

transformers' continuous batching runs every request of a step as one packed sequence. For SDPA
and eager attention it builds a mask over all of them each step ([tokens, cache + tokens]), and
with a mask it also leaves async batching off. An attention implementation whose name says "flash"
is handed the sequences' boundaries instead (`cu_seq_lens_q`, `cu_seq_lens_k`), and no mask is
built. No flash-attn wheel installs here, but torch ships FlashAttention-2's variable-length kernel
(`aten._flash_attention_forward`); `varlen_attention` calls it on CUDA in half precision, and
otherwise computes the same thing in plain PyTorch, one sequence at a time (the reference the tests
compare with SDPA on CPU).

`install(model)` registers the function with transformers' `AttentionInterface` (public) under
`NAME` and sets the model's implementation to it. transformers' `set_attn_implementation` would
try to load a "flash" name as a hub kernel, so the name is set on the config as that method does
after its checks (`PretrainedConfig._attn_implementation`, a property of transformers 5.24):
`tests/model/test_attention.py` fails if continuous batching stops treating it as maskless.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch

# "flash" in the name: transformers' continuous batching then builds no mask and passes the
# sequences' boundaries (`is_flash_attention_requested`). No digit: it is no flash-attn version
# that transformers would try to import.
NAME = "entity_varlen_flash"
_HALF = (torch.float16, torch.bfloat16)


def _reference(
    query: torch.Tensor,  # [tokens_q, heads, dim]
    key: torch.Tensor,  # [tokens_k, kv_heads, dim]
    value: torch.Tensor,
    cu_q: list[int],
    cu_k: list[int],
    scale: float,
) -> torch.Tensor:
    """Each sequence's queries attend to its own keys, causally, aligned at the end (bottom-right):
    a sequence's last query sees every one of its keys, its queries before that one key fewer each.
    Query rows past the last sequence (padding) come out zero."""
    out = torch.zeros_like(query)
    groups = query.shape[1] // key.shape[1]
    for (q0, q1), (k0, k1) in zip(pairwise(cu_q), pairwise(cu_k), strict=True):
        if q1 == q0:
            continue
        q = query[q0:q1].transpose(0, 1)  # [heads, lq, dim]
        k = key[k0:k1].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = value[k0:k1].transpose(0, 1).repeat_interleave(groups, dim=0)
        length_q, length_k = q1 - q0, k1 - k0
        visible = torch.ones(length_q, length_k, dtype=torch.bool, device=query.device).tril(length_k - length_q)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
        out[q0:q1] = attended.transpose(0, 1)
    return out


def _flash(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
) -> torch.Tensor:
    """torch's FlashAttention-2 kernel over the same sequences (CUDA, fp16/bf16; grouped KV heads
    native; causal is bottom-right aligned, as in the reference). Query rows past the last
    sequence (padding) come out zero, as there; nothing here waits for the device, so a captured
    CUDA graph can replay it."""
    out: torch.Tensor = torch.ops.aten._flash_attention_forward(
        query, key, value, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale
    )[0]
    padding = torch.arange(query.shape[0], device=query.device) >= cu_q[-1]
    return out.masked_fill(padding[:, None, None], 0.0)


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, tokens_q, dim]
    key: torch.Tensor,  # [1, kv_heads, tokens_k, dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int = 0,
    max_length_k: int = 0,
    **kwargs: Any,
) -> tuple[torch.Tensor | Any, Any]:
    """An AttentionInterface function: for continuous batching, [1, tokens, heads, dim] out; for any
    other forward pass of the model (scoring, the padded engine), transformers' SDPA attention."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if attention_mask is not None:
        raise ValueError(f"{NAME} takes sequence boundaries, not a mask")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [tokens, heads, dim]
    if q.is_cuda and q.dtype in _HALF:
        cu_q, cu_k = cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32)
        out = _flash(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_length_q, max_length_k, scale)
    else:
        out = _reference(q, k, v, cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist(), scale)
    return out.unsqueeze(0), None


def supports(model: Any) -> str | None:
    """Why the model cannot use `varlen_attention`, or None when it can."""
    config = model.config.get_text_config()
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"its layers are {sorted(layer_types)}; varlen attention covers full attention only"
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "sliding_window", None):
        return "it softcaps or windows its attention"
    if not getattr(model, "_supports_flash_attn", False):
        return f"{type(model).__name__} does not take a flash-style attention function"
    if model.device.type == "cuda" and model.dtype not in _HALF:
        # The reference reads the boundaries on the host, which a captured CUDA graph cannot.
        return f"on CUDA it needs float16 or bfloat16 weights, not {model.dtype}"
    return None


def install(model: Any) -> None:
    """Register `varlen_attention` and make it the model's attention implementation.

    Its mask function is SDPA's, for the model's other forward passes (continuous batching makes
    no mask with its paged cache, whatever the implementation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = NAME
