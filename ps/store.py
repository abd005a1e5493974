"""ParameterStore: the global model as flat regions, its version, and optimizer state.

Published regions are never written while anyone reads them: an update publishes
new tensors and bumps the version, so a pull can stream a consistent snapshot
without holding a lock while bytes go out. Readers say when they are done
(``reading``), so the memory of a version nobody reads any more can be recycled
for a later update (``reclaim``) instead of allocating the model's size again
every version. No gRPC here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Iterator

import torch

from paramhub.common.layout import Layout


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """An immutable view of the global model at one version."""

    version: int
    regions: list[torch.Tensor]
    done: bool


class ParameterStore:
    """Holds the global state; every method is thread-safe.

    Args:
        layout: the flat layout of ``regions``.
        regions: initial flat buffers (taken over, not copied).
        version: the starting version (non-zero when resuming).
        rule_state: optimizer tensors (taken over).
        done: the run is complete already (a resumed run that reached its last version).
    """

    def __init__(self, layout: Layout, regions: list[torch.Tensor], version: int = 0,
                 rule_state: dict[int, dict[str, torch.Tensor]] | None = None, done: bool = False):
        layout.check_regions(regions)
        self.layout = layout
        self._regions = regions
        self._version = version
        self._done = done
        self._interrupted = False  # shutting down: waits return at once
        self.failure: str | None = None  # why the run failed (``fail``); None while it has not
        # Optimizer tensors per PARAM region index: {region: {"momentum_buffer": tensor}}.
        self.rule_state: dict[int, dict[str, torch.Tensor]] = {r: dict(s) for r, s in (rule_state or {}).items()}
        self._changed = threading.Condition()
        self._readers: dict[int, int] = {}  # version -> readers inside ``reading``
        self._retired: dict[int, list[torch.Tensor]] = {}  # old versions' regions still being read
        self._spare: list[torch.Tensor | None] | None = None  # an old version's regions nobody reads

    @property
    def version(self) -> int:
        with self._changed:
            return self._version

    @property
    def done(self) -> bool:
        with self._changed:
            return self._done

    def snapshot(self) -> Snapshot:
        """The current version and its regions.

        The regions stay untouched while the caller holds ``lock``; to read them
        outside it (stream, save, evaluate), use ``reading``: once the version is
        superseded, its memory may be reused.
        """
        with self._changed:
            return Snapshot(self._version, self._regions, self._done)

    @contextlib.contextmanager
    def reading(self, min_version: int = 0, timeout: float = 0.0) -> Iterator[Snapshot]:
        """A snapshot whose regions stay untouched until the block ends.

        Waits like ``wait_for_version`` (up to ``timeout`` for ``min_version``);
        the snapshot may be older when the wait ends first.
        """
        with self._changed:
            snap = self.wait_for_version(min_version, timeout)
            self._readers[snap.version] = self._readers.get(snap.version, 0) + 1
        try:
            yield snap
        finally:
            with self._changed:
                self._readers[snap.version] -= 1
                if not self._readers[snap.version]:
                    del self._readers[snap.version]
                    if snap.version in self._retired:
                        self._spare = self._retired.pop(snap.version)

    def publish(self, regions: list[torch.Tensor]) -> int:
        """Installs new regions as the next version and wakes waiters; returns the new version."""
        self.layout.check_regions(regions)
        with self._changed:
            kept = {t.data_ptr() for t in regions}  # a tensor carried into the new version is not spare
            old = [None if t.data_ptr() in kept else t for t in self._regions]
            if self._readers.get(self._version):
                self._retired[self._version] = old
            else:
                self._spare = old
            self._regions = regions
            self._version += 1
            self._changed.notify_all()
            return self._version

    def replace_state(self, regions: list[torch.Tensor], version: int,
                      rule_state: dict[int, dict[str, torch.Tensor]], done: bool) -> None:
        """Takes over another server's state wholesale (a standby's snapshot of its primary); no reader may hold any."""
        self.layout.check_regions(regions)
        with self._changed:
            if self._readers:
                raise RuntimeError("cannot replace the state while it is being read")
            self._regions, self._version, self._done = regions, version, done
            self.rule_state = {r: dict(s) for r, s in rule_state.items()}
            self._retired.clear()
            self._spare = None
            self._changed.notify_all()

    def reclaim(self) -> list[torch.Tensor | None] | None:
        """The regions of an older version that nothing reads any more, for reuse (each set once).

        None when there is none (a reader still holds every old version). A region
        the current version still uses is None in the list.
        """
        with self._changed:
            spare, self._spare = self._spare, None
            return spare

    def finish(self) -> None:
        """Marks the run done and wakes every waiter."""
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def fail(self, reason: str) -> None:
        """Ends the run as failed (``failure`` says why): done, and no checkpoint of its state is written."""
        with self._changed:
            self.failure = reason
            self._done = True
            self._changed.notify_all()

    def interrupt_waits(self) -> None:
        """Makes every current and future wait return at once (the server is shutting down)."""
        with self._changed:
            self._interrupted = True
            self._changed.notify_all()

    def wait_for_version(self, min_version: int, timeout: float) -> Snapshot:
        """Waits up to ``timeout`` seconds until version >= min_version or the run is done."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while self._version < min_version and not self._done and not self._interrupted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return Snapshot(self._version, self._regions, self._done)

    def wait_changed(self, after_version: int, timeout: float) -> Snapshot:
        """Waits up to ``timeout`` for a version newer than ``after_version`` or for done."""
        return self.wait_for_version(after_version + 1, timeout)

    def rule_state_copy(self) -> dict[int, dict[str, torch.Tensor]]:
        """A copy of the optimizer state (take it under ``lock`` with a snapshot, for a checkpoint)."""
        with self._changed:
            return {r: {k: v.clone() for k, v in tensors.items()} for r, tensors in self.rule_state.items()}

    @property
    def lock(self) -> threading.Condition:
        """The store's lock, for callers that update rule_state and publish together."""
        return self._changed
