"""The server evaluating its own model every V versions (``--eval-data DIR --eval-every V``).

Runs on the server's main loop, between checkpoints, on snapshots (which are never
written in place), so training goes on while it evaluates. Shares ``evaluate``,
precise BN (``--eval-precise-bn-data DIR``) and ``BestModel`` with ps-eval, so both
report the same numbers.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import torch
from torch.utils.data import DataLoader

from paramhub.common.config import PRECISE_BN_BATCHES
from paramhub.common.evaluation import (BestModel, PreciseBN, evaluate_precise, evaluation_dataset,
                                        frozen_batchnorm_names)
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
        precise_bn_data: training images to recompute the BatchNorm statistics on before
            scoring (``PreciseBN``: ``precise_bn_batches`` batches of ``batch_size``), or None.
            The record then has ``top1_running_stats`` too, and the best model the
            recomputed statistics.
        frozen: state_dict names of a frozen backbone's tensors; its BatchNorm layers keep
            their statistics.

    Raises:
        DataError: the evaluation or precise-BN data cannot be used.
    """

    def __init__(self, arch: str, num_classes: int, data: str, every: int, *, image_size: int, size: int,
                 batch_size: int, out_dir: str | None, facts: dict, precise_bn_data: str | None = None,
                 precise_bn_batches: int = PRECISE_BN_BATCHES, frozen: tuple[str, ...] | list[str] = ()):
        self.every = every
        self.model = build_model(arch, num_classes)
        dataset = evaluation_dataset(data, num_classes=num_classes, image_size=image_size, size=size)
        self.loader = DataLoader(dataset, batch_size=batch_size)
        self.precise_bn = (PreciseBN(precise_bn_data, num_classes=num_classes, image_size=image_size,
                                     batch_size=batch_size, num_batches=precise_bn_batches)
                           if precise_bn_data else None)
        self.frozen_bn = frozen_batchnorm_names(self.model, frozen)
        if self.precise_bn is not None:
            log.info("[server/eval] precise BN: BatchNorm statistics recomputed on %s before each evaluation",
                     self.precise_bn.describe())
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
        metrics, extra = evaluate_precise(self.model, self.loader, "cpu", self.precise_bn, self.frozen_bn)
        record = {"version": version, **metrics.to_dict(), **extra, "time": time.time()}
        log.info("[server/eval] version %d: top1 %.4f, top5 %.4f, loss %.4f%s", version, metrics.top1, metrics.top5,
                 metrics.loss, f" (top1 {extra['top1_running_stats']:.4f} with the running BatchNorm statistics)"
                 if extra else "")
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "server_metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            # with precise BN the model holds the recomputed statistics: that is the model to keep
            self.best.offer(record, metrics, self.model.state_dict() if self.precise_bn else state)
        self.last_version = version
        self._next_due = (version // self.every + 1) * self.every
        return record
