"""Data leases, the pure parts: interval sets, epoch orders, and the lease table against a reference model.

The reference (``ReferenceTable``) keeps one state per position in a dict and is
written from the rules in ps/leases.py's docstring, not from its code; random
sequences of grants, claims, commits, unclaims and revocations must leave both
with the same positions in every state, and never count a position done twice.
Negative controls: tables that break one rule each must be caught by the same check.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers_unit import property_settings
from paramhub.common.leases import Span, Spans, epoch_order, samples_of
from paramhub.ps.errors import FailedPrecondition, InvalidArgument
from paramhub.ps.leases import LeaseTable, NotLeased

# -- Spans against a Python set -----------------------------------------------------------

ops = st.lists(st.tuples(st.sampled_from(["add", "remove", "take"]), st.integers(0, 60), st.integers(1, 12)),
               max_size=60)


@property_settings(200)
@given(ops)
def test_spans_hold_exactly_the_positions_a_set_holds(sequence):
    spans, reference = Spans(), set()
    for op, start, length in sequence:
        end = start + length
        if op == "add":
            if reference & set(range(start, end)):
                with pytest.raises(ValueError):
                    spans.add(start, end)
            else:
                spans.add(start, end)
                reference |= set(range(start, end))
        elif op == "remove":
            if set(range(start, end)) <= reference:
                spans.remove(start, end)
                reference -= set(range(start, end))
            else:
                with pytest.raises(ValueError):
                    spans.remove(start, end)
        else:
            taken = spans.take(length)
            expected = sorted(reference)[:length]
            assert [p for s, e in taken for p in range(s, e)] == expected
            reference -= set(expected)
        intervals = spans.intervals()
        assert {p for s, e in intervals for p in range(s, e)} == reference and len(spans) == len(reference)
        # disjoint, sorted, never adjacent (adjacent ones are merged)
        assert all(e1 < s2 for (_, e1), (s2, _) in zip(intervals, intervals[1:]))
        for probe in range(0, 75, 7):
            window = set(range(probe, probe + 5))
            assert spans.covers(probe, probe + 5) == (window <= reference)
            assert spans.overlaps(probe, probe + 5) == bool(window & reference)


def test_the_epoch_order():
    order = epoch_order(100, seed=7, epoch=3)
    assert sorted(order.tolist()) == list(range(100))  # a permutation
    # the exact call the wire contract names, so any client can compute it
    assert order.tolist() == np.random.default_rng([7, 3]).permutation(100).tolist()
    assert order.tolist() != epoch_order(100, seed=7, epoch=4).tolist()  # reshuffled each epoch
    assert samples_of([Span(3, 5, 7)], 100, 7) == [(3, int(order[5])), (3, int(order[6]))]
    with pytest.raises(ValueError):
        epoch_order(0, 0, 0)


# -- the lease table against a reference --------------------------------------------------

PENDING, DONE = "pending", "done"


class ReferenceTable:
    """One state per position: pending, ("leased", worker), ("push", key) or done; epochs open in order."""

    def __init__(self, n: int, lease_size: int, epochs: int | None):
        self.n, self.lease_size, self.epochs = n, lease_size, epochs
        self.state: dict[tuple[int, int], object] = {}
        self.owner: dict[tuple, int] = {}
        self.completed = 0
        self.done_count: dict[tuple[int, int], int] = {}
        self.holders: set[int] = set()
        self.state.update({(0, p): PENDING for p in range(n)})  # the first epoch opens with the dataset
        self.next_epoch = 1  # epochs may complete out of order; each number opens once

    def open_epochs(self):
        return sorted({e for e, _ in self.state})

    def grant(self, worker: int, wanted: int) -> list[tuple[int, int]]:
        self.holders.add(worker)
        mine = lambda: [k for k, v in self.state.items() if v == ("leased", worker)]  # noqa: E731
        while len(mine()) < wanted:
            pending = sorted(k for k, v in self.state.items() if v == PENDING)
            if not pending:
                following = self.next_epoch
                if len(self.open_epochs()) >= 2 or (self.epochs is not None and following >= self.epochs):
                    break
                self.state.update({(following, p): PENDING for p in range(self.n)})
                self.next_epoch += 1
                continue
            epoch = pending[0][0]
            for key in [k for k in pending if k[0] == epoch][:self.lease_size]:
                self.state[key] = ("leased", worker)
        return sorted(mine())

    def claim(self, worker: int, key: tuple, positions: list[tuple[int, int]]) -> bool:
        if any(self.state.get(p) != ("leased", worker) for p in positions) or len(set(positions)) < len(positions):
            return False
        for p in positions:
            self.state[p] = ("push", key)
        self.owner[key] = worker
        return True

    def commit(self, key: tuple) -> None:
        for p, v in list(self.state.items()):
            if v == ("push", key):
                self.state[p] = DONE
                self.done_count[p] = self.done_count.get(p, 0) + 1
        for epoch in self.open_epochs():
            if all(self.state[(epoch, p)] == DONE for p in range(self.n)):
                for p in range(self.n):
                    del self.state[(epoch, p)]
                self.completed += 1

    def unclaim(self, key: tuple) -> None:
        worker = self.owner.pop(key, None)
        for p, v in list(self.state.items()):
            if v == ("push", key):
                self.state[p] = ("leased", worker) if worker in self.holders else PENDING

    def revoke(self, worker: int) -> None:
        self.holders.discard(worker)
        for p, v in list(self.state.items()):
            if v == ("leased", worker):
                self.state[p] = PENDING


def positions(spans) -> list[tuple[int, int]]:
    return sorted((s.epoch, p) for s in spans for p in range(s.start, s.end))


def table_states(table: LeaseTable) -> dict:
    """The real table's positions by state, read through its public views."""
    states = {}
    for e in table.summary():
        states[e.epoch] = (e.done, e.in_pushes, e.leased, e.pending)
    return states


