"""A decode step's per-row tensors: every request's changes to its logits, and its choice.

Each core builds `Rows` from its requests' `Sampling` (the batching core's
logits hook in `cb_sampling`; the padded and sequential cores through
`pick`) and runs the same `warp` and `choose` on them, so a request's tokens
do not depend on the core or on what shares its step. A row whose value
turns a change off is left as it is by that change, so one computation serves
every row (which a captured CUDA graph needs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .sampling import Sampling, TokenLogprob, gumbel, step_key

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class Rows:
    """Per-row parameters of one decode step, as tensors on the logits' device.

    Attributes:
        temperature: float [rows]; 1 for greedy rows.
        top_k: int [rows]; the vocabulary size when off.
        top_p: float [rows]; 1 when off.
        min_p: float [rows]; 0 when off.
        typical_p: float [rows]; 1 when off.
        penalty: float [rows]; 1 when off.
        key: int [rows]; the step key of sampled rows.
        flags: int [rows]; bit 0 sampled, bit 1 EOS masked.
        seen: bool [rows, vocab] of tokens already in each sequence, or None
            when no row has a repetition penalty.
        adjust: float [rows, vocab] added to the logits (`adjustments`), or
            None when no row has one.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    typical_p: torch.Tensor
    penalty: torch.Tensor
    key: torch.Tensor
    flags: torch.Tensor
    seen: torch.Tensor | None = None
    adjust: torch.Tensor | None = None


SAMPLED = 1
NO_EOS = 2


# One row's arguments: (temperature, top_k, top_p, min_p, typical_p, penalty, key, flags).
RowValues = tuple[float, int, float, float, float, float, int, int]


def row_values(sampling: Sampling, step: int, vocab: int) -> RowValues:
    """One row's arguments at generation step `step` (`RowValues`)."""
    sampled = sampling.sampled
    return (
        sampling.temperature if sampled else 1.0,
        min(sampling.top_k, vocab) if sampled and sampling.top_k else vocab,  # fits the int32 argument row
        sampling.top_p if sampled else 1.0,
        sampling.min_p if sampled else 0.0,
        sampling.typical_p if sampled else 1.0,
        sampling.repetition_penalty,
        *step_values(sampling, step),
    )


def step_values(sampling: Sampling, step: int) -> tuple[int, int]:
    """The arguments of a row that change from step to step: (key, flags). The others stay as
    `row_values` gave them at any step."""
    sampled = sampling.sampled
    held = step < sampling.min_new_tokens and not sampling.ignore_eos
    flags = (SAMPLED if sampled else 0) | (NO_EOS if held else 0)
    return step_key(sampling.seed or 0, step) if sampled else 0, flags


def stepwise(sampling: Sampling) -> bool:
    """Whether `step_values` changes with the step (its arguments at step 0 serve every step if not)."""
    return sampling.sampled or (sampling.min_new_tokens > 0 and not sampling.ignore_eos)


def adjustments(sampling: Sampling, step: int, generated: list[int], row: torch.Tensor) -> None:
    """Write into `row` (float [vocab], zeros) what the request adds to its logits at step `step`,
    having generated `generated`: its logit_bias, minus its presence and frequency penalties, and
    -inf on its stop tokens while min_new_tokens holds them off."""
    import torch

    vocab = row.shape[0]
    if sampling.logit_bias:
        ids, biases = zip(*sampling.logit_bias, strict=True)
        row[torch.tensor(ids, device=row.device)] += torch.tensor(biases, dtype=row.dtype, device=row.device)
    if generated and (sampling.presence_penalty or sampling.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, device=row.device), minlength=vocab)[:vocab].to(row.dtype)
        row -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0).to(row.dtype)
    if sampling.stop_token_ids and step < sampling.min_new_tokens:
        row[torch.tensor(sampling.stop_token_ids, device=row.device)] = -math.inf


# Which rows a filter of `warp` runs on: all of them (True: one static computation, as a captured
# graph needs), none (False), or those listed (the eager hook knows each row's parameters).
Selection = bool | Sequence[int]


def warp(
    logits: torch.Tensor, rows: Rows, eos_mask: torch.Tensor, *, sort: Selection = True, filters: Selection = True
) -> torch.Tensor:
    """Log-probabilities [rows, vocab] of the distribution each row chooses from.

    In transformers' order: repetition penalty; what the rows add (logit
    bias, presence and frequency penalties, held-off stop tokens); EOS
    masking (min_new_tokens); temperature; top-k and top-p; min-p; typical-p;
    then log-softmax. `sort` selects the rows that get top-k/top-p (a sort of
    the row) and `filters` those that get min-p/typical-p (`Selection`;
    `filtering` says which rows use them). A row whose value turns a filter
    off is left as it is by that filter, so leaving it out changes nothing:
    a greedy row beside sampled ones pays for no sort.
    """
    import torch

    scores = logits.float()
    if rows.seen is not None:
        penalty = rows.penalty[:, None]
        punished = torch.where(scores > 0, scores / penalty, scores * penalty)
        scores = torch.where(rows.seen, punished, scores)
    if rows.adjust is not None:
        scores = scores + rows.adjust
    no_eos = (rows.flags & NO_EOS).bool()
    scores = scores.masked_fill(no_eos[:, None] & eos_mask[None, :], -math.inf)
    scores = scores / rows.temperature[:, None]
    scores = _on(scores, sort, lambda part, at: _top_k_top_p(part, at(rows.top_k), at(rows.top_p)))
    scores = _on(scores, filters, lambda part, at: _typical(_min_p(part, at(rows.min_p)), at(rows.typical_p)))
    return scores.log_softmax(dim=-1)


