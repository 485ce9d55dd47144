"""Attention over a continuous batch as variable-length sequences, with no mask over the whole batch.

transformers' continuous batching runs every request of a step as one packed sequence. For SDPA
and eager attention it builds a mask over all of them each step ([tokens, cache + tokens]), and
with a mask it also leaves async batching off. An attention implementation whose name says "flash"
is handed the sequences' boundaries instead (`cu_seq_lens_q`, `cu_seq_lens_k`), and no mask is
built. No flash-attn wheel installs here, but torch ships FlashAttention-2's variable-length kernel
(`aten._flash_attention_forward`); `varlen_attention` calls it on CUDA in half precision, and
otherwise computes the same thing in plain PyTorch: the sequences as a batch, each over its own
keys (the reference the tests compare with SDPA on CPU).

`install(model)` registers the function with transformers' `AttentionInterface` (public) under
`NAME` and sets the model's implementation to it. transformers' `set_attn_implementation` would
try to load a "flash" name as a hub kernel, so the name is set on the config as that method does
after its checks (`PretrainedConfig._attn_implementation`, a property of transformers 5.24):
`tests/model/test_attention.py` fails if continuous batching stops treating it as maskless.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch

# "flash" in the name: transformers' continuous batching then builds no mask and passes the
# sequences' boundaries (`is_flash_attention_requested`). No digit: it is no flash-attn version
# that transformers would try to import.
NAME = "entity_varlen_flash"
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class _Group:
    """Sequences of a step that run as one batch, each padded to the group's longest: which rows of
    the step's queries and keys each reads (padding reads row 0, then is dropped) and what each of
    its queries sees."""

    rows_q: torch.Tensor  # [sequences, width_q]
    rows_k: torch.Tensor  # [sequences, width_k]
    real_q: torch.Tensor  # [sequences, width_q]: a query of the sequence, not padding
    visible: torch.Tensor  # [sequences, 1, width_q, width_k]


@functools.lru_cache(maxsize=4)
def _plan(cu_q: tuple[int, ...], cu_k: tuple[int, ...], device: torch.device) -> tuple[_Group, ...]:
    """A step's groups: the decoding sequences (one query each) and the others (prefill chunks).
    Every layer of a step has the same boundaries: worked out once a step, not once a layer."""
    spans = [(q0, q1 - q0, k0, k1 - k0) for (q0, q1), (k0, k1) in zip(pairwise(cu_q), pairwise(cu_k), strict=True)]
    groups = []
    for group in ([x for x in spans if x[1] == 1], [x for x in spans if x[1] > 1]):
        if not group:
            continue
        q0, lq, k0, lk = (torch.tensor(column, device=device) for column in zip(*group, strict=True))
        at_q = torch.arange(int(lq.max()), device=device)
        at_k = torch.arange(int(lk.max()), device=device)
        real_q = at_q[None, :] < lq[:, None]
        real_k = at_k[None, :] < lk[:, None]
        # Bottom-right causal: query i of a sequence sees its keys up to i + (keys - queries).
        visible = real_k[:, None, :] & (at_k[None, None, :] <= at_q[None, :, None] + (lk - lq)[:, None, None])
        visible |= ~real_q[:, :, None]  # a padding query sees every key (no row all masked); it is dropped
        groups.append(
            _Group(
                rows_q=(q0[:, None] + at_q[None, :]).masked_fill(~real_q, 0),
                rows_k=(k0[:, None] + at_k[None, :]).masked_fill(~real_k, 0),
                real_q=real_q,
                visible=visible[:, None],
            )
        )
    return tuple(groups)


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
    Query rows past the last sequence (padding) come out zero.

    The sequences run as a batch, each padded to the longest of its group (`_plan`): the decoding
    ones in one SDPA call, the others in another, so a step's work grows with its sequences' own
    lengths, not with the whole step's keys for every query as the mask over the batch makes it."""
    out = torch.zeros_like(query)
    for group in _plan(tuple(cu_q), tuple(cu_k), query.device):
        attended = torch.nn.functional.scaled_dot_product_attention(
            _rows(query, group.rows_q).transpose(1, 2),  # [sequences, heads, width_q, dim]
            _rows(key, group.rows_k).transpose(1, 2),
            _rows(value, group.rows_k).transpose(1, 2),
            attn_mask=group.visible,
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        out[group.rows_q[group.real_q]] = attended.transpose(1, 2)[group.real_q]
    return out


def _rows(tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`tokens[rows]` ([sequences, width, heads, dim]) by `index_select` on the flattened rows: whole
    rows copied at once, where advanced indexing's general kernel (the same result) took three times
    as long on the CPU, a third of a decode step with long prompts."""
    return tokens.index_select(0, rows.flatten()).view(*rows.shape, *tokens.shape[1:])


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