def reference_states(ref: ReferenceTable) -> dict:
    states = {}
    for epoch in ref.open_epochs():
        values = [ref.state[(epoch, p)] for p in range(ref.n)]
        states[epoch] = (sum(v == DONE for v in values), sum(isinstance(v, tuple) and v[0] == "push" for v in values),
                         sum(isinstance(v, tuple) and v[0] == "leased" for v in values),
                         sum(v == PENDING for v in values))
    return states


def run_against_reference(table: LeaseTable, seed: int, steps: int = 300) -> None:
    """Random moves on both; raises AssertionError at the first difference."""
    rng = random.Random(seed)
    n = table.num_samples
    ref = ReferenceTable(n, table.lease_size, table.epochs)
    in_flight: dict[tuple, int] = {}
    sequence = 0
    for _ in range(steps):
        worker = rng.randrange(4)
        move = rng.random()
        if move < 0.35:
            wanted = rng.randrange(1, 12)
            got = table.grant(worker, wanted)
            assert positions(got) == ref.grant(worker, wanted), "grant"
        elif move < 0.6:
            mine = positions(table.leases_of(worker))
            if not mine:
                continue
            take = mine[:rng.randrange(1, len(mine) + 1)] if rng.random() < 0.9 else [(mine[0][0], n + 5)]
            spans = [Span(e, p, p + 1) for e, p in take]
            sequence += 1
            key = (worker, 1, sequence)
            try:
                table.claim(worker, key, spans, len(spans))
                accepted = True
            except NotLeased:
                accepted = False
            assert accepted == ref.claim(worker, key, take), "claim"
            if accepted:
                in_flight[key] = worker
        elif move < 0.8 and in_flight:
            key = rng.choice(sorted(in_flight))
            del in_flight[key]
            table.commit(key)
            ref.commit(key)
        elif move < 0.9 and in_flight:
            key = rng.choice(sorted(in_flight))
            del in_flight[key]
            table.unclaim(key)
            ref.unclaim(key)
        else:
            table.revoke(worker)
            ref.revoke(worker)
        assert table_states(table) == reference_states(ref), "states"
        assert table.completed == ref.completed, "completed epochs"
        assert max(ref.done_count.values(), default=0) <= 1, "a position done twice"


@pytest.mark.parametrize("seed", range(6))
def test_the_lease_table_moves_positions_as_the_reference_does(seed):
    table = LeaseTable(lease_size=3, seed=0, epochs=3 if seed % 2 else None)
    table.check_dataset(17, "fp")
    run_against_reference(table, seed)


class CommitsAtClaim(LeaseTable):
    """Wrong: counts a push's positions done when it arrives, before its update is applied."""

    def claim(self, worker_id, key, spans, num_samples):
        super().claim(worker_id, key, spans, num_samples)
        super().commit(key)

    def commit(self, key):
        pass


