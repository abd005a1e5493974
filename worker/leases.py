"""The worker's side of data leases: what to ask the server for, and batches from what it leased.

With ``ps-server --data-leases`` a worker trains on the whole dataset, but only
on the positions the server leased to it (``PullHeader.leases``): each push takes
the next ``batch_size x steps`` positions from the front of its leases, turns
them into samples through the epoch's order (``common.leases.epoch_order``) and
names them in the push (``PushHeader.trained``), so the server can count each
sample trained exactly once.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, default_collate

from paramhub.common.leases import Span, samples_of, spans_from_wire
from paramhub.common.pb import paramhub_pb2 as pb


class LeasedBatches:
    """Turns the server's leases into the next push's positions and their batches.

    Args:
        dataset: the whole training set (``common.data.leased_dataset``).
        fingerprint: its fingerprint, sent with every pull.
        seed: the run's lease seed (``RunSpec.lease_seed``).
        batch_size: samples per step.
        steps: steps per push (local steps in averaging mode, else 1).
    """

    def __init__(self, dataset: Dataset, fingerprint: str, seed: int, batch_size: int, steps: int = 1):
        self.dataset = dataset
        self.fingerprint = fingerprint
        self.seed = seed
        self.batch_size = batch_size
        self.per_push = batch_size * steps

    def request(self) -> dict:
        """The PullRequest fields that ask for leases."""
        return {"dataset_samples": len(self.dataset), "dataset_fingerprint": self.fingerprint,
                "lease_samples_wanted": self.per_push}

    def plan(self, leases: Sequence[pb.DataRange]) -> list[Span]:
        """The positions the next push trains on: up to ``per_push`` from the front of ``leases`` (empty: none)."""
        planned, missing = [], self.per_push
        for lease in leases:
            if missing <= 0:
                break
            end = min(lease.end, lease.start + missing)
            if end > lease.start:
                planned.append(Span(lease.epoch, lease.start, end))
                missing -= end - lease.start
        return planned

    def samples(self, spans: Sequence[Span]) -> list[tuple[int, int]]:
        """(epoch, dataset index) of every position of ``spans``, in order."""
        return samples_of(spans, len(self.dataset), self.seed)

    def batches(self, spans: Sequence[Span]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``spans``' samples, ``batch_size`` at a time (the last one may be smaller)."""
        indices = [index for _, index in self.samples(spans)]
        for start in range(0, len(indices), self.batch_size):
            yield default_collate([self.dataset[i] for i in indices[start:start + self.batch_size]])


class SampleLog:
    """Appends one JSON line per push to a file: which push, and the samples it trained on.

    For checking exactly-once training from outside the server (the churn tests read
    it beside the server's ledger, which says which pushes were applied). A line is
    written and flushed before its push is sent, so a worker killed with SIGKILL
    leaves a line for every push the server may have applied.
    """

    def __init__(self, path: str | os.PathLike, batches: LeasedBatches):
        self._file = open(path, "a", buffering=1, encoding="utf-8")
        self._batches = batches

    def record(self, header: pb.PushHeader) -> None:
        """Logs the push about to be sent: its key and the (epoch, sample index) of every position it names."""
        self._file.write(json.dumps({
            "worker_id": header.worker_id, "incarnation": header.incarnation, "sequence": header.sequence,
            "base_version": header.base_version,
            "samples": [list(pair) for pair in self._batches.samples(spans_from_wire(header.trained))],
        }) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
