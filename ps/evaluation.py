"""The server evaluating its own model every V versions (``--eval-data DIR --eval-every V``).

Runs on the server's main loop, between checkpoints, on snapshots (which are never
written in place), so training goes on while it evaluates. Shares ``evaluate``
and ``BestModel`` with ps-eval, so both report the same numbers.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import torch
from torch.utils.data import DataLoader

from paramhub.common.evaluation import BestModel, evaluate, evaluation_dataset
from paramhub.common.models import build_model

log = logging.getLogger("paramhub.ps")


class ServerEvaluator:
    """Evaluates full model states and keeps the best one.

    Args:
        arch, num_classes: the model.
        data: an ImageFolder directory or ``synthetic``.
        every: evaluate when the version has advanced this much since the last evaluation.
        image_size, size, batch_size: evaluation data settings.
        out_dir: where ``server_metrics.jsonl`` and the best model go (None: log only).
        facts: identifies the model in the best-model files.
    """

    def __init__(self, arch: str, num_classes: int, data: str, every: int, *, image_size: int, size: int,
                 batch_size: int, out_dir: str | None, facts: dict):
        self.every = every
        self.model = build_model(arch, num_classes)
        dataset = evaluation_dataset(data, num_classes=num_classes, image_size=image_size, size=size)
        self.loader = DataLoader(dataset, batch_size=batch_size)
        self.out_dir = pathlib.Path(out_dir) if out_dir else None
        self.best = BestModel(self.out_dir / "best", facts) if self.out_dir else None
        self.last_version = -1
        self._next_due = every

    def due(self, version: int) -> bool:
        """True when ``version`` has reached the next multiple of ``every``."""
        return version >= self._next_due

    def run(self, version: int, state: dict[str, torch.Tensor]) -> dict:
        """Evaluates ``state`` (a full state_dict) and records the result; returns the JSON record."""
        self.model.load_state_dict(state, strict=True)
        metrics = evaluate(self.model, self.loader, "cpu")
        record = {"version": version, **metrics.to_dict(), "time": time.time()}
        log.info("[server/eval] version %d: top1 %.4f, top5 %.4f, loss %.4f", version, metrics.top1, metrics.top5,
                 metrics.loss)
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "server_metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.best.offer(record, metrics, state)
        self.last_version = version
        self._next_due = (version // self.every + 1) * self.every
        return record
