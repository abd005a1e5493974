"""ParameterStore: the global model as flat regions, its version, and optimizer state.

Published regions are never written in place: an update publishes new tensors and
bumps the version, so a pull can stream a consistent snapshot without holding a
lock while bytes go out. No gRPC here.
"""

from __future__ import annotations

import dataclasses
import threading
import time

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
    """

    def __init__(self, layout: Layout, regions: list[torch.Tensor], version: int = 0,
                 rule_state: dict[int, dict[str, torch.Tensor]] | None = None):
        layout.check_regions(regions)
        self.layout = layout
        self._regions = regions
        self._version = version
        self._done = False
        self._interrupted = False  # shutting down: waits return at once
        # Optimizer tensors per PARAM region index: {region: {"momentum_buffer": tensor}}.
        self.rule_state: dict[int, dict[str, torch.Tensor]] = {r: dict(s) for r, s in (rule_state or {}).items()}
        self._changed = threading.Condition()

    @property
    def version(self) -> int:
        with self._changed:
            return self._version

    @property
    def done(self) -> bool:
        with self._changed:
            return self._done

    def snapshot(self) -> Snapshot:
        """The current version's regions (never modified afterwards)."""
        with self._changed:
            return Snapshot(self._version, self._regions, self._done)

    def publish(self, regions: list[torch.Tensor]) -> int:
        """Installs new regions as the next version and wakes waiters; returns the new version."""
        self.layout.check_regions(regions)
        with self._changed:
            self._regions = regions
            self._version += 1
            self._changed.notify_all()
            return self._version

    def finish(self) -> None:
        """Marks the run done and wakes every waiter."""
        with self._changed:
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

    def checkpoint_state(self) -> tuple[Snapshot, dict[int, dict[str, torch.Tensor]]]:
        """A consistent (snapshot, copy of optimizer state) pair for a checkpoint."""
        with self._changed:
            state = {r: {k: v.clone() for k, v in tensors.items()} for r, tensors in self.rule_state.items()}
            return Snapshot(self._version, self._regions, self._done), state

    @property
    def lock(self) -> threading.Condition:
        """The store's lock, for callers that update rule_state and publish together."""
        return self._changed
