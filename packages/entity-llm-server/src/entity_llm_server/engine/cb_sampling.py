"""Per-request sampling inside transformers' continuous batching.

transformers lets a `ContinuousBatchingLogitsProcessorList` turn each step's
logits into scores, with per-request arguments copied into a static tensor
before the step (so the processing can run inside a captured CUDA graph); the
manager then takes the argmax. `SamplingProcessors` is such a list: it applies
`sampling.warp` with each request's parameters and adds the request's seeded
Gumbel noise (`sampling.choose`), so the manager's argmax *is* the request's
sample: greedy rows are untouched argmax, sampled rows an exact, seeded draw.

Repetition penalties need each sequence's tokens, and logprobs go back to the
host. Eager mode (no CUDA graphs: every CPU server) does both in Python around
the step. Graph mode (`eager=False`) keeps the step one static computation,
which a captured graph can replay: before the step, the penalised rows'
tokens are written into a static [rows, vocab] mask the step reads; inside
it, every row's chosen logprob and top alternatives are written into static
output buffers; after it, `Recorder` (the manager's output router) copies the
rows that asked into their records before the manager hands out the step's
tokens. One set of buffers serves one step at a time, so the manager runs
without asynchronous batching when graphs are on (`BatchingCore.cb_config`).
On a CPU, transformers turns graphs off and runs the same graph-mode code
step by step, which is how the tests check it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.continuous_batching.continuous_api import OutputRouter

from . import cb_arguments as a
from . import constraints as c
from . import rows as r
from . import sampling as s
from .cb_arguments import Admitted
from .constraints import Follower


def _padded(mask: torch.Tensor, rows: int, *, fill: bool) -> torch.Tensor:
    """A bool [k, vocab] mask extended to `rows` rows of `fill`."""
    if mask.shape[0] >= rows:
        return mask
    return torch.cat([mask, mask.new_full((rows - mask.shape[0], mask.shape[1]), fill)])


def _generated(state: Any) -> list[int]:
    """A request's generated tokens, including those a soft reset (the manager offloading it) moved
    into its initial tokens."""
    tokens: list[int] = state.initial_tokens + state.generated_tokens
    return tokens[state.logit_processor_kwargs.get("prompt_len", len(state.initial_tokens)) :]


class SamplingProcessors(ContinuousBatchingLogitsProcessorList):
    """The manager's logits processing: every request's warpers and sampler.

    Args:
        vocab_size: the model's vocabulary (the logits' last dimension).
        eos_ids: the ids that min_new_tokens keeps from being chosen.
        device: the model's device.
        eager: no CUDA graphs: the per-row work runs in Python around each step.
        rows: the most rows (requests) a step has: the graph-mode buffers' size.

    Requests carry `sampling=Sampling(...)` and `prompt_len=N` as
    `add_request` keyword arguments. A request that wants logprobs registers
    `logprobs[request_id] = []` first; its TokenLogprob entries are appended
    there in token order until it removes the entry.
    """

    def __init__(self, vocab_size: int, eos_ids: frozenset[int], device: Any, *, eager: bool, rows: int = 0) -> None:
        super().__init__(LogitsProcessorList())
        self.tensors_required = a.ROWS
        self.do_processing = True
        self.supported_keys = {"sampling": s.Sampling, "prompt_len": int}
        self.ignored_keys = set()
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.eager = eager
        self.eos_mask = r.eos_mask(eos_ids, vocab_size, device)
        self._greedy = a.greedy(vocab_size)
        # request id -> what its rows need (`cb_arguments.Admitted`), for the requests of the last step.
        self._admitted: dict[str, Admitted] = {}
        self.logprobs: dict[str, list[s.TokenLogprob]] = {}
        # request id -> why its sampling parameters could not be applied; the
        # engine fails those requests (the batching thread carries on).
        self.faults: dict[str, str] = {}
        # Eager mode only: what the step being prepared needs.
        self._plain = False
        self._sort: r.Selection = True  # the rows that get top-k/top-p, and min-p/typical-p (`rows.warp`)
        self._filters: r.Selection = True
        self._sampled: list[int] = []  # the rows that draw (Gumbel noise); the others are argmax
        self._seen: list[list[int] | None] = []
        self._added: torch.Tensor | None = None  # eager: what the step's rows add to their logits
        self._wanted: list[tuple[str, int] | None] = []
        # request id -> its constraint's matcher (`constraints`), registered by the core.
        self.followers: dict[str, Follower] = {}
        self.masks = c.Masks()
        self._allowed: torch.Tensor | None = None  # eager: the step's allowed tokens, when a row is constrained
        self._masked: set[int] = set()  # graph mode: rows of the bitmask buffer that are not all ones
        # Graph mode: seen-mask row -> (the request whose tokens it holds, how many of them).
        self._seen_owners: dict[int, tuple[str, int]] = {}
        self._adjusted: set[int] = set()  # graph mode: rows of the adjustment buffer that are not zeros
        if not eager:  # graph mode's static buffers, read and written inside the step
            self._bitmask = torch.full((rows, c.words(vocab_size)), -1, dtype=torch.int32, device=device)
            self._seen_rows = torch.zeros((rows, vocab_size), dtype=torch.bool, device=device)
            self._adjust_rows = torch.zeros((rows, vocab_size), dtype=torch.float32, device=device)
            self._chosen = torch.zeros(rows, dtype=torch.int64, device=device)
            self._chosen_logprob = torch.zeros(rows, dtype=torch.float32, device=device)
            self._chosen_rank = torch.zeros(rows, dtype=torch.int64, device=device)
            self._top_logprobs = torch.zeros((rows, s.MAX_TOP_LOGPROBS), dtype=torch.float32, device=device)
            self._top_ids = torch.zeros((rows, s.MAX_TOP_LOGPROBS), dtype=torch.int64, device=device)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        for index, value in enumerate(self._greedy.arguments):
            int32_tensor[index] = value

    def prepare_tensor_args(self, requests_in_batch: list[Any], arg_storage: torch.Tensor) -> torch.Tensor:
        rows = [r for r in requests_in_batch if r.has_new_token]  # the logits' rows, in order
        known, self._admitted = self._admitted, {}
        entries: list[Admitted] = []
        steps: list[int] = []
        arguments: list[list[int]] = []
        bitmask: torch.Tensor | None = None
        constrained: list[tuple[Follower, int, str]] = []  # (follower, row, request id)
        for index, future in enumerate(rows):
            state = future.state
            sampling = state.logit_processor_kwargs.get("sampling", s.GREEDY)
            entry = known.get(state.request_id)
            if entry is None or entry.sampling is not sampling:
                entry = self._admit(state, sampling)
            # Kept for its next step (a faulty request's greedy stand-in is not its sampling: it is
            # admitted again, and fails again, until the engine has failed it).
            self._admitted[state.request_id] = entry
            # position_offset already counts this step's input: the new token's index follows.
            step = state.position_offset - entry.prompt_len
            entries.append(entry)
            steps.append(step)
            arguments.append(entry.at(step))
            if (follower := self.followers.get(state.request_id)) is not None:
                if bitmask is None:
                    bitmask = torch.full((len(rows), c.words(self.vocab_size)), -1, dtype=torch.int32)
                if self._follow(follower, state):
                    constrained.append((follower, index, state.request_id))
        if bitmask is not None:
            self._fill(constrained, bitmask)
        seen = [
            rows[i].state.initial_tokens + rows[i].state.generated_tokens if e.penalised else None
            for i, e in enumerate(entries)
        ]
        wanted = [(rows[i].state.request_id, e.wants) if e.wants is not None else None for i, e in enumerate(entries)]
        samplings = [entry.sampling for entry in entries]
        if self.eager:
            self._added = None
            if any(entry.adjusted for entry in entries):
                self._added = r.adjust_rows(
                    samplings,
                    steps,
                    lambda row: _generated(rows[row].state),
                    self.vocab_size,
                    arg_storage.device,
                    fault=lambda row, exc: self._fault(rows[row].state, exc),
                )
            # A step where every row is plain greedy (no sampling, no EOS held off, no penalty,
            # nothing added, no logprobs, no constraint) keeps the model's scores as they are.
            self._plain = not (any(row[a.FLAGS] for row in arguments) or any(seen) or any(wanted)) and bitmask is None
            self._plain &= self._added is None
            if self._plain:
                return arg_storage
            self._allowed = None if bitmask is None else c.allowed(bitmask.to(arg_storage.device), self.vocab_size)
        if rows:  # one copy of every row's arguments
            table = torch.tensor(arguments, dtype=torch.int32).T
            arg_storage[:, : len(rows)].copy_(table.to(arg_storage.device))
        if self.eager:
            self._seen = seen
            self._sort, self._filters = r.filtering(samplings)
            self._sampled = [i for i, row in enumerate(arguments) if row[a.FLAGS] & r.SAMPLED]
        else:
            self.collect()  # a step whose outputs went nowhere (none should): its records first
            self._mark_seen(rows, seen)
            # Constrained rows get their bitmask; rows constrained before and not now, all ones again.
            masked = (
                set() if bitmask is None else {i for i, f in enumerate(rows) if f.state.request_id in self.followers}
            )
            for index in self._masked - masked:
                self._bitmask[index].fill_(-1)
            for index in masked:
                assert bitmask is not None
                self._bitmask[index].copy_(bitmask[index])
            self._masked = masked
            # Rows that add to their logits get this step's values; rows that did and do not, zeros again.
            adjusted = {i for i, entry in enumerate(entries) if entry.adjusted}
            for index in self._adjusted | adjusted:
                self._adjust_rows[index].zero_()
            for index in adjusted:
                self._adjust(rows[index].state, samplings[index], steps[index], self._adjust_rows[index])
            self._adjusted = adjusted
        self._wanted = wanted
        return arg_storage

    def _mark_seen(self, rows: list[Any], seen: list[list[int] | None]) -> None:
        """Graph mode: the penalised rows' tokens in the static seen mask. Only penalised rows need
        their mask right (the others' penalty of 1 changes nothing). A row that holds the request it
        held last step gets only the tokens that came since; any other is cleared and filled; all
        of them in one write."""
        owners: dict[int, tuple[str, int]] = {}
        cleared: list[int] = []
        at_rows: list[int] = []
        at_tokens: list[int] = []
        for index, tokens in enumerate(seen):
            if tokens is None:
                continue
            rid = rows[index].state.request_id
            owner, marked = self._seen_owners.get(index, ("", 0))
            if owner != rid or marked > len(tokens):
                cleared.append(index)
                marked = 0
            at_rows += [index] * (len(tokens) - marked)
            at_tokens += tokens[marked:]
            owners[index] = (rid, len(tokens))
        self._seen_owners = owners
        device = self._seen_rows.device
        if cleared:
            self._seen_rows[torch.tensor(cleared, device=device)] = False
        if at_rows:
            self._seen_rows[torch.tensor(at_rows, device=device), torch.tensor(at_tokens, device=device)] = True

    def _admit(self, state: Any, sampling: s.Sampling) -> Admitted:
        """A request's `Admitted`; if its parameters do not fit the argument tensor, a greedy
        stand-in, and the request fails alone."""
        prompt_len = state.logit_processor_kwargs.get("prompt_len", len(state.initial_tokens))
        try:
            return a.admitted(sampling, prompt_len, self.vocab_size)
        except Exception as exc:  # this runs on the batching thread: never let it die
            # One request's fault stays its own: its row decodes greedily
            # this step and the engine fails that request alone.
            self.faults[state.request_id] = f"{type(exc).__name__}: {exc}"
            return self._greedy

    def _adjust(self, state: Any, sampling: s.Sampling, step: int, row: torch.Tensor) -> None:
        """Write one request's additions to its logits into `row` (zeros); a fault fails the request alone."""
        try:
            r.adjustments(sampling, step, _generated(state), row)
        except Exception as exc:  # this runs on the batching thread: never let it die
            self._fault(state, exc)
            row.zero_()

    def _fault(self, state: Any, exc: Exception) -> None:
        """A request whose sampling failed: the engine fails it alone (the batching thread carries on)."""
        self.faults[state.request_id] = f"{type(exc).__name__}: {exc}"

    def _follow(self, follower: Follower, state: Any) -> bool:
        """Feed a constrained request's matcher the tokens generated so far; False (the request
        failed alone) if it left its constraint."""
        try:
            follower.follow(_generated(state))
            if (error := follower.error) is not None:
                raise ValueError(f"the output left its constraint: {error}")
        except Exception as exc:  # this runs on the batching thread: never let it die
            self.faults[state.request_id] = f"{type(exc).__name__}: {exc}"
            return False
        return True

    def _fill(self, constrained: list[tuple[Follower, int, str]], bitmask: torch.Tensor) -> None:
        """The constrained rows of `bitmask`: the tokens each request's constraint allows next, all
        rows at once; if that fails, row by row, a failing row failing its request alone."""
        try:
            self.masks.fill([(follower, row) for follower, row, _ in constrained], bitmask)
        except Exception:  # this runs on the batching thread: never let it die
            for follower, row, rid in constrained:
                try:
                    follower.fill(bitmask, row)
                except Exception as exc:
                    self.faults[rid] = f"{type(exc).__name__}: {exc}"

    def collect(self) -> None:
        """Graph mode, after a step: copy the chosen logprobs (and alternatives) of the rows that asked
        into their records. On the batching thread, before the manager hands out the step's tokens."""
        wanted, self._wanted = self._wanted, []
        if self.eager or not any(w is not None for w in wanted):
            return
        n = len(wanted)
        chosen = self._chosen[:n].tolist()
        picked = self._chosen_logprob[:n].tolist()
        ranks = self._chosen_rank[:n].tolist()
        top_n = max(w[1] for w in wanted if w is not None)
        top_values = self._top_logprobs[:n, :top_n].tolist() if top_n else [[] for _ in range(n)]
        top_ids = self._top_ids[:n, :top_n].tolist() if top_n else [[] for _ in range(n)]
        for row, want in enumerate(wanted):
            if want is None or (log := self.logprobs.get(want[0])) is None:
                continue
            top = tuple(zip(top_ids[row][: want[1]], top_values[row][: want[1]], strict=True))
            log.append(s.TokenLogprob(int(chosen[row]), float(picked[row]), top, rank=int(ranks[row])))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, logits_processor_args: torch.Tensor) -> Any:
        if self.eager and self._plain:
            return scores  # the manager's argmax is the greedy choice
        n = scores.shape[0]
        args = logits_processor_args[:, :n]
        rows = r.Rows(
            temperature=args[a.TEMPERATURE].view(torch.float32),
            top_k=args[a.TOP_K],
            top_p=args[a.TOP_P].view(torch.float32),
            min_p=args[a.MIN_P].view(torch.float32),
            typical_p=args[a.TYPICAL_P].view(torch.float32),
            penalty=args[a.PENALTY].view(torch.float32),
            key=args[a.KEY],
            flags=args[a.FLAGS],
        )
        if not self.eager:  # one static computation for a captured graph
            rows.seen = self._seen_rows[:n]
            rows.adjust = self._adjust_rows[:n]
            scores = scores.masked_fill(~c.allowed(self._bitmask[:n], self.vocab_size), -math.inf)
            logprobs = r.warp(scores, rows, self.eos_mask)
            final = r.noisy(logprobs, rows)
            chosen = torch.argmax(final, dim=-1)  # the manager's own choice: the same argmax of the same scores
            self._chosen[:n].copy_(chosen)
            picked = logprobs.gather(1, chosen[:, None])
            self._chosen_logprob[:n].copy_(picked[:, 0])
            self._chosen_rank[:n].copy_((logprobs > picked).sum(dim=-1) + 1)
            values, ids = torch.topk(logprobs, s.MAX_TOP_LOGPROBS, dim=-1)
            self._top_logprobs[:n].copy_(values)
            self._top_ids[:n].copy_(ids)
            return final
        # The manager may pad the step's rows (with default arguments) beyond its requests:
        # per-request masks get rows that change nothing there.
        if self._allowed is not None:
            scores = scores.masked_fill(~_padded(self._allowed, n, fill=True), -math.inf)
        if any(x is not None for x in self._seen):
            rows.seen = _padded(r.seen_mask(self._seen, scores.shape[-1], scores.device), n, fill=False)
        if (added := self._added) is not None:
            rows.adjust = torch.cat([added, added.new_zeros((n - len(added), self.vocab_size))])
        logprobs = r.warp(scores, rows, self.eos_mask, sort=self._sort, filters=self._filters)
        final = r.noisy(logprobs, rows, self._sampled) if self._sampled else logprobs
        if any(w is not None for w in self._wanted):
            chosen = torch.argmax(final, dim=-1)
            entries = r.logprob_entries(logprobs, chosen, [w[1] if w else None for w in self._wanted])
            for want, entry in zip(self._wanted, entries, strict=True):
                # Only requests still registered: one that left is not recreated.
                if want is not None and entry is not None and (log := self.logprobs.get(want[0])) is not None:
                    log.append(entry)
        return final


class Recorder(OutputRouter):
    """The manager's output router, which first has the processors record the step's logprobs (graph mode)."""

    def __init__(self, processors: SamplingProcessors) -> None:
        super().__init__()
        self.processors = processors

    def deliver(self, output: Any) -> None:
        self.processors.collect()
        super().deliver(output)

    def deliver_batch(self, outputs: list[Any]) -> None:
        self.processors.collect()
        super().deliver_batch(outputs)