def _on(
    scores: torch.Tensor,
    selection: Selection,
    apply: Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor],
) -> torch.Tensor:
    """`apply(part, at)` to the selected rows of `scores` (`at` picks the same rows of a per-row tensor)."""
    import torch

    if selection is True:
        return apply(scores, lambda values: values)
    if selection is False or len(selection) == 0:
        return scores
    if len(selection) == scores.shape[0]:
        return apply(scores, lambda values: values)
    index = torch.tensor(selection, device=scores.device)
    part = apply(scores.index_select(0, index), lambda values: values.index_select(0, index))
    return scores.index_copy(0, index, part)


def _top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p (nucleus) of what top-k kept: a sort of each row."""
    import torch

    vocab = scores.shape[-1]
    ordered = scores.sort(dim=-1, descending=True).values
    k = top_k.clamp(1, vocab).to(torch.int64)
    ranks = torch.arange(vocab, device=scores.device)[None, :]
    ordered = ordered.masked_fill(ranks >= k[:, None], -math.inf)
    probs = ordered.softmax(dim=-1)
    # Keep a token while the mass before it is under top_p (the first always).
    keep = ((probs.cumsum(dim=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1)
    keep &= ranks < k[:, None]
    last = (keep.sum(dim=-1, keepdim=True) - 1).clamp(min=0)
    threshold = ordered.gather(1, last)
    return scores.masked_fill(scores < threshold, -math.inf)


def _min_p(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Min-p: drop the tokens less likely than min_p times the row's most likely one (0 drops none)."""
    probs = scores.softmax(dim=-1)
    floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return scores.masked_fill(probs < floor, -math.inf)


