"""Evaluating a classifier: top-1, top-5 and mean cross-entropy over a held-out set.

No gRPC here: the observer (``ps-eval``) and the server's own periodic
evaluation call the same ``evaluate``, so their numbers agree, and keep the best
model with the same ``BestModel``. ``evaluation_dataset`` builds the held-out data both of them use::

    data = evaluation_dataset("/data/val", num_classes=1000, image_size=224)
    loader = DataLoader(data, batch_size=64)
    metrics = evaluate(model, loader, "cpu")      # Metrics(top1=..., top5=..., loss=..., samples=...)

Precise BN: a trained model's BatchNorm running statistics are an exponential average
(momentum 0.1) over the last ~10 training batches, taken while the weights still moved, so
they lag behind the final weights. ``recompute_batchnorm_stats`` replaces them by the
population mean and variance of each layer's inputs over a number of training batches
under the final weights (pycls's and detectron2's "precise BN"); ``PreciseBN`` does it on
a ``--precise-bn-data`` directory, seen through the evaluation transform::

    precise = PreciseBN("/data/shards", num_classes=1000, image_size=224, batch_size=64, num_batches=20)
    precise.apply(model, "cpu")                   # BatchNormRecomputed(layers=53, skipped=0, batches=20, ...)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import pathlib
from typing import Collection, Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from paramhub.common import checkpoint
from paramhub.common.config import PRECISE_BN_BATCHES
from paramhub.common.data import DataError, SyntheticImages, eval_transform, image_folder
from paramhub.common.shards import read_manifest, shard_dir_name

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


# -- precise BatchNorm statistics -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchNormRecomputed:
    """What ``recompute_batchnorm_stats`` did.

    Attributes:
        layers: BatchNorm layers whose running statistics were replaced.
        skipped: BatchNorm layers left alone (``skip``).
        batches: batches fed through the model (0 when there was nothing to recompute).
        samples: samples in those batches.
    """

    layers: int
    skipped: int
    batches: int
    samples: int


class _Moments:
    """Per-channel count, mean and sum of squared deviations of a layer's inputs, merged batch by batch.

    Each batch's mean and variance come from ``torch.var_mean`` on the input's own device
    and dtype; batches are merged in float64 with Chan et al.'s pairwise update, so the
    result is the mean and variance of all the inputs as one set, whatever the batch sizes.
    """

    def __init__(self):
        self.count = 0
        self.batches = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:  # a forward pre-hook
        x = args[0].detach()
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        n = x.numel() // x.shape[1]
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None:
            self.mean, self.m2 = mean, m2
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count += n
        self.batches += 1


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The model's BatchNorm layers that keep running statistics, by module name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and module.track_running_stats and module.running_mean is not None}


def frozen_batchnorm_names(model: nn.Module, frozen_tensors: Iterable[str]) -> set[str]:
    """The BatchNorm layers of ``model`` that a frozen-backbone run never trains.

    A layer counts as frozen when its ``weight`` (or, for a layer without affine
    parameters, its ``running_mean``) is among ``frozen_tensors`` (state_dict names):
    the same rule by which the workers keep those layers in eval mode.
    """
    frozen = set(frozen_tensors)
    return {name for name, module in batchnorm_layers(model).items()
            if f"{name}.weight" in frozen or (module.weight is None and f"{name}.running_mean" in frozen)}


def recompute_batchnorm_stats(model: nn.Module, batches: Iterable, num_batches: int, *,
                              skip: Collection[str] = (), device: torch.device | str | None = None
                              ) -> BatchNormRecomputed:
    """Replaces the running statistics of the model's BatchNorm layers by their population values ("precise BN").

    Every BatchNorm layer not in ``skip`` is reset and put in train mode, with
    ``momentum=None`` for the pass; the rest of the model is in eval mode (dropout off,
    skipped layers normalising with their own running statistics, as evaluation will).
    The first ``num_batches`` batches go through the model under ``torch.no_grad()``:
    each layer normalises them with their batch statistics, as in training, and its
    inputs are accumulated. Afterwards each layer's ``running_mean`` and ``running_var``
    are the mean and the unbiased variance (per channel) of all the inputs it saw,
    taken as one set, and ``num_batches_tracked`` is the number of batches. (torch's own
    cumulative average, ``momentum=None``, would average the per-batch variances instead,
    which leaves out how the batch means differ.) Parameters are never touched; each
    module's training flag and each layer's momentum are restored, and on an error the
    old statistics come back too.

    Args:
        model: the model, already on ``device``.
        batches: yields image tensors or (images, labels) batches (labels are ignored);
            shuffled training data, so that no batch is all of one class.
        num_batches: how many batches to use (fewer if ``batches`` runs out first).
        skip: names of BatchNorm modules (as in ``named_modules``) to leave alone: the
            frozen backbone of a fine-tuning run (``frozen_batchnorm_names``), whose
            statistics are the pretrained ones the head was trained against.
        device: where the batches are moved; default: where the model's first parameter is.

    Returns:
        How many layers were recomputed and skipped, and the batches and samples used.
        A model without BatchNorm layers (or with all of them skipped) is left as it is,
        and no batch is read.

    Raises:
        ValueError: ``num_batches`` < 1, ``skip`` names a module that is not a BatchNorm
            layer of the model, or ``batches`` yielded nothing.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    layers = batchnorm_layers(model)
    skip = set(skip)
    unknown = skip - set(layers)
    if unknown:
        raise ValueError(f"not BatchNorm layers of the model: {', '.join(sorted(unknown)[:5])}")
    targets = {name: module for name, module in layers.items() if name not in skip}
    if not targets:
        return BatchNormRecomputed(layers=0, skipped=len(skip), batches=0, samples=0)
    if device is None:
        first = next(itertools.chain(model.parameters(), model.buffers()))
        device = first.device
    device = torch.device(device)
    modes = {module: module.training for module in model.modules()}
    saved = {module: (module.running_mean.clone(), module.running_var.clone(), module.num_batches_tracked.clone(),
                      module.momentum) for module in targets.values()}
    moments = {module: _Moments() for module in targets.values()}
    hooks = [module.register_forward_pre_hook(moments[module]) for module in targets.values()]
    done = False
    batches_used = samples = 0
    try:
        model.eval()
        for module in targets.values():
            module.reset_running_stats()
            module.momentum = None
            module.train()
        with torch.no_grad():
            for batch in itertools.islice(batches, num_batches):
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images.to(device, non_blocking=True))
                batches_used += 1
                samples += len(images)
        if batches_used == 0:
            raise ValueError("precise BN got no batches")
        for name, module in targets.items():
            seen = moments[module]
            if seen.count == 0:  # a layer the forward pass never reaches keeps what it had
                log.warning("BatchNorm layer %s saw no input; its statistics are left as they were", name)
                module.running_mean.copy_(saved[module][0])
                module.running_var.copy_(saved[module][1])
                module.num_batches_tracked.copy_(saved[module][2])
                continue
            module.running_mean.copy_(seen.mean)
            module.running_var.copy_(seen.m2 / max(seen.count - 1, 1))
            module.num_batches_tracked.fill_(seen.batches)
        done = True
    finally:
        for hook in hooks:
            hook.remove()
        for module, (mean, var, tracked, momentum) in saved.items():
            module.momentum = momentum
            if not done:
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)
                module.num_batches_tracked.copy_(tracked)
        for module, training in modes.items():
            module.training = training
    return BatchNormRecomputed(layers=len(targets), skipped=len(skip), batches=batches_used, samples=samples)