class UnclaimToPool(LeaseTable):
    """Wrong: a dropped push's positions go to the pool, though its worker still holds its leases."""

    def unclaim(self, key):
        worker_id = self._held.get(key, (None,))[0]
        leased = self._leased.pop(worker_id, None)
        super().unclaim(key)
        if leased is not None:
            self._leased[worker_id] = leased


class RevokeForgets(LeaseTable):
    """Wrong: a departed worker's leases vanish instead of going back to the pool (samples skipped)."""

    def revoke(self, worker_id):
        self._leased.pop(worker_id, None)
        return 0


@pytest.mark.parametrize("broken", [CommitsAtClaim, UnclaimToPool, RevokeForgets])
def test_the_reference_catches_a_table_that_breaks_a_rule(broken):
    caught = 0
    for seed in range(6):
        table = broken(lease_size=3, seed=0)
        table.check_dataset(17, "fp")
        try:
            run_against_reference(table, seed)
        except (AssertionError, KeyError, ValueError):
            caught += 1
    assert caught >= 4


def test_claims_are_all_or_nothing_and_bounded():
    table = LeaseTable(lease_size=4, seed=0)
    table.check_dataset(10, "fp")
    assert table.grant(1, 4) == [Span(0, 0, 4)]
    with pytest.raises(InvalidArgument):
        table.claim(1, (1, 1, 1), [], 0)
    with pytest.raises(InvalidArgument):
        table.claim(1, (1, 1, 1), [Span(0, 0, 2)], 3)  # lengths do not add up to num_samples
    with pytest.raises(InvalidArgument):
        table.claim(1, (1, 1, 1), [Span(0, 2, 2)], 0)
    with pytest.raises(NotLeased):  # the second range is not ours: the first stays leased too
        table.claim(1, (1, 1, 1), [Span(0, 0, 2), Span(0, 4, 6)], 4)
    with pytest.raises(NotLeased):  # the same positions twice in one push
        table.claim(1, (1, 1, 1), [Span(0, 0, 2), Span(0, 1, 3)], 4)
    assert table.leases_of(1) == [Span(0, 0, 4)]
    table.claim(1, (1, 1, 1), [Span(0, 0, 2)], 2)
    assert table.leases_of(1) == [Span(0, 2, 4)]


def test_the_dataset_is_fixed_by_the_first_worker():
    table = LeaseTable()
    with pytest.raises(InvalidArgument):
        table.check_dataset(0, "fp")
    with pytest.raises(InvalidArgument):
        table.check_dataset(10, "x" * 200)
    table.check_dataset(10, "fp")
    table.check_dataset(10, "fp")
    with pytest.raises(FailedPrecondition, match="same data"):
        table.check_dataset(11, "fp")
    with pytest.raises(FailedPrecondition):
        table.check_dataset(10, "other")


def test_an_export_resumes_the_epoch_with_only_the_done_positions_kept():
    table = LeaseTable(lease_size=4, seed=3, epochs=2)
    table.check_dataset(10, "fp")
    table.grant(1, 8)
    table.claim(1, (1, 1, 1), [Span(0, 0, 3)], 3)
    table.commit((1, 1, 1))
    table.claim(1, (1, 1, 2), [Span(0, 3, 5)], 2)  # in a push when the checkpoint is taken: not done
    resumed = LeaseTable(lease_size=4, seed=3, epochs=2, state=table.export())
    assert [(e.done, e.in_pushes, e.leased, e.pending) for e in resumed.summary()] == [(3, 0, 0, 7)]
    resumed.check_dataset(10, "fp")
    with pytest.raises(FailedPrecondition):
        resumed.check_dataset(12, "fp")
    with pytest.raises(ValueError, match="seed"):
        LeaseTable(seed=4, state=table.export())


def test_epochs_complete_in_order_and_the_run_finishes():
    table = LeaseTable(lease_size=5, seed=0, epochs=2)
    table.check_dataset(5, "fp")
    for sequence, epoch in enumerate([0, 1], start=1):
        (span,) = table.grant(1, 5)
        assert span == Span(epoch, 0, 5)
        table.claim(1, (1, 1, sequence), [span], 5)
        assert not table.finished
        table.commit((1, 1, sequence))
    assert table.finished and table.completed == 2 and table.grant(1, 5) == [] and 1 in table.idle
