"""How a request chooses its tokens (`Sampling`), and seeded draws that need no generator.

The per-row tensors that apply it in a decode step are in `rows`: every core
chooses tokens with the same code, one row of logits per sequence, so a
request gives the same tokens whichever engine serves it and whatever else
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

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
