"""The grace-window estimator of --quorum auto: median + k·MAD of recent rounds' arrival offsets."""

from __future__ import annotations

import random
import statistics

import pytest

from paramhub.ps.grace import GraceWindow

pytestmark = pytest.mark.timeout(30)


def reference(rounds: list[list[float]], k: float) -> float:
    """median + k·MAD of the pooled offsets, written out with statistics.median only."""
    pooled = [x for offsets in rounds for x in offsets]
    median = statistics.median(pooled)
    return median + k * statistics.median([abs(x - median) for x in pooled])


def random_rounds(seed: int, count: int, workers: int) -> list[list[float]]:
    rng = random.Random(seed)
    rounds = []
    for _ in range(count):
        arrivals = sorted(rng.uniform(0.0, 2.0) for _ in range(workers))
        rounds.append([a - arrivals[0] for a in arrivals])  # seconds after the round's first push
    return rounds


def test_before_any_round_there_is_no_window_so_a_round_waits_for_everyone():
    grace = GraceWindow()
    assert grace.window() is None
    grace.observe([])  # a round with nothing measured teaches nothing
    assert grace.window() is None and grace.rounds == 0


@pytest.mark.parametrize("k", [0.0, 1.0, 3.0, 4.5])
def test_the_window_is_median_plus_k_mad_of_the_pooled_offsets(k):
    rounds = random_rounds(seed=int(k * 10), count=7, workers=5)
    grace = GraceWindow(k=k, floor=1e-9, cap=1e9)
    for offsets in rounds:
        grace.observe(offsets)
    assert grace.window() == pytest.approx(reference(rounds, k), rel=1e-12)
    assert grace.rounds == 7


def test_only_the_last_rounds_count():
    rounds = random_rounds(seed=1, count=25, workers=4)
    rounds[:5] = [[0.0, 50.0, 60.0, 70.0]] * 5  # a slow start, long forgotten
    grace = GraceWindow(k=3.0, history=20, floor=1e-9, cap=1e9)
    for offsets in rounds:
        grace.observe(offsets)
    assert grace.rounds == 20
    assert grace.window() == pytest.approx(reference(rounds[5:], 3.0), rel=1e-12)
    assert grace.window() != pytest.approx(reference(rounds, 3.0), rel=1e-3)


def test_floor_and_cap_bound_the_window():
    simultaneous = GraceWindow(floor=0.05, cap=60.0)
    simultaneous.observe([0.0, 0.0, 0.0])  # median 0, MAD 0
    assert simultaneous.window() == 0.05
    slow = GraceWindow(floor=0.05, cap=60.0)
    slow.observe([0.0, 100.0, 200.0, 300.0])
    assert slow.window() == 60.0


def test_stragglers_do_not_stretch_the_window_where_mean_plus_std_would():
    """Negative control: on an outlier-heavy sample mean + k·std is far from median + k·MAD."""
    rng = random.Random(7)
    rounds = []
    for r in range(20):
        offsets = [0.0] + [rng.uniform(0.05, 0.3) for _ in range(6)]
        if r % 3 == 0:
            offsets.append(30.0)  # a straggler every third round
        rounds.append(offsets)
    grace = GraceWindow(k=3.0, floor=1e-9, cap=1e9)
    for offsets in rounds:
        grace.observe(offsets)
    pooled = [x for offsets in rounds for x in offsets]
    mean_std = statistics.mean(pooled) + 3.0 * statistics.stdev(pooled)
    assert grace.window() == pytest.approx(reference(rounds, 3.0), rel=1e-12)
    assert grace.window() < 1.0 < 10.0 < mean_std  # the robust window covers the usual arrivals only
    assert max(x for x in pooled if x < 30.0) <= grace.window()


@pytest.mark.parametrize("bad", [[-0.1], [float("nan")], [float("inf")]])
def test_impossible_offsets_are_refused(bad):
    with pytest.raises(ValueError):
        GraceWindow().observe([0.0, *bad])


@pytest.mark.parametrize("kwargs", [dict(k=-1.0), dict(history=0), dict(floor=0.0), dict(floor=2.0, cap=1.0)])
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        GraceWindow(**kwargs)
