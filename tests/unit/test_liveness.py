"""A core's pulse: stuck means holding requests while the step count stands still, for the whole timeout."""

from __future__ import annotations

import time

from entity_llm_server.engine.base import EngineUnavailableError
from entity_llm_server.engine.core import Pulse


def test_an_idle_core_is_never_stuck_however_long_it_waits():
    pulse = Pulse(timeout=0.05)
    assert not pulse.stuck(False, 7)
    time.sleep(0.1)
    assert not pulse.stuck(False, 7)


def test_a_core_holding_requests_is_stuck_only_once_its_steps_stand_still_for_the_timeout():
    pulse = Pulse(timeout=0.2)
    assert not pulse.stuck(True, 3)  # first seen holding: the clock starts
    time.sleep(0.1)
    assert not pulse.stuck(True, 4)  # it stepped: the clock starts again
    time.sleep(0.1)
    assert not pulse.stuck(True, 4)  # 0.1 s without a step
    time.sleep(0.15)
    assert pulse.stuck(True, 4)
    assert not pulse.stuck(True, 5)  # a step ends it


def test_work_that_ends_and_comes_back_starts_a_new_clock():
    pulse = Pulse(timeout=0.1)
    assert not pulse.stuck(True, 2)
    time.sleep(0.15)
    assert not pulse.stuck(False, 2)  # done meanwhile
    assert not pulse.stuck(True, 2)  # new work, same count: not stuck yet
    refusal = pulse.refusal()
    assert isinstance(refusal, EngineUnavailableError)
    assert "no step for 0.1 s" in str(refusal)


class _Core:
    """A core as the engine process's receiving loop sees it: stuck at the second ping."""

    active = 0

    def __init__(self) -> None:
        self.looks = iter([False, True])
        self.stopped = False

    @property
    def stalled(self) -> bool:
        return next(self.looks)

    def stop(self) -> None:
        self.stopped = True


def test_the_engine_process_answers_pings_only_while_its_core_is_not_stuck():
    from multiprocessing import Pipe

    from entity_llm_server.engine.ipc import Ping, Pong, Stop
    from entity_llm_server.engine.worker import _Worker

    front, back = Pipe()
    for message in (Ping(1), Ping(2), Stop()):
        front.send(message)
    core = _Core()
    _Worker(back, core).run()  # type: ignore[arg-type]  # until Stop; then the core stops and the sender drains
    answers = []
    while front.poll(0.5):
        answers.append(front.recv())
    assert answers == [Pong(1)]
    assert core.stopped
