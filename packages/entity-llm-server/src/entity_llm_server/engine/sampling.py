"""Choosing the next token: greedy or seeded sampling, the logit warpers, logprobs.

Both engines choose tokens with `choose()`, one row of logits per sequence, so
a request gives the same tokens whichever engine serves it and whatever else
shares its batch.

Seeded sampling without a random-number generator
--------------------------------------------------
transformers' continuous batching has one sampler seed for the whole manager:
a request's draws would depend on which other requests share its steps. A
per-request `torch.Generator` would fix that in eager code, but a generator
cannot be stepped row by row inside a captured CUDA graph. Instead each draw
is a pure function of the request's seed, its step and the token id: a
counter-based hash gives every (seed, step, token) a uniform number, turned
into Gumbel noise, and the token with the largest `logprob + noise` is chosen.
That is the Gumbel-max trick: an exact sample from the softmax, reproducible
from the seed alone, made of elementwise tensor operations (so it runs inside
a CUDA graph), and independent of batch composition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .constraints import Constraint

MAX_TOP_LOGPROBS = 10
# Temperatures below this are greedy: dividing logits by less overflows float32
# (the property test found NaN logprobs at 1e-38).
MIN_TEMPERATURE = 1e-5
_M32 = 0xFFFFFFFF
_BELOW_ONE = 1.0 - 2.0**-24
_M64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class Sampling:
    """How one request chooses its tokens (the defaults are greedy, no warpers).

    Attributes:
        temperature: 0 (or below MIN_TEMPERATURE) for greedy; otherwise the
            softmax temperature.
        top_p: nucleus mass kept (1: all); sampling only.
        top_k: most likely tokens kept (0: all); sampling only.
        repetition_penalty: 1 for none; >1 discourages tokens already seen.
        min_new_tokens: EOS is masked until this many tokens were generated.
        seed: the sampler's seed (ignored when greedy); None lets the engine
            pick one (and report it).
        logprobs: report each chosen token's logprob.
        top_logprobs: also report this many alternatives per token.
        constraint: what the output must match (`constraints`), or None.
        min_p: min-p sampling (0: off); sampling only.
        typical_p: locally typical sampling's mass (1: off); sampling only.
        presence_penalty: subtracted from the logits of tokens generated at
            least once (0: off).
        frequency_penalty: subtracted once per time a token was generated (0: off).
        logit_bias: (token id, bias) pairs added to the logits.
        stop_token_ids: ids that end generation, as EOS does (held off, like
            EOS, until min_new_tokens were generated).
        ignore_eos: the model's EOS ids do not end generation (nor are they
            held off by min_new_tokens: they are ordinary tokens).
        prompt_logprobs: score the prompt first (`scoring`), with this many
            alternatives per position; None: do not.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: Constraint | None = None
    min_p: float = 0.0
    typical_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    prompt_logprobs: int | None = None

    @property
    def sampled(self) -> bool:
        return self.temperature >= MIN_TEMPERATURE

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def adjusted(self) -> bool:
        """Whether something is added to its logits (`adjustments`)."""
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or (self.stop_token_ids and self.min_new_tokens)
        )

    @property
    def plain(self) -> bool:
        """Greedy with nothing to apply or report: the model's own argmax is the choice."""
        return not (
            self.sampled
            or self.penalised
            or self.min_new_tokens
            or self.wants_logprobs
            or self.constraint is not None
            or self.adjusted
        )

    def stop_ids(self, eos_ids: frozenset[int]) -> frozenset[int]:
        """The ids that end this request's generation: the model's EOS ids (unless ignore_eos) and its stop tokens."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else eos_ids)


GREEDY = Sampling()


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A chosen token's logprob and the most likely alternatives.

    Attributes:
        token_id: the chosen token.
        logprob: its log-probability.
        top: the most likely (id, logprob) pairs, most likely first.
        top_text: each alternative's text decoded alone (filled by the
            engine's event loop side, not on the model's thread).
        rank: the token's rank in the distribution (1: the most likely;
            tokens of equal probability share one); 0 where not computed.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    top_text: tuple[str, ...] = ()
    rank: int = 0


def step_key(seed: int, step: int) -> int:
    """A 31-bit key for the `step`-th draw of a request seeded with `seed` (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    x ^= x >> 31
    return x & 0x7FFFFFFF


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request for n samples seeded with `seed`: the seed itself for
    sample 0, a 63-bit splitmix64 mix of (seed, index) for the others."""
    if index == 0:
        return seed
    x = (seed ^ (index * 0x9E3779B97F4A7C15)) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def gumbel(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise [rows, vocab] that depends only on each row's key and the token id.

    A 32-bit integer hash (xorshift-multiply; every product stays below 2**63,
    so int64 arithmetic never overflows) of key and token id, turned into a
    uniform number in (0, 1), then into -log(-log(u)).
    """
    import torch

    ids = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    x = (keys.to(torch.int64)[:, None] ^ ((ids * 0x27D4EB2F) & _M32)[None, :]) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    x = x ^ (x >> 16)
    u = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    # The top value, (2**24 - 0.5) / 2**24, rounds to 1.0 in float32, and -log(-log(1))
    # is +inf: that token would win whatever its probability (and a masked one, at
    # -inf, would become NaN). Keep u below 1: the largest float32 under it.
    u = u.clamp(max=_BELOW_ONE)
    return -torch.log(-torch.log(u))


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
    held = step < sampling.min_new_tokens and not sampling.ignore_eos
    flags = (SAMPLED if sampled else 0) | (NO_EOS if held else 0)
    return (
        sampling.temperature if sampled else 1.0,
        min(sampling.top_k, vocab) if sampled and sampling.top_k else vocab,  # fits the int32 argument row
        sampling.top_p if sampled else 1.0,
        sampling.min_p if sampled else 0.0,
        sampling.typical_p if sampled else 1.0,
        sampling.repetition_penalty,
        step_key(sampling.seed or 0, step) if sampled else 0,
        flags,
    )


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


def warp(
    logits: torch.Tensor, rows: Rows, eos_mask: torch.Tensor, *, sort: bool = True, filters: bool = True
) -> torch.Tensor:
    """Log-probabilities [rows, vocab] of the distribution each row chooses from.

    In transformers' order: repetition penalty; what the rows add (logit
    bias, presence and frequency penalties, held-off stop tokens); EOS
    masking (min_new_tokens); temperature; top-k and top-p; min-p; typical-p;
    then log-softmax. `sort=False` skips top-k/top-p and `filters=False`
    min-p/typical-p (the caller knows no row uses them). A row whose value
    turns a filter off is left as it is by that filter, so one computation
    serves every row of a batch.
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
    if sort:
        vocab = scores.shape[-1]
        ordered = scores.sort(dim=-1, descending=True).values
        k = rows.top_k.clamp(1, vocab).to(torch.int64)
        ranks = torch.arange(vocab, device=scores.device)[None, :]
        ordered = ordered.masked_fill(ranks >= k[:, None], -math.inf)
        probs = ordered.softmax(dim=-1)
        # Keep a token while the mass before it is under top_p (the first always).
        keep = ((probs.cumsum(dim=-1) - probs) < rows.top_p[:, None]) | (rows.top_p[:, None] >= 1)
        keep &= ranks < k[:, None]
        last = (keep.sum(dim=-1, keepdim=True) - 1).clamp(min=0)
        threshold = ordered.gather(1, last)
        scores = scores.masked_fill(scores < threshold, -math.inf)
    if filters:
        scores = _min_p(scores, rows.min_p)
        scores = _typical(scores, rows.typical_p)
    return scores.log_softmax(dim=-1)


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


def noisy(logprobs: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Scores whose argmax is each row's choice: sampled rows get their seeded Gumbel noise."""
    sampled = (rows.flags & SAMPLED).bool()
    return logprobs + gumbel(rows.key, logprobs.shape[-1]).masked_fill(~sampled[:, None], 0.0)


def choose(logprobs: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The chosen token of each row: argmax for greedy rows, Gumbel-max for sampled rows."""
    import torch

    return torch.argmax(noisy(logprobs, rows), dim=-1)


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
    samplings: list[Sampling], steps: list[int], generated: list[list[int]], vocab: int, device: Any
) -> torch.Tensor | None:
    """The float [rows, vocab] each row adds to its logits (`adjustments`); None when no row adds anything."""
    import torch

    if not any(sampling.adjusted for sampling in samplings):
        return None
    adjust = torch.zeros((len(samplings), vocab), dtype=torch.float32, device=device)
    for row, (sampling, step, tokens) in enumerate(zip(samplings, steps, generated, strict=True)):
        if sampling.adjusted:
            adjustments(sampling, step, tokens, adjust[row])
    return adjust


def filtering(samplings: list[Sampling]) -> tuple[bool, bool]:
    """Whether any of these rows uses top-k/top-p (a sort), and whether any uses min-p/typical-p."""
    sort = any(x.sampled and (x.top_k > 0 or x.top_p < 1) for x in samplings)
    filters = any(x.sampled and (x.min_p > 0 or x.typical_p < 1) for x in samplings)
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
    generated = [seq[len(seq) - step :] if step else [] for seq, step in zip(sequences, steps, strict=True)]
    rows.adjust = adjust_rows(samplings, steps, generated, vocab, logits.device)
    sort, filters = filtering(samplings)
    logprobs = warp(logits, rows, eos_ids, sort=sort, filters=filters)
    chosen = choose(logprobs, rows) if any(sampling.sampled for sampling in samplings) else logprobs.argmax(dim=-1)
    wanted = [sampling.top_logprobs if sampling.wants_logprobs else None for sampling in samplings]
    entries: list[TokenLogprob | None] = [None] * len(wanted)
    if any(w is not None for w in wanted):
        entries = logprob_entries(logprobs, chosen, wanted)
    return [int(t) for t in chosen.tolist()], entries
