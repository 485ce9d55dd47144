"""Structured output at the engine: a constraint per request (JSON schema, JSON object, regex, choice,
grammar), enforced on every engine, mixed freely with unconstrained requests in one batch."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import jsonschema
import pydantic
import pytest

from entity_llm_client import FinishReason as Reason
from entity_llm_client import InvalidArgumentError, LLMClient
from entity_llm_server import EngineRequest, LLMService, UnifiedLLMResource
from entity_llm_server.engine import BatchingSettings, Finished, FinishReason, FrontEnd, InvalidRequestError, Sampling
from entity_llm_server.engine.constraints import MAX_CONSTRAINT_BYTES, Constraint

from ..engines import ENGINE_KINDS, load_engine

pytestmark = pytest.mark.model

# Nested objects, arrays, enums and bounded integers; bounded strings and arrays, so that
# every sampled output can finish within its length.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}},
            "required": ["id"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
SCHEMA_TEXT = json.dumps(SCHEMA)
CHOICES = ["yes", "no", "maybe later"]
REGEX = r"[a-z]{3}-[0-9]{2,4}"
GRAMMAR = 'start: "SELECT " col " FROM " table\ncol: "id" | "name" | "*"\ntable: "users" | "orders"\n'
SELECT = re.compile(r"SELECT (id|name|\*) FROM (users|orders)")
# A small arithmetic grammar: its sentences are expressions Python evaluates.
ARITHMETIC = (
    "start: num OP num | num OP num OP num\n"
    'num: INT | "(" INT OP INT ")"\n'
    "INT: /[1-9][0-9]{0,2}/\n"
    'OP: " + " | " - " | " * "\n'
)
EXPRESSION = re.compile(r"[0-9() +*-]+")


def engine_of(kind: str) -> FrontEnd:
    if kind == "graphs":  # the graph-mode code (transformers runs it uncaptured on a CPU)
        settings = BatchingSettings(max_batch_size=8, max_queue=64, cuda_graphs=True)
        engine = UnifiedLLMResource(batching=settings).load_engine()
        assert isinstance(engine, FrontEnd)
        return engine
    return load_engine(kind, max_batch_size=8, max_queue=64)


async def _text(engine: FrontEnd, request: EngineRequest) -> tuple[str, Finished]:
    events = [e async for e in engine.generate(request)]
    final = events[-1]
    assert isinstance(final, Finished)
    return "".join(getattr(e, "text", "") for e in events[:-1]), final


def run(engine: FrontEnd, requests: list[EngineRequest]) -> list[tuple[str, Finished]]:
    async def main() -> list[tuple[str, Finished]]:
        await engine.start()
        try:
            return list(await asyncio.gather(*(_text(engine, r) for r in requests)))
        finally:
            await engine.close()

    return asyncio.run(main())


def constrained(
    kind: str, text: str, seed: int | None, max_new_tokens: int = 120, prompt: str = "x = "
) -> EngineRequest:
    sampling = Sampling(temperature=1.0, seed=seed, constraint=Constraint(kind, text))
    if seed is None:
        sampling = Sampling(constraint=Constraint(kind, text))
    return EngineRequest("x = ", max_new_tokens=max_new_tokens, sampling=sampling)


@pytest.mark.parametrize("kind", [*ENGINE_KINDS, "graphs"])
def test_every_engine_keeps_every_kind_of_constraint(kind):
    seeds = range(20) if kind == "batching" else range(3)
    requests = [constrained("json_schema", SCHEMA_TEXT, seed) for seed in seeds]
    requests += [constrained("choice", json.dumps(CHOICES), seed) for seed in seeds]
    requests += [constrained("regex", REGEX, seed) for seed in seeds]
    requests += [constrained("grammar", GRAMMAR, seed) for seed in seeds[:3]]
    requests += [constrained("json_object", "", seed) for seed in seeds[:3]]
    requests += [constrained("grammar", ARITHMETIC, seed) for seed in seeds[:3]]
    results = run(engine_of(kind), requests)
    n = len(seeds)
    schemas, choices, regexes = results[:n], results[n : 2 * n], results[2 * n : 3 * n]
    grammars, objects, sums = results[3 * n : 3 * n + 3], results[3 * n + 3 : 3 * n + 6], results[3 * n + 6 :]
    for text, final in schemas:
        assert final.reason is FinishReason.EOS, (text, final.reason)
        jsonschema.validate(json.loads(text), SCHEMA)
    assert all(final.reason is FinishReason.EOS and text in CHOICES for text, final in choices), choices
    assert all(re.fullmatch(REGEX, text) for text, _ in regexes), regexes
    assert all(SELECT.fullmatch(text) for text, _ in grammars), grammars
    assert all(isinstance(json.loads(text), dict) for text, _ in objects), objects
    for text, _ in sums:  # digits, operators and parentheses only: safe to evaluate
        assert EXPRESSION.fullmatch(text), text
        assert isinstance(eval(text, {"__builtins__": {}}), int), text
    # Sampled: not all alike.
    assert len({text for text, _ in schemas}) > 1


def test_a_random_weight_model_keeps_a_schema_for_20_seeds(tiny_model):
    engine = UnifiedLLMResource(tiny_model("llama"), batching=BatchingSettings(max_batch_size=8)).load_engine()
    assert isinstance(engine, FrontEnd)
    for text, final in run(engine, [constrained("json_schema", SCHEMA_TEXT, seed, 200) for seed in range(20)]):
        assert final.reason is FinishReason.EOS, text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_constrained_and_free_requests_share_a_batch_and_the_free_ones_are_untouched():
    # 16 and 16: the free ones are token for token what they are alone, the constrained ones valid.
    engine = engine_of("batching")
    prompts = ("def f(x):", "import os\n", "class Parser:", "# Copyright")
    free = [EngineRequest(f"{prompts[i % 4]}{i}", max_new_tokens=12) for i in range(16)]
    alone = run(engine, free)
    mixed = run(engine, [constrained("json_schema", SCHEMA_TEXT, seed) for seed in range(16)] + free)
    assert [final.token_ids for _, final in mixed[16:]] == [final.token_ids for _, final in alone]
    for text, _ in mixed[:16]:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_seed_gives_the_same_constrained_output_alone_and_among_others():
    engine = engine_of("batching")
    (alone,) = run(engine, [constrained("json_schema", SCHEMA_TEXT, 42)])
    crowd = run(
        engine, [constrained("json_schema", SCHEMA_TEXT, 42)] + [constrained("regex", REGEX, s) for s in range(6)]
    )
    assert crowd[0][0] == alone[0]
    assert crowd[0][1].seed == 42


def test_a_length_that_cuts_the_output_short_says_max_tokens_and_leaves_a_prefix():
    engine = engine_of("batching")
    ((text, final),) = run(engine, [constrained("json_schema", SCHEMA_TEXT, 3, max_new_tokens=4)])
    assert final.reason is FinishReason.MAX_TOKENS
    assert final.generated_tokens == 4
    assert text.startswith('{"')


@pytest.mark.parametrize(
    ("constraint", "field", "says"),
    [
        (Constraint("regex", "a("), "regex", "unclosed group"),
        (Constraint("json_schema", "{not json"), "json_schema", "does not parse"),
        (Constraint("json_schema", "[1, 2]"), "json_schema", "JSON object"),
        (Constraint("choice", "[]"), "choice", "at least one"),
        (Constraint("choice", '"yes"'), "choice", "at least one"),
        (Constraint("choice", "[1, 2]"), "choice", "at least one"),
        (Constraint("grammar", "start: undefined_rule"), "grammar", "cannot be used"),
        (Constraint("regex", "a" * (MAX_CONSTRAINT_BYTES + 1)), "regex", "KiB"),
    ],
)
def test_a_constraint_that_cannot_be_used_is_invalid_naming_its_field(constraint, field, says):
    engine = engine_of("batching")
    with pytest.raises(InvalidRequestError) as refused:
        engine.prepare(EngineRequest("x", sampling=Sampling(constraint=constraint)))
    assert refused.value.field == field
    assert says in str(refused.value)


def test_min_new_tokens_cannot_hold_off_the_end_of_a_constrained_output():
    engine = engine_of("batching")
    sampling = Sampling(min_new_tokens=5, constraint=Constraint("regex", REGEX))
    with pytest.raises(InvalidRequestError) as refused:
        engine.prepare(EngineRequest("x", sampling=sampling))
    assert refused.value.field == "min_new_tokens"


# -- over gRPC, through the SDK ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    from ..conftest import ServerThread

    settings = BatchingSettings(max_batch_size=8, max_queue=64)
    thread = ServerThread(LLMService(UnifiedLLMResource(batching=settings))).start()
    yield thread
    thread.stop()


class Pet(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # else any other keys may follow, until the length runs out

    name: str = pydantic.Field(max_length=8)
    kind: Literal["cat", "dog", "bird"]
    age: int = pydantic.Field(ge=0, le=30)


def test_the_sdk_takes_each_constraint_and_the_server_keeps_it(server):
    with LLMClient(server.target, timeout=120) as client:
        assert client.model_info().constraint_kinds == ("json_schema", "json_object", "regex", "choice", "grammar")
        for seed in range(3):
            for schema in (SCHEMA, SCHEMA_TEXT):
                done = client.complete("x = ", json_schema=schema, temperature=1.0, seed=seed, max_new_tokens=120)
                jsonschema.validate(json.loads(done.text), SCHEMA)
            pet = client.complete("x = ", json_schema=Pet, temperature=1.0, seed=seed, max_new_tokens=120)
            Pet.model_validate_json(pet.text)
            assert client.complete("x = ", choice=CHOICES, temperature=1.0, seed=seed).text in CHOICES
            assert re.fullmatch(REGEX, client.complete("x = ", regex=REGEX, temperature=1.0, seed=seed).text)
            assert SELECT.fullmatch(client.complete("x = ", grammar=GRAMMAR, temperature=1.0, seed=seed).text)
        done = client.complete("x = ", json_object=True, max_new_tokens=120)
        assert isinstance(json.loads(done.text), dict)
        assert done.finish_reason is Reason.EOS


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"regex": "a("}, "regex"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"grammar": "start: nowhere"}, "grammar"),
        ({"choice": []}, "choice"),
        ({"regex": "a" * (MAX_CONSTRAINT_BYTES + 1)}, "regex"),
        ({"regex": REGEX, "min_new_tokens": 2}, "min_new_tokens"),
    ],
)
def test_a_constraint_the_server_cannot_use_is_invalid_argument_naming_the_field(server, options, field):
    with LLMClient(server.target, timeout=60) as client:
        with pytest.raises(InvalidArgumentError) as refused:
            client.complete("x = ", **options)
        assert [v.field for v in refused.value.field_violations] == [field]
        # The server serves on.
        assert client.complete("x = ", regex="[0-9]{2}").text.isdigit()


def test_the_sdk_refuses_two_constraints_or_a_false_json_object_before_any_call():
    client = LLMClient("127.0.0.1:1")  # nothing listens: the checks come first
    with pytest.raises(TypeError, match="at most one constraint"):
        client.complete("x", regex="a", choice=["a"])
    with pytest.raises(TypeError, match="json_object takes True"):
        client.complete("x", json_object=False)
    with pytest.raises(TypeError, match="sequence of strings"):
        client.complete("x", choice="abc")
    client.close()


def test_an_engine_without_constraints_refuses_them_naming_the_field(serve):
    from entity_llm_server.testing import FakeEngine

    fake = serve(LLMService(engine=FakeEngine())).start()
    with LLMClient(fake.target, timeout=30) as client:
        assert client.model_info().constraint_kinds == ()
        with pytest.raises(InvalidArgumentError) as refused:
            client.complete("x", regex="a+")
        assert [v.field for v in refused.value.field_violations] == ["regex"]


def test_the_masks_of_a_step_computed_together_are_each_rows_own(demo_engine):
    """Several constrained rows' masks come from llguidance's executor in one call (its thread pool,
    off the GIL): each row is what its own matcher computes alone, wherever it sits in the batch."""
    import torch

    from entity_llm_server.engine.constraints import Masks, words

    grammars = demo_engine.grammars
    kinds = [
        Constraint("regex", "[a-z]{2,5}"),
        Constraint("choice", json.dumps(["yes", "no"])),
        Constraint("json_object"),
    ]
    followers = [grammars.follower(kind) for kind in kinds]
    followers[0].follow([demo_engine.tokenize("ab").ids[-1]])  # one of them a step further
    width = words(demo_engine.vocab_size)
    together = torch.full((5, width), -1, dtype=torch.int32)
    Masks().fill([(f, row) for f, row in zip(followers, (4, 0, 2), strict=True)], together)
    for follower, row in zip(followers, (4, 0, 2), strict=True):
        alone = torch.full((1, width), -1, dtype=torch.int32)
        follower.fill(alone, 0)
        assert torch.equal(together[row], alone[0])
    assert not torch.equal(together[0], together[2])
    assert torch.equal(together[1], torch.full((width,), -1, dtype=torch.int32))  # rows without one untouched