def _typical(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling: rank tokens by how far their surprise (-log p) is from the row's
    entropy, nearest first, and keep them while the probability before them is under `mass`
    (the nearest always; a mass of 1 keeps every token)."""
    import torch

    logp = scores.log_softmax(dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).nan_to_num(nan=0.0).sum(dim=-1, keepdim=True)  # 0 * -inf is a dropped token's 0
    distance = (-logp - entropy).abs()
    order = distance.argsort(dim=-1)
    in_order = probs.gather(1, order)
    before = in_order.cumsum(dim=-1) - in_order
    drop_sorted = (before >= mass[:, None]) & (mass[:, None] < 1)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def noisy(logprobs: torch.Tensor, rows: Rows, sampled: Selection = True) -> torch.Tensor:
    """Scores whose argmax is each row's choice: sampled rows get their seeded Gumbel noise.

    `sampled` lists the sampled rows (the eager hook knows them: greedy rows then cost nothing);
    True computes every row's noise and keeps the sampled rows' (one static computation)."""
    if sampled is True:
        flags = (rows.flags & SAMPLED).bool()
        return logprobs + gumbel(rows.key, logprobs.shape[-1]).masked_fill(~flags[:, None], 0.0)
    return _on(logprobs, sampled, lambda part, at: part + gumbel(at(rows.key), part.shape[-1]))


def choose(logprobs: torch.Tensor, rows: Rows, sampled: Selection = True) -> torch.Tensor:
    """The chosen token of each row: argmax for greedy rows, Gumbel-max for sampled rows."""
    import torch

    return torch.argmax(noisy(logprobs, rows, sampled), dim=-1)


def eos_mask(eos_ids: frozenset[int], vocab: int, device: Any) -> torch.Tensor:
    """A bool [vocab] mask of the EOS ids."""
    import torch

    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    ids = [i for i in eos_ids if 0 <= i < vocab]
    if ids:
        mask[ids] = True
    return mask


def seen_mask(sequences: list[list[int] | None], vocab: int, device: Any) -> torch.Tensor:
    """A bool [rows, vocab] mask of the tokens in each row's sequence (None: no row)."""
    import torch

    seen = torch.zeros((len(sequences), vocab), dtype=torch.bool, device=device)
    rows: list[int] = []
    cols: list[int] = []
    for row, ids in enumerate(sequences):
        if ids:
            rows += [row] * len(ids)
            cols += ids
    if rows:
        seen[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = True
    return seen


def logprob_entries(
    logprobs: torch.Tensor, chosen: torch.Tensor, wanted: list[int | None]
) -> list[TokenLogprob | None]:
    """TokenLogprob for each row that wants one (`wanted[row]` = its top_logprobs), else None."""
    import torch

    picked_values = logprobs.gather(1, chosen[:, None])
    ranks = ((logprobs > picked_values).sum(dim=-1) + 1).tolist()
    picked = picked_values[:, 0].tolist()
    top_n = max((n for n in wanted if n), default=0)
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if top_n:
        values, ids = torch.topk(logprobs, top_n, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    ids_chosen = chosen.tolist()
    out: list[TokenLogprob | None] = []
    for row, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        top = tuple(zip(top_ids[row][:n], top_values[row][:n], strict=True)) if n else ()
        out.append(TokenLogprob(int(ids_chosen[row]), float(picked[row]), top, rank=int(ranks[row])))
    return out


def rows_for(params: list[RowValues], sequences: list[list[int] | None], vocab: int, device: Any) -> Rows:
    """Rows from per-row values (row_values) and, where penalised, the row's token ids."""
    import torch

    columns = [list(column) for column in zip(*params, strict=True)]
    temperature, top_k, top_p, min_p, typical_p, penalty, key, flags = columns

    def floats(values: list[Any]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    def ints(values: list[Any]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return Rows(
        temperature=floats(temperature),
        top_k=ints(top_k),
        top_p=floats(top_p),
        min_p=floats(min_p),
        typical_p=floats(typical_p),
        penalty=floats(penalty),
        key=ints(key),
        flags=ints(flags),
        seen=seen_mask(sequences, vocab, device) if any(s is not None for s in sequences) else None,
    )


def adjust_rows(
    samplings: list[Sampling],
    steps: list[int],
    generated: Callable[[int], list[int]],
    vocab: int,
    device: Any,
    fault: Callable[[int, Exception], None] | None = None,
) -> torch.Tensor | None:
    """The float [rows, vocab] each row adds to its logits (`adjustments`, from `generated(row)`, read
    only for rows that add something); None when no row adds anything. With `fault`, a row whose
    additions fail is reported to it and adds nothing; without, the failure is raised."""
    import torch

    if not any(sampling.adjusted for sampling in samplings):
        return None
    adjust = torch.zeros((len(samplings), vocab), dtype=torch.float32, device=device)
    for row, (sampling, step) in enumerate(zip(samplings, steps, strict=True)):
        if sampling.adjusted:
            try:
                adjustments(sampling, step, generated(row), adjust[row])
            except Exception as exc:
                if fault is None:
                    raise
                fault(row, exc)
                adjust[row].zero_()
    return adjust


def filtering(samplings: list[Sampling]) -> tuple[list[int], list[int]]:
    """The rows that use top-k/top-p (a sort), and those that use min-p/typical-p (`warp`'s selections)."""
    sort = [i for i, x in enumerate(samplings) if x.sampled and (x.top_k > 0 or x.top_p < 1)]
    filters = [i for i, x in enumerate(samplings) if x.sampled and (x.min_p > 0 or x.typical_p < 1)]
    return sort, filters


def pick(
    logits: torch.Tensor,
    samplings: list[Sampling],
    steps: list[int],
    sequences: list[list[int]],
    eos_ids: torch.Tensor,
    allowed: torch.Tensor | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Each row's next token and, where its request wants one, its logprob entry.

    For cores that decode with the model's own forward pass (one row, or a
    padded batch): row i is at generation step `steps[i]` of a request with
    `samplings[i]`, having seen `sequences[i]` (its prompt, then the
    `steps[i]` tokens generated so far); `eos_ids` is `eos_mask`'s mask;
    `allowed`, a bool [rows, vocab] mask of the tokens constrained rows may
    take (`constraints`), all True for the others. Plain greedy rows take
    the argmax of the logits themselves, as the batching core's hook leaves
    them.
    """
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)

    if all(sampling.plain for sampling in samplings):
        none: list[TokenLogprob | None] = [None] * len(samplings)
        return [int(t) for t in logits.argmax(dim=-1).tolist()], none
    vocab = logits.shape[-1]
    params = [row_values(sampling, step, vocab) for sampling, step in zip(samplings, steps, strict=True)]
    seen = [seq if sampling.penalised else None for sampling, seq in zip(samplings, sequences, strict=True)]
    rows = rows_for(params, seen, vocab, logits.device)
    rows.adjust = adjust_rows(
        samplings,
        steps,
        lambda row: sequences[row][len(sequences[row]) - steps[row] :] if steps[row] else [],
        vocab,
        logits.device,
    )
    sort, filters = filtering(samplings)
    logprobs = warp(logits, rows, eos_ids, sort=sort, filters=filters)
    sampled = [i for i, sampling in enumerate(samplings) if sampling.sampled]
    chosen = choose(logprobs, rows, sampled) if sampled else logprobs.argmax(dim=-1)
    wanted = [sampling.top_logprobs if sampling.wants_logprobs else None for sampling in samplings]
    entries: list[TokenLogprob | None] = [None] * len(wanted)
    if any(w is not None for w in wanted):
        entries = logprob_entries(logprobs, chosen, wanted)
    return [int(t) for t in chosen.tolist()], entries
