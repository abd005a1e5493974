"""Evaluating a classifier: top-1, top-5 and mean cross-entropy over a held-out set.

No gRPC here: the observer (``ps-eval``) and the server's own periodic
evaluation call the same ``evaluate``, so their numbers agree, and keep the best
model with the same ``BestModel``. ``evaluation_dataset`` builds the held-out data both of them use::

    data = evaluation_dataset("/data/val", num_classes=1000, image_size=224)
    loader = DataLoader(data, batch_size=64)
    metrics = evaluate(model, loader, "cpu")      # Metrics(top1=..., top5=..., loss=..., samples=...)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from paramhub.common import checkpoint
from paramhub.common.data import DataError, SyntheticImages, eval_transform, image_folder

# Synthetic evaluation samples take their noise from seeds far past any training
# set's, so the model is scored on samples it has never seen (same class patterns).
SYNTHETIC_INDEX_OFFSET = 10_000_000
BEST_MODEL = "best.safetensors"
BEST_METRICS = "best.json"
log = logging.getLogger("paramhub.eval")


@dataclasses.dataclass(frozen=True)
class Metrics:
    """The result of one evaluation.

    Attributes:
        top1: fraction of samples whose highest logit is the label.
        top5: fraction whose label is among the k highest logits, k = min(5, classes).
        loss: mean cross-entropy per sample.
        samples: how many samples were scored.
    """

    top1: float
    top5: float
    loss: float
    samples: int

    def better_than(self, other: "Metrics | None") -> bool:
        """Whether these metrics beat ``other``: higher top-1, and on equal top-1 the lower loss."""
        if other is None:
            return True
        return (self.top1, -self.loss) > (other.top1, -other.loss)

    def to_dict(self) -> dict[str, float | int]:
        """The metrics as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def evaluate(model: nn.Module, loader, device: torch.device | str) -> Metrics:
    """Scores ``model`` on every batch of ``loader``.

    The model runs in eval mode (BatchNorm uses its running statistics) and gets
    its previous mode back afterwards; nothing else about it changes.

    Args:
        model: a classifier returning logits of shape (batch, classes), already on ``device``.
        loader: yields (images, integer labels) batches, e.g. a DataLoader.
        device: where the batches are moved before the forward pass.

    Returns:
        The metrics over all samples (each sample weighs the same, whatever the batch sizes).

    Raises:
        ValueError: the loader yielded no samples.
    """
    device = torch.device(device)
    # Sums stay on the device and are read once at the end: no sync per batch on a GPU.
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correctk = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                logits = model(images).float()
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
                k = min(5, logits.shape[1])
                hits = logits.topk(k, dim=1).indices == labels[:, None]
                correct1 += hits[:, 0].sum()
                correctk += hits.any(dim=1).sum()
                samples += len(labels)
    finally:
        model.train(was_training)
    if samples == 0:
        raise ValueError("the evaluation data has no samples")
    return Metrics(top1=correct1.item() / samples, top5=correctk.item() / samples,
                   loss=loss_sum.item() / samples, samples=samples)


def evaluation_dataset(source: str | os.PathLike, *, num_classes: int, image_size: int, size: int = 1024,
                       seed: int = 0) -> Dataset:
    """The held-out samples to evaluate on.

    Args:
        source: ``synthetic``, or an ImageFolder directory (one sub-directory per
            class, in the same order as the training data's).
        num_classes: the model's classes; a directory with more is an error.
        image_size: images are resized and center-cropped to this size and
            normalised with the ImageNet mean/std (``common.data.eval_transform``).
        size: samples in the synthetic set (ignored for a directory).
        seed: the synthetic class patterns; must match the workers' ``--seed``.

    Raises:
        DataError: a missing or malformed directory, or one with too many classes.
    """
    if str(source) == "synthetic":
        return SyntheticImages(size, num_classes, image_size, seed=seed, index_offset=SYNTHETIC_INDEX_OFFSET)
    data = image_folder(source, eval_transform(image_size))
    if len(data.classes) > num_classes:
        raise DataError(f"{source} has {len(data.classes)} classes but the model has {num_classes}")
    return data


class BestModel:
    """Keeps the best model so far as ``best.safetensors`` plus its metrics in ``best.json``.

    A ``best.json`` left by an earlier evaluator of the same model (same layout
    hash) is the bar to beat; one of another model is replaced by the first result.

    Args:
        directory: where both files live (created when first written).
        facts: what identifies the model (``model``, ``num_classes``, ``layout_hash``);
            stored in both files so ``ps-ctl export`` can rebuild the model.
    """

    def __init__(self, directory: str | pathlib.Path, facts: dict):
        self.directory = pathlib.Path(directory)
        self.facts = facts
        self.metrics: Metrics | None = None
        previous = self._read_previous()
        if previous is not None:
            self.metrics = Metrics(**{key: previous[key] for key in ("top1", "top5", "loss", "samples")})
            log.info("best so far: version %d, top1 %.4f (from %s)", previous["version"],
                     self.metrics.top1, self.directory / BEST_METRICS)

    def _read_previous(self) -> dict | None:
        path = self.directory / BEST_METRICS
        if not path.is_file():
            return None
        try:
            previous = json.loads(path.read_text())
            if previous.get("layout_hash") == self.facts["layout_hash"] and (self.directory / BEST_MODEL).is_file():
                return previous
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None
        log.info("%s belongs to another model; it will be replaced", path)
        return None

    def offer(self, record: dict, metrics: Metrics, state: dict[str, torch.Tensor]) -> bool:
        """Saves ``state`` if ``metrics`` beat the best so far; returns whether it did.

        The model goes first and the metrics second, each written atomically, so
        ``best.json`` never describes a model that is not on disk.
        """
        if not metrics.better_than(self.metrics):
            return False
        summary = {**record, **self.facts}
        checkpoint.save_state_file(self.directory / BEST_MODEL, state, summary)
        checkpoint.write_atomically(self.directory / BEST_METRICS, (json.dumps(summary, indent=2) + "\n").encode())
        self.metrics = metrics
        return True
