"""The interleaved timing behind the fast path's measured choices."""

from __future__ import annotations

import logging
import time

import pytest

from dualvitok._utils.timing import interleaved_times, measure_choice


def _sleep(seconds: float):
    return lambda: time.sleep(seconds)


def test_interleaved_times_warm_up_then_alternate():
    order = []
    times = interleaved_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3)
    assert order == ["a", "b"] * 4  # one warm-up call of each, then the rounds in turn
    assert [len(v) for v in times.values()] == [3, 3]


def test_measure_choice_takes_the_faster_and_logs_both(caplog):
    with caplog.at_level(logging.INFO):
        slow = measure_choice("thing", ("new", _sleep(0.02)), ("old", _sleep(0.0)), rounds=2)
    assert not slow.chosen and slow.candidate_s >= 0.02 and slow.speedup < 1
    assert "thing:" in caplog.text and "ms new vs" in caplog.text and caplog.text.rstrip().endswith("old")
    fast = measure_choice("thing", ("new", _sleep(0.0)), ("old", _sleep(0.02)), rounds=2)
    assert fast.chosen and fast.speedup > 1


def test_min_speedup_is_a_margin_either_way():
    # the candidate is about 6x faster: kept at a required 1.5x, refused at 50x
    short, long = _sleep(0.005), _sleep(0.03)
    assert measure_choice("m", ("c", short), ("b", long), rounds=2, min_speedup=1.5).chosen
    assert not measure_choice("m", ("c", short), ("b", long), rounds=2, min_speedup=50).chosen
    # a tolerance below 1: a candidate about 6x slower is kept when up to 50x slower is allowed, not at 1.5x
    assert measure_choice("m", ("c", long), ("b", short), rounds=2, min_speedup=1 / 50).chosen
    assert not measure_choice("m", ("c", long), ("b", short), rounds=2, min_speedup=1 / 1.5).chosen


def test_measure_choice_needs_two_names():
    with pytest.raises(ValueError, match="two names"):
        measure_choice("m", ("same", _sleep(0)), ("same", _sleep(0)), rounds=1)
