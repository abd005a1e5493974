"""One consistent cut of a server's state: what a checkpoint writes and a standby's snapshot carries."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch

from paramhub.common import checkpoint
from paramhub.common.config import ServerConfig
from paramhub.common.layout import Layout


@dataclasses.dataclass(frozen=True)
class Cut:
    """Weights, optimizer state, ledger and workers at one version, taken together under the store's lock."""

    version: int
    done: bool
    model_state: dict[str, torch.Tensor]  # the full state_dict (trainable and frozen), views of the version's regions
    server_state: dict[str, torch.Tensor]  # optimizer state (``rule.*``) and the ledger (``ledger.*``)
    metadata: dict  # JSON facts: model, layout hash, mode, update, workers, and the lease table under data leases


@contextlib.contextmanager
def state_cut(config: ServerConfig, layout: Layout, frozen: tuple[Layout, list] | None, engine, registry,
              under_lock: Callable[[int], None] = lambda version: None) -> Iterator[Cut]:
    """The cut of the current version; its weights stay untouched until the block ends.

    ``under_lock(version)`` runs inside the store's lock with the cut (a standby attaches
    there, so no published version falls between the cut and its stream).
    """
    store = engine.store
    with contextlib.ExitStack() as stack:
        with store.lock:  # one consistent cut: weights, optimizer, ledger, workers
            snap = stack.enter_context(store.reading())  # the weights stay untouched until the block ends
            server_state = checkpoint.rule_state_tensors([region.name for region in layout.regions],
                                                         store.rule_state_copy())
            server_state.update(engine.ledger.to_tensors())
            workers = registry.export()
            leases = engine.leases.export() if engine.leases is not None else None
            under_lock(snap.version)
        model_state = layout.views(snap.regions)
        if frozen is not None:
            model_state.update(frozen[0].views(frozen[1]))
        yield Cut(snap.version, snap.done, model_state, server_state,
                  {"model": config.model, "num_classes": config.num_classes, "layout_hash": layout.hash,
                   "mode": config.mode, "update": config.update, "workers": workers,
                   **({"leases": leases} if leases is not None else {})})
