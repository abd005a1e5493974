"""Datasets, transforms and shard splitting.

Two sources: ``synthetic`` (deterministic, learnable, no files) and an ImageFolder
directory. A directory is one of three things (``shards.resolve_data_source``): a whole
dataset, split here into N disjoint shards that together cover every sample (shard i is
the same on every machine for the same seed); one shard written by ``ps-data split``,
used whole; or the directory holding all of ps-data's shards, of which the worker takes
its own.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from paramhub.common.shards import DataError, read_manifest, resolve_data_source, sha256_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("auto", "imagenet", "cifar", "none")


class SyntheticImages(Dataset):
    """Deterministic, learnable images: each class is a fixed colour pattern plus noise.

    The pattern of class c is a random 4x4 RGB grid (seeded by ``seed`` and c),
    upsampled to the image size; each sample adds Gaussian noise seeded by its
    index. Classes are well separated, so loss falls quickly, yet not trivially.

    Args:
        num_samples: dataset length.
        num_classes: number of labels; sample i has label i % num_classes.
        image_size: height and width.
        seed: selects the class patterns (use the same seed on every worker).
        noise: standard deviation of the per-sample noise.
        index_offset: shifts the per-sample noise seeds (a held-out set uses a
            different offset to get unseen samples of the same classes).
    """

    def __init__(self, num_samples: int, num_classes: int, image_size: int, seed: int = 0,
                 noise: float = 2.0, index_offset: int = 0):
        if num_samples < 1 or num_classes < 1 or image_size < 1:
            raise DataError("synthetic data needs positive sizes")
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.noise = noise
        self.index_offset = index_offset
        gen = torch.Generator().manual_seed(seed)
        grids = torch.randn(num_classes, 3, 4, 4, generator=gen)
        self.patterns = torch.nn.functional.interpolate(grids, size=(image_size, image_size), mode="nearest")
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        label = index % self.num_classes
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index_offset + index)
        image = self.patterns[label] + self.noise * torch.randn(self.patterns[label].shape, generator=gen)
        return image, label


def shard_indices(num_samples: int, shard: int, num_shards: int, seed: int = 0) -> list[int]:
    """Indices of shard ``shard`` of ``num_shards``: disjoint, covering, reproducible.

    A seeded permutation spreads classes over shards; shard i takes every
    ``num_shards``-th index of it, so shard sizes differ by at most one.
    """
    if num_shards < 1:
        raise DataError(f"number of shards must be at least 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise DataError(f"shard {shard} is out of range for {num_shards} shards (0..{num_shards - 1})")
    if num_samples < num_shards:
        raise DataError(f"{num_samples} samples cannot fill {num_shards} shards")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[shard::num_shards])


# From this size up, training crops ImageNet-style (RandomResizedCrop) and evaluation crops the center.
IMAGENET_RECIPE_MIN_SIZE = 128


def train_transform(image_size: int, augment: str = "auto") -> transforms.Compose:
    """Training preprocessing; ``auto`` picks ImageNet crops at 128 px and up, CIFAR crops below.

    Small images lose their content to RandomResizedCrop (measured: chance accuracy at
    32 px), hence the padded-crop recipe for them.
    """
    if augment not in AUGMENTS:
        raise DataError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    if augment == "auto":
        augment = "imagenet" if image_size >= IMAGENET_RECIPE_MIN_SIZE else "cifar"
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if augment == "imagenet":
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    elif augment == "cifar":
        steps = [transforms.Resize((image_size, image_size)),
                 transforms.RandomCrop(image_size, padding=max(1, image_size // 8)),
                 transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize((image_size, image_size))]
    return transforms.Compose(steps + normalize)


def eval_transform(image_size: int) -> transforms.Compose:
    """Evaluation preprocessing that matches training's, ImageNet mean/std.

    From 128 px (where training uses ImageNet crops): resize to size × 256/224 and
    center crop, torchvision's convention. Below (CIFAR or no crops, which keep the
    whole image): resize to the size and nothing else. A center crop there zooms in by
    16% on what training saw whole; measured on the digits at 32 px it cost 1.5 to 10
    points of top-1 (BENCHMARKS.md "Training as well as DDP").
    """
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if image_size < IMAGENET_RECIPE_MIN_SIZE:
        return transforms.Compose([transforms.Resize((image_size, image_size)), *normalize])
    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        *normalize,
    ])


class _ManifestImageFolder(datasets.ImageFolder):
    """An ImageFolder whose classes come from a ps-data manifest, not from the sub-directories present.

    A shard may lack a class that has fewer images than there are shards; numbering the
    classes it happens to hold would shift the labels of all the others.
    """

    def __init__(self, root: str, classes: Sequence[str], transform):
        self._manifest_classes = list(classes)
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory):
        return list(self._manifest_classes), {name: i for i, name in enumerate(self._manifest_classes)}


def image_folder(root: str | os.PathLike, transform, classes: Sequence[str] | None = None) -> datasets.ImageFolder:
    """An ImageFolder with clear errors for a missing or empty tree.

    Args:
        root: the tree, one sub-directory per class.
        transform: applied to each PIL image.
        classes: the class list from a ps-data manifest (label i is ``classes[i]``); a class
            directory outside it is an error. None: the sub-directories, sorted.
    """
    path = pathlib.Path(root)
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist")
    if classes is not None:
        extra = sorted({e.name for e in os.scandir(path) if e.is_dir()} - set(classes))
        if extra:
            raise DataError(f"{path} has class directories its manifest does not list: {', '.join(extra[:5])}")
    try:
        if classes is None:
            return datasets.ImageFolder(str(path), transform=transform)
        return _ManifestImageFolder(str(path), classes, transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{path} is not an ImageFolder tree (one sub-directory per class): {exc}") from None


def training_shard(source: str, shard: int, num_shards: int, *, num_classes: int, image_size: int,
                   augment: str = "auto", seed: int = 0, synthetic_size: int = 4096) -> Dataset:
    """The training samples of one shard.

    Args:
        source: ``synthetic``, an ImageFolder directory (split here), one shard written by
            ``ps-data split`` (used whole), or the directory holding all its shards (shard
            ``shard`` is taken); see ``shards.resolve_data_source``.
        shard, num_shards: which part of the data this worker trains on; must match the
            manifest of a ps-data split.
        num_classes: the model's classes (an ImageFolder with more classes is an error).
        image_size: images are brought to this size.
        augment: a recipe from ``AUGMENTS``.
        seed: data seed, the same on every worker.
        synthetic_size: samples in the whole synthetic dataset.
    """
    if source == "synthetic":
        data = SyntheticImages(synthetic_size, num_classes, image_size, seed=seed)
        return Subset(data, shard_indices(len(data), shard, num_shards, seed))
    where = resolve_data_source(source, shard, num_shards)
    folder = image_folder(where.root, train_transform(image_size, augment), classes=where.classes)
    if len(folder.classes) > num_classes:
        raise DataError(f"{where.root} has {len(folder.classes)} classes but the model has {num_classes}")
    if where.images is not None and len(folder) != where.images:
        raise DataError(f"{where.root} holds {len(folder)} images but its manifest lists {where.images}; "
                        "was it changed after ps-data wrote it? (`ps-data verify` tells what differs)")
    if where.split:
        return Subset(folder, shard_indices(len(folder), shard, num_shards, seed))
    return Subset(folder, list(range(len(folder))))


def leased_dataset(source: str, *, num_classes: int, image_size: int, augment: str = "auto", seed: int = 0,
                   synthetic_size: int = 4096) -> tuple[Dataset, str]:
    """The whole training set a worker trains on under data leases, and its fingerprint.

    Every worker opens the same data (``synthetic``, an ImageFolder tree, or the
    directory holding all of ps-data's shards, in shard order); the server
    refuses a worker whose sample count or fingerprint differs from the run's,
    so a position means the same sample everywhere. The fingerprint hashes every
    image's path (relative to the root) and label, not the pixels: cheap enough
    for ImageNet, and it catches a different, reordered or relabelled tree.

    Raises:
        DataError: a missing or empty tree, one ps-data shard alone, or the validation split.
    """
    if source == "synthetic":
        data = SyntheticImages(synthetic_size, num_classes, image_size, seed=seed)
        return data, sha256_bytes(f"synthetic:{synthetic_size}:{num_classes}:{image_size}:{seed}".encode())
    root = pathlib.Path(source)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    manifest = read_manifest(root)
    transform = train_transform(image_size, augment)
    if manifest is None:
        folders = [image_folder(root, transform)]
    elif manifest["kind"] == "dataset":
        classes = manifest["classes"]
        folders = [image_folder(root / entry["path"], transform, classes=classes)
                   for entry in sorted(manifest["shards"], key=lambda entry: entry["index"])]
    else:
        raise DataError(f"{root} is one {manifest['kind']} written by ps-data; with data leases every worker trains "
                        "on the whole set: give the directory that holds all the shards")
    if max(len(folder.classes) for folder in folders) > num_classes:
        raise DataError(f"{root} has more classes than the model's {num_classes}")
    listing = hashlib.sha256()
    for folder in folders:
        for path, label in folder.samples:
            listing.update(f"{pathlib.Path(path).relative_to(root).as_posix()}\t{label}\n".encode())
    data = folders[0] if len(folders) == 1 else ConcatDataset(folders)
    if len(data) == 0:
        raise DataError(f"{root} holds no images")
    return data, listing.hexdigest()


def seed_augmentation(seed: int, shard: int) -> None:
    """Seeds the random crops and flips of a worker drawing from ``shard_loader`` in its own process.

    With ``num_workers=0`` the transforms draw from torch's global generator, which
    nothing seeded: two runs with the same ``--seed`` augmented differently. paramhub's
    workers and the DDP reference call this before their first batch, so worker r and
    rank r see the same augmented images.
    """
    torch.manual_seed((seed * 7919 + shard) * 104729 + 1)


def shard_loader(data: Dataset, batch_size: int, shard: int, seed: int = 0, *, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """The batches one worker draws from its shard: reshuffled every epoch, in an order seeded by (seed, shard).

    paramhub's workers and the DDP reference (``paramhub.tools.ddp``) both take their
    batches from here, so the two see the same samples in the same order.
    """
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=len(data) >= batch_size,
                      num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed * 7919 + shard))