def precise_bn_dataset(source: str | os.PathLike, *, num_classes: int, image_size: int) -> Dataset:
    """The training images to recompute BatchNorm statistics on, through the evaluation transform.

    Args:
        source: an ImageFolder tree, one shard written by ``ps-data split``, or the
            directory holding all of its shards (every shard is used).
        num_classes: the model's classes; the data must have exactly as many (a check
            that this is the model's training data: the labels themselves are not used).
        image_size: as evaluation sees the images (``common.data.eval_transform``), so
            the statistics are those of what evaluation feeds the model.

    Raises:
        DataError: a missing directory, one that is not an ImageFolder tree or has no
            images, ps-data's held-out ``val`` split, or a class count unlike the model's.
    """
    root = pathlib.Path(source)
    if not root.is_dir():
        raise DataError(f"precise-BN data directory {root} does not exist")
    transform = eval_transform(image_size)
    manifest = read_manifest(root)
    if manifest is None:
        parts = [image_folder(root, transform)]
        classes = parts[0].classes
    elif manifest["kind"] == "val":
        raise DataError(f"{root} is the held-out validation split written by ps-data; precise BN re-estimates the "
                        "statistics on training images: give a shard or the directory holding all the shards")
    else:
        classes = manifest["classes"]
        roots = [root]
        if manifest["kind"] == "dataset":
            roots = [root / entry.get("path", shard_dir_name(entry.get("index", i)))
                     for i, entry in enumerate(manifest["shards"]) if isinstance(entry, dict)]
            missing = [r.name for r in roots if not r.is_dir()]
            if missing or not roots:
                raise DataError(f"{root} lacks the shard directories its manifest lists: {', '.join(missing[:5])}")
        parts = [image_folder(r, transform, classes=classes) for r in roots]
    if len(classes) != num_classes:
        raise DataError(f"precise-BN data {root} has {len(classes)} classes but the model has {num_classes}")
    data = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if len(data) < 2:
        raise DataError(f"precise-BN data {root} holds {len(data)} images; BatchNorm statistics need at least 2")
    return data


