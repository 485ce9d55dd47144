"""The messages between the front end and its engine process: each survives the pipe as itself."""

from __future__ import annotations

import pickle
import typing

import pytest

from entity_llm_server.engine import CoreState, Sampling, TokenLogprob, ipc
from entity_llm_server.engine.core import ModelFacts, SeqOutput
from entity_llm_server.engine.launcher import EngineSpec
from entity_llm_server.engine.settings import BatchingSettings

FACTS = ModelFacts("demo", 512, 1024, (0,), "cpu")
LOGPROB = TokenLogprob(7, -0.25, ((7, -0.25), (9, -1.5)), ("a", "b"))
EXAMPLES: list[object] = [
    ipc.Add("req-1", (1, 2, 3), 16, Sampling(temperature=0.7, seed=42, logprobs=True, top_logprobs=2)),
    ipc.Cancel("req-1"),
    ipc.StateQuery(3),
    ipc.Ping(4),
    ipc.Stop(),
    ipc.Ready(FACTS),
    ipc.Failed("cannot load model 'x' on cpu: gone"),
    ipc.Steps((SeqOutput("req-1", (5, 6), (LOGPROB, LOGPROB)), SeqOutput("req-2", (), None, True, "boom")), 1),
    ipc.StateReply(3, CoreState(2, 40)),
    ipc.Pong(4),
    ipc.Dead("the batching thread stopped"),
    EngineSpec("demo", "cpu", "auto", 128, BatchingSettings(max_batch_size=4)),
]


def test_every_message_kind_has_an_example():
    kinds = set(typing.get_args(ipc.Message)) | {EngineSpec}
    assert {type(example) for example in EXAMPLES} == kinds


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_a_message_round_trips_through_pickle_unchanged(message):
    again = pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(again) is type(message)
    assert again == message
    # Frozen and slotted: a message is a value, never changed after it is sent.
    assert type(message).__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert hasattr(type(message), "__slots__")


def test_messages_dispatch_with_match():
    def kind(message: object) -> str:
        match message:
            case ipc.Steps(outputs, active):
                return f"steps {len(outputs)} {active}"
            case ipc.StateReply(token, CoreState(held, steps)):
                return f"state {token} {held} {steps}"
            case ipc.Add(rid, ids, _, _):
                return f"add {rid} {len(ids)}"
            case _:
                return type(message).__name__

    assert [kind(pickle.loads(pickle.dumps(m))) for m in EXAMPLES[:3] + EXAMPLES[7:9]] == [
        "add req-1 3",
        "Cancel",
        "StateQuery",
        "steps 2 1",
        "state 3 2 40",
    ]
