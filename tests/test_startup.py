"""A CLI process's start-up runs without the cyclic collector and is frozen after it."""

from __future__ import annotations

import gc
import pickle

import pytest

from sottovoce.common.startup import call_started_up, start_up

CALLS: list[tuple[object, ...]] = []


def _record(*args: object) -> None:
    CALLS.append((gc.isenabled(), *args))


def test_the_collector_is_off_inside_then_on_and_the_start_up_frozen() -> None:
    assert gc.isenabled()
    with start_up():
        assert not gc.isenabled()
        made = [[] for _ in range(1000)]  # long-lived objects, as an import makes
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(made)  # in the permanent generation, never walked


def test_a_failing_start_up_restores_the_collector() -> None:
    with pytest.raises(RuntimeError), start_up():
        raise RuntimeError("no such model")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with start_up():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_spawn_target_is_found_by_name_and_called_on_its_unpickled_arguments() -> None:
    call_started_up(f"{__name__}:_record", pickle.dumps((1, "two")))
    assert CALLS[-1] == (True, 1, "two")  # called after the start-up, the collector on


def test_serving_collects_the_young_generation_less_often_and_keeps_the_others() -> None:
    import gc

    from sottovoce.common.startup import SERVING_YOUNG_THRESHOLD, collect_less_while_serving

    before = gc.get_threshold()
    try:
        collect_less_while_serving()
        assert gc.get_threshold() == (SERVING_YOUNG_THRESHOLD, before[1], before[2])
        assert gc.isenabled()  # cycles are still collected
    finally:
        gc.set_threshold(*before)
