"""The rows of continuous batching's int32 argument tensor, and each request's row.

transformers hands a `ContinuousBatchingLogitsProcessorList` a static int32 tensor with a column
per request of the step; `cb_sampling.SamplingProcessors` writes each request's sampling
arguments there (`rows.RowValues`, floats as their float32 bits) before the step, and reads them
inside it. `Admitted` is a request's column worked out once, when the request first has a row:
only the seeded key and min_new_tokens' hold change from step to step (`rows.step_values`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from . import rows as r
from . import sampling as s

# The rows of the tensor, in `rows.RowValues`' order.
TEMPERATURE, TOP_K, TOP_P, MIN_P, TYPICAL_P, PENALTY, KEY, FLAGS = range(8)
ROWS = 8
FLOAT_ROWS = (TEMPERATURE, TOP_P, MIN_P, TYPICAL_P, PENALTY)

_FLOATS = struct.Struct(f"<{len(FLOAT_ROWS)}f")
_FLOAT_BITS = struct.Struct(f"<{len(FLOAT_ROWS)}i")


def check(values: r.RowValues) -> None:
    """Refuse a row the int32 argument tensor cannot hold (it would kill the batching thread)."""
    for index, value in enumerate(values):
        if index in FLOAT_ROWS:
            if not math.isfinite(value):
                raise ValueError(f"{value} is not a finite sampling parameter")
        elif not -(2**31) <= value < 2**31:
            raise OverflowError(f"{value} does not fit the manager's int32 arguments")


def encoded(values: r.RowValues) -> list[int]:
    """A row's arguments as the tensor's int32s (floats as their float32 bits); OverflowError for
    a float float32 cannot hold."""
    floats = _FLOAT_BITS.unpack(_FLOATS.pack(*(values[i] for i in FLOAT_ROWS)))
    row = [int(v) for v in values]
    for index, bits in zip(FLOAT_ROWS, floats, strict=True):
        row[index] = bits
    return row


@dataclass(slots=True)
class Admitted:
    """What a request's rows need from its sampling parameters, worked out once, when the request
    first has a row (admission), and kept while it has one every step: its arguments as int32s
    (those of step 0: `rows.step_values` gives the ones that change) and what its row uses."""

    sampling: s.Sampling
    prompt_len: int
    arguments: list[int]
    stepwise: bool  # its key or flags change from step to step
    penalised: bool
    adjusted: bool
    wants: int | None  # how many alternatives it wants with its logprobs; None: no logprobs

    def at(self, step: int) -> list[int]:
        """Its int32 arguments at generation step `step`."""
        if not self.stepwise:
            return self.arguments
        return [*self.arguments[:KEY], *r.step_values(self.sampling, step)]


def admitted(sampling: s.Sampling, prompt_len: int, vocab: int) -> Admitted:
    """A request's `Admitted`; ValueError or OverflowError if the tensor cannot hold its arguments."""
    values = r.row_values(sampling, 0, vocab)
    check(values)
    return Admitted(
        sampling,
        prompt_len,
        encoded(values),
        r.stepwise(sampling),
        sampling.penalised,
        sampling.adjusted,
        sampling.top_logprobs if sampling.wants_logprobs else None,
    )


def greedy(vocab: int) -> Admitted:
    """A plain greedy row: the tensor's defaults, and a faulty request's stand-in."""
    return admitted(s.GREEDY, 0, vocab)
