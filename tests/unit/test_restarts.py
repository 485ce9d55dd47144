"""The restart bound of --on-engine-failure restart: so many in a window, with a doubling backoff."""

from __future__ import annotations

from entity_llm_server.restarts import FIRST_BACKOFF, MAX_BACKOFF, Restarts


def test_restarts_are_bounded_within_the_window_and_back_off():
    restarts = Restarts(limit=3, window=600)
    backoffs = []
    for now in (0.0, 10.0, 20.0):
        assert restarts.allow(now)
        backoffs.append(restarts.backoff)
    assert backoffs == [FIRST_BACKOFF, 2 * FIRST_BACKOFF, 4 * FIRST_BACKOFF]
    assert not restarts.allow(30.0)  # a fourth within ten minutes: a crash loop
    assert restarts.allow(600.0)  # the first has left the window
    assert not restarts.allow(601.0)


def test_the_backoff_has_a_ceiling():
    restarts = Restarts(limit=100, window=10_000)
    for now in range(100):
        assert restarts.allow(float(now))
    assert restarts.backoff == MAX_BACKOFF