class PreciseBN:
    """``--precise-bn-data DIR``: recomputes a model's BatchNorm statistics on the same training batches each time.

    Args:
        source, num_classes, image_size: see ``precise_bn_dataset``.
        batch_size: images per batch (full batches only, when there are enough images).
        num_batches: batches per recomputation.
        seed: the shuffle (the same batches on every call, so versions compare fairly).
        loader_workers, pin_memory: DataLoader settings.

    Raises:
        DataError: see ``precise_bn_dataset``.
    """

    def __init__(self, source: str | os.PathLike, *, num_classes: int, image_size: int, batch_size: int = 64,
                 num_batches: int = PRECISE_BN_BATCHES, seed: int = 0, loader_workers: int = 0,
                 pin_memory: bool = False):
        if num_batches < 1 or batch_size < 1:
            raise ValueError("precise BN needs at least one batch of at least one image")
        self.source = str(source)
        self.data = precise_bn_dataset(source, num_classes=num_classes, image_size=image_size)
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        self.loader_workers = loader_workers
        self.pin_memory = pin_memory

    def loader(self) -> DataLoader:
        """The batches, shuffled in the same order on every call."""
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True,
                          drop_last=len(self.data) >= self.batch_size, num_workers=self.loader_workers,
                          pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(self.seed))

    def apply(self, model: nn.Module, device: torch.device | str, skip: Collection[str] = ()) -> BatchNormRecomputed:
        """``recompute_batchnorm_stats`` on this data."""
        return recompute_batchnorm_stats(model, self.loader(), self.num_batches, skip=skip, device=device)

    def describe(self) -> str:
        return f"{self.num_batches} batches of {self.batch_size} from {self.source} ({len(self.data)} images)"


def evaluate_precise(model: nn.Module, loader, device: torch.device | str, precise_bn: PreciseBN | None,
                     skip: Collection[str] = (), *, score=None) -> tuple[Metrics, dict]:
    """Scores ``model``; with ``precise_bn``, first as it is, then after recomputing its BatchNorm statistics.

    The model keeps the recomputed statistics (so a best model saved afterwards has them).

    Args:
        model, loader, device: as for ``evaluate``.
        precise_bn: the recomputation, or None: just ``evaluate``.
        skip: BatchNorm layers to leave alone (``frozen_batchnorm_names``).
        score: the scoring function (default ``evaluate``).

    Returns:
        The metrics that count (after recomputation, if any) and the extra record fields:
        ``top1_running_stats``, the top-1 with the running statistics the model came with.
    """
    score = score or evaluate
    if precise_bn is None:
        return score(model, loader, device), {}
    before = score(model, loader, device)
    if precise_bn.apply(model, device, skip).layers == 0:  # nothing changed (no BatchNorm, or all of it frozen)
        return before, {"top1_running_stats": before.top1}
    return score(model, loader, device), {"top1_running_stats": before.top1}
