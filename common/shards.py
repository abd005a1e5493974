"""Splitting a dataset into shard directories (``ps-data split``) and finding a worker's shard.

``split_dataset`` reads an ImageFolder tree or CIFAR-10's python batches and writes::

    out/manifest.json                  the whole split: source, seed, classes, images per class per shard
    out/shard-00000/<class>/<file>     one ImageFolder tree per shard, with its own manifest.json
    out/val/<class>/<file>             the held-out split (``val_fraction > 0``), with its manifest.json

The split is random (seeded), reproducible and stratified by class. Every file's sha256
is in the manifest of the directory that holds it; the top manifest records the sha256 of
each of those manifests, so it covers every file without repeating a million entries.

Nothing is half-written: the input is checked completely (every image is decoded) before
anything is written, everything is written into a hidden temporary sibling of ``out``, and
that directory is renamed into place at the end. A run killed outright can leave the hidden
``.NAME.partial-*`` sibling behind, never a half-written ``out``.

``resolve_data_source`` tells what a worker's ``--data DIR`` is: one shard, the directory
holding all shards, or a plain ImageFolder tree to split on the fly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import secrets
import shutil
import tempfile
import warnings
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

MANIFEST = "manifest.json"
FORMAT = "paramhub-data"
FORMAT_VERSION = 1
VAL_DIR = "val"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_META = "batches.meta"
KINDS = ("dataset", "shard", "val")


class DataError(ValueError):
    """The data a user pointed at cannot be used (missing, empty, bad shard)."""


def shard_dir_name(index: int) -> str:
    """The directory of shard ``index`` inside a split: ``shard-00003``."""
    return f"shard-{index:05d}"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's contents, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- sources ---------------------------------------------------------------------------------------


class ImageFolderSource:
    """An ImageFolder tree (one sub-directory per class), scanned exactly as torchvision's ImageFolder does.

    Args:
        root: the tree.

    Raises:
        DataError: missing or empty tree, or a class directory without images.
    """

    kind = "imagefolder"

    def __init__(self, root: pathlib.Path):
        # imported here: torchvision costs a process 164 MB, and the server imports this module
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        self.root = root
        if not root.is_dir():
            raise DataError(f"input directory {root} does not exist")
        try:
            self.classes, class_to_idx = find_classes(root)
        except FileNotFoundError:
            raise DataError(f"{root} has no class sub-directories; expected an ImageFolder tree "
                            f"(one sub-directory of images per class) or CIFAR-10's {CIFAR10_DIR}") from None
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        counts = np.bincount([label for _, label in samples], minlength=len(self.classes))
        empty = [name for name, count in zip(self.classes, counts) if count == 0]
        if empty:
            raise DataError(f"{root}: class {empty[0]!r} has no images ({len(empty)} such class(es): "
                            f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); "
                            f"image files end in {', '.join(IMG_EXTENSIONS)}")
        self.paths = [pathlib.Path(path) for path, _ in samples]
        self.labels = [label for _, label in samples]
        # Where each image goes under its class directory: its path below the source class
        # directory (ImageFolder also reads nested folders), so names never collide.
        self.names = [path.relative_to(root / self.classes[label]).as_posix()
                      for path, label in zip(self.paths, self.labels)]
        self._checksums: list[str] | None = None

    def check(self, index: int) -> str:
        """Reads and decodes one image as ImageFolder's loader will; returns its sha256.

        Raises:
            DataError: the file cannot be read or is not an image PIL can decode.
        """
        path = self.paths[index]
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB")  # decodes every pixel: a truncated file fails here, not in training
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None
        return sha256_bytes(data)

    def prepare(self, run: Callable, progress) -> None:
        """Decodes every image (``run`` is a parallel map); all failures are reported together."""
        def check(index: int) -> str | DataError:
            try:
                return self.check(index)
            except DataError as exc:  # keep going: one bad file must not hide the others
                return exc
            finally:
                progress.update(1)

        results = run(check, range(len(self.paths)))
        errors = [r for r in results if isinstance(r, DataError)]
        if errors:
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise DataError(f"{len(errors)} unreadable image(s) in {self.root}; nothing was written:\n  "
                            + "\n  ".join(str(e) for e in errors[:5]) + more)
        self._checksums = results

    def write(self, index: int, dst: pathlib.Path, copy: bool = False) -> str:
        """Hard-links (or copies) image ``index`` to ``dst``; returns its sha256 from ``prepare``."""
        if not copy:
            try:
                os.link(self.paths[index], dst)
                return self._checksums[index]
            except OSError:  # another file system, or links not allowed: copy instead
                pass
        shutil.copyfile(self.paths[index], dst)
        return self._checksums[index]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's batch dicts: plain containers and numpy arrays, nothing else.

    CIFAR-10's python files are pickles, and unpickling can run any code the file names.
    We read only the user's own local copy (never data from the network), and refuse every
    global except the few that rebuild a numpy array, so a tampered file fails instead of
    running code.
    """

    ALLOWED = {
        ("_codecs", "encode"),  # how protocol 2 stores bytes
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        with warnings.catch_warnings():  # numpy 2 warns when an old pickle names numpy.core
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _load_cifar_pickle(path: pathlib.Path) -> dict:
    """One CIFAR-10 batch file as a dict with str keys (the files were written by Python 2)."""
    try:
        with open(path, "rb") as f:
            # latin1, as torchvision reads them: Python 2 strings inside numpy arrays need it
            entry = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 directory {path.parent} has no {path.name}") from None
    except Exception as exc:  # a corrupt pickle raises almost anything
        raise DataError(f"{path} is not a readable CIFAR-10 python batch: {exc}") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR-10 python batch (expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def is_cifar10_dir(path: pathlib.Path) -> bool:
    """True for a directory laid out as CIFAR-10's ``cifar-10-batches-py``."""
    return (path / CIFAR10_META).is_file() and (path / CIFAR10_TRAIN_BATCHES[0]).is_file()


class Cifar10Source:
    """CIFAR-10's python-format training batches (``data_batch_1`` .. ``data_batch_5``), written out as PNGs.

    Why not ``torchvision.datasets.CIFAR10``: it insists on the md5 of the official files, so
    it cannot read a trimmed or re-packed copy (nor the small ones our tests write). The
    layout read here is the one it reads: ``data`` is N x 3072 uint8 (1024 red, 1024 green,
    1024 blue values of a 32x32 image, row-major), ``labels`` N ints, and ``batches.meta``
    names the classes in ``label_names``. ``test_batch`` is not used: it is CIFAR-10's
    official test set; split the training batches with ``val_fraction`` for a held-out set.

    Args:
        root: the ``cifar-10-batches-py`` directory.

    Raises:
        DataError: a missing or malformed batch, a label out of range, a class without images.
    """

    kind = "cifar10"

    def __init__(self, root: pathlib.Path):
        self.root = root
        meta = _load_cifar_pickle(root / CIFAR10_META)
        names = meta.get("label_names")
        if not isinstance(names, list) or not names:
            raise DataError(f"{root / CIFAR10_META} has no label_names list")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        for name in names:
            if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
                raise DataError(f"CIFAR-10 class name {name!r} cannot be a directory name")
        if len(set(names)) != len(names):
            raise DataError(f"{root / CIFAR10_META} names a class twice: {names}")
        # Classes in ImageFolder order (sorted names), so that an ImageFolder reading the shards
        # gives each class the manifest's index. CIFAR-10's own names are already sorted.
        self.classes = sorted(names)
        remap = np.array([self.classes.index(n) for n in names])
        pixels, labels, self.names = [], [], []
        for batch in CIFAR10_TRAIN_BATCHES:
            entry = _load_cifar_pickle(root / batch)
            data, batch_labels = entry.get("data"), entry.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{root / batch}: 'data' must be an N x 3072 uint8 array")
            batch_labels = np.asarray(batch_labels if batch_labels is not None else [], dtype=np.int64)
            if batch_labels.shape != (len(data),):
                raise DataError(f"{root / batch}: {len(batch_labels)} labels for {len(data)} images")
            if len(batch_labels) and not (0 <= batch_labels.min() and batch_labels.max() < len(names)):
                raise DataError(f"{root / batch}: labels must lie in 0..{len(names) - 1}")
            pixels.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(remap[batch_labels])
            self.names += [f"{batch}-{i:05d}.png" for i in range(len(data))]
        self.pixels = np.concatenate(pixels)
        self.labels = np.concatenate(labels).tolist()
        counts = np.bincount(self.labels, minlength=len(self.classes))
        if not len(self.labels) or not counts.all():
            empty = [c for c, n in zip(self.classes, counts) if n == 0]
            raise DataError(f"CIFAR-10 batches in {root} have no images of class {empty[0]!r}")

    def prepare(self, run: Callable, progress) -> None:
        """Nothing to check: the arrays were validated when read."""

    def write(self, index: int, dst: pathlib.Path, copy: bool = False) -> str:
        """Writes image ``index`` as a PNG at ``dst``; returns its sha256."""
        buffer = io.BytesIO()
        Image.fromarray(self.pixels[index]).save(buffer, format="PNG")
        data = buffer.getvalue()
        dst.write_bytes(data)
        return sha256_bytes(data)


def open_source(path: str | os.PathLike) -> ImageFolderSource | Cifar10Source:
    """The dataset at ``path``: CIFAR-10's ``cifar-10-batches-py`` (or its parent, as torchvision's root), or an
    ImageFolder tree."""
    root = pathlib.Path(path)
    if not root.is_dir():
        raise DataError(f"input directory {root} does not exist")
    if is_cifar10_dir(root):
        return Cifar10Source(root)
    if is_cifar10_dir(root / CIFAR10_DIR):
        return Cifar10Source(root / CIFAR10_DIR)
    return ImageFolderSource(root)


# -- the split ---------------------------------------------------------------------------------------


def val_count(class_size: int, val_fraction: float) -> int:
    """Images of a class held out for validation: ``val_fraction`` of them, rounded half up, at least one.

    At least one, so that the validation ImageFolder has every class (an ImageFolder numbers
    the classes it finds; a missing one would shift the labels of the rest).
    """
    if val_fraction <= 0:
        return 0
    return max(1, math.floor(val_fraction * class_size + 0.5))


def plan_split(labels: Sequence[int], classes: Sequence[str], num_shards: int, seed: int = 0,
               val_fraction: float = 0.0) -> tuple[list[list[int]], list[int]]:
    """Assigns images to shards and to the held-out split, stratified by class.

    Each class's images are shuffled by a generator seeded with ``seed`` (numpy's legacy
    RandomState, whose stream numpy promises never to change, so a split can be redone
    years later). The first ``val_count`` of each class are held out; the rest are dealt to
    the shards round-robin, the deal continuing from one class to the next. So every class
    is spread over the shards as evenly as possible (its counts differ by at most one), and
    shard sizes differ by at most one.

    Args:
        labels: the class index of each image.
        classes: the class names (for messages); ``len(classes)`` classes.
        num_shards: how many shards.
        seed: the shuffle's seed, 0 .. 2**32 - 1.
        val_fraction: share of each class to hold out, in [0, 1).

    Returns:
        (the image indices of each shard, the held-out image indices), each sorted.

    Raises:
        DataError: a class without images, a class too small to hold one image out, or fewer
            training images than shards (every shard needs at least one image; a shard may
            lack a class that has fewer images than there are shards).
    """
    if num_shards < 1:
        raise DataError(f"number of shards must be at least 1, got {num_shards}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must lie in [0, 1), got {val_fraction}")
    if not 0 <= seed < 2**32:
        raise DataError(f"the seed must lie in 0 .. 2**32 - 1, got {seed}")
    members: list[list[int]] = [[] for _ in classes]
    for index, label in enumerate(labels):
        members[label].append(index)
    rng = np.random.RandomState(seed)
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    val: list[int] = []
    position = 0
    for name, indices in zip(classes, members):
        if not indices:
            raise DataError(f"class {name!r} has no images")
        held_out = val_count(len(indices), val_fraction)
        if held_out >= len(indices):
            raise DataError(f"class {name!r} has {len(indices)} image(s): too few to hold out "
                            f"{held_out} for validation and keep one to train on")
        order = [indices[i] for i in rng.permutation(len(indices))]
        val += order[:held_out]
        for index in order[held_out:]:
            shards[position % num_shards].append(index)
            position += 1
    if position < num_shards:
        raise DataError(f"{position} training image(s) cannot fill {num_shards} shards: "
                        "every shard needs at least one image")
    return [sorted(s) for s in shards], sorted(val)


def _check_out(out: pathlib.Path, force: bool) -> None:
    """Refuses an ``out`` that is a file, or is non-empty without ``force``."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"--out {out} exists and is not empty; pass --force to replace it")


def _check_overlap(out: pathlib.Path, input_root: pathlib.Path) -> None:
    """Refuses an ``out`` inside the input (it would join the dataset) or holding it (--force would delete it)."""
    out_abs, in_abs = out.resolve(), input_root.resolve()
    if out_abs == in_abs or in_abs in out_abs.parents or out_abs in in_abs.parents:
        raise DataError(f"--out {out} overlaps the input {input_root}; choose a directory outside it")


def _manifest(kind: str, common: dict, classes: Sequence[str], labels: Sequence[int], members: Sequence[int],
              **extra) -> dict:
    """The manifest fields every directory of a split shares, plus ``extra``."""
    counts = np.bincount([labels[i] for i in members], minlength=len(classes))
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, **common, "classes": list(classes),
            **extra, "images": len(members),
            "images_per_class": {name: int(n) for name, n in zip(classes, counts)}}


def _write_json(path: pathlib.Path, value: dict) -> str:
    """Writes ``value`` as indented JSON; returns the file's sha256."""
    data = (json.dumps(value, indent=1) + "\n").encode()
    path.write_bytes(data)
    return sha256_bytes(data)


def _write_part(directory: pathlib.Path, source, members: Sequence[int], run: Callable, copy: bool,
                manifest: dict, progress) -> str:
    """Writes one ImageFolder tree (a shard or val) and its manifest; returns the manifest's sha256.

    Every class gets a directory, even one that is empty here, so that an ImageFolder (or a
    person) reading this tree sees all classes in the same order.
    """
    for name in source.classes:
        (directory / name).mkdir(parents=True)
    targets = [directory / source.classes[source.labels[i]] / source.names[i] for i in members]
    for parent in {t.parent for t in targets} - {directory / name for name in source.classes}:
        parent.mkdir(parents=True, exist_ok=True)  # nested folders inside a class directory

    def write(k: int) -> str:
        digest = source.write(members[k], targets[k], copy)
        progress.update(1)
        return digest

    checksums = run(write, range(len(members)))
    files = sorted((t.relative_to(directory).as_posix(), digest) for t, digest in zip(targets, checksums))
    return _write_json(directory / MANIFEST, {**manifest, "files": dict(files)})


def split_dataset(input_dir: str | os.PathLike, out: str | os.PathLike, num_shards: int, *, seed: int = 0,
                  val_fraction: float = 0.0, force: bool = False, copy: bool = False,
                  threads: int | None = None, progress: bool = False) -> dict:
    """Splits a dataset into ``num_shards`` shard directories (and a held-out ``val``), atomically.

    Args:
        input_dir: an ImageFolder tree, or CIFAR-10's ``cifar-10-batches-py`` (or its parent).
        out: the directory to create; see the module docstring for its layout.
        num_shards: how many shards.
        seed: the shuffle's seed; the same seed and input give the same split.
        val_fraction: share of each class held out in ``out/val`` (0: none).
        force: replace a non-empty ``out``.
        copy: copy ImageFolder images instead of hard-linking them (links fall back to copies
            where the file system refuses them).
        threads: parallel reads and writes (default: Python's thread-pool default).
        progress: show progress bars on a terminal.

    Returns:
        The top-level manifest that was written to ``out/manifest.json``.

    Raises:
        DataError: bad input or ``out``; nothing has been written under ``out``.
    """
    input_root, out = pathlib.Path(input_dir), pathlib.Path(out)
    if num_shards < 1:
        raise DataError(f"number of shards must be at least 1, got {num_shards}")
    if not input_root.is_dir():
        raise DataError(f"input directory {input_root} does not exist")
    _check_out(out, force)
    source = open_source(input_root)
    _check_overlap(out, source.root)
    shards, val = plan_split(source.labels, source.classes, num_shards, seed, val_fraction)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # PIL, zlib and sha256 release the GIL
        def run(fn, items):
            return list(pool.map(fn, items))

        show = None if progress else True  # tqdm: None shows bars only on a terminal
        if source.kind == "imagefolder":
            with tqdm(total=len(source.labels), desc="checking images", disable=show) as bar:
                source.prepare(run, bar)

        common = {"source": {"type": source.kind, "path": str(source.root.resolve())}, "seed": seed,
                  "val_fraction": val_fraction, "num_shards": num_shards}
        top = _manifest("dataset", common, source.classes, source.labels, [i for s in shards for i in s])
        top["shards"], top["val"] = [], None
        out.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its mode 0700 would make the finished split private to us.
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            with tqdm(total=len(source.labels), desc="writing shards", disable=show) as bar:
                for index, members in enumerate(shards):
                    part = _manifest("shard", common, source.classes, source.labels, members, shard=index)
                    digest = _write_part(tmp / shard_dir_name(index), source, members, run, copy, part, bar)
                    top["shards"].append({"index": index, "path": shard_dir_name(index), "images": part["images"],
                                          "images_per_class": part["images_per_class"], "manifest_sha256": digest})
                if val:
                    part = _manifest("val", common, source.classes, source.labels, val)
                    digest = _write_part(tmp / VAL_DIR, source, val, run, copy, part, bar)
                    top["val"] = {"path": VAL_DIR, "images": part["images"],
                                  "images_per_class": part["images_per_class"], "manifest_sha256": digest}
            _write_json(tmp / MANIFEST, top)
            _move_into_place(tmp, out)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # no thread may still be writing into tmp
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return top


def _move_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Renames the finished ``tmp`` to ``out``, replacing an existing ``out`` (already allowed by the caller)."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            # Renames are atomic; deleting a large tree is not. Move the old tree aside first.
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        else:
            out.rmdir()
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- reading a split back ------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The ps-data manifest of ``directory``, or None when it has none.

    A ``manifest.json`` of some other tool (no ``"format": "paramhub-data"``) counts as none.

    Raises:
        DataError: the manifest cannot be parsed, is of a newer format, or lacks a field.
    """
    path = pathlib.Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise DataError(f"{path} has format version {version!r}; this paramhub reads versions up to "
                        f"{FORMAT_VERSION} (upgrade paramhub, or split the data again)")
    required = {"kind": str, "classes": list, "num_shards": int, "images": int, "seed": int}
    required.update({"dataset": {"shards": list}, "shard": {"shard": int, "files": dict},
                     "val": {"files": dict}}.get(manifest.get("kind"), {}))
    for field, kind in required.items():
        if not isinstance(manifest.get(field), kind):
            raise DataError(f"{path} is not a valid ps-data manifest: {field!r} is missing or not a {kind.__name__}")
    if manifest["kind"] not in KINDS:
        raise DataError(f"{path} has unknown kind {manifest['kind']!r}")
    return manifest


def verify_split(directory: str | os.PathLike) -> list[str]:
    """Checks the files of a split (or of one shard / val directory) against their manifests' checksums.

    Returns:
        One line per problem (a missing, changed or unlisted file); empty when all is well.

    Raises:
        DataError: ``directory`` has no ps-data manifest.
    """
    root = pathlib.Path(directory)
    manifest = read_manifest(root)
    if manifest is None:
        raise DataError(f"{root} has no ps-data {MANIFEST}")
    if manifest["kind"] != "dataset":
        return _verify_part(root, manifest)
    problems = []
    for part in manifest["shards"] + ([manifest["val"]] if manifest.get("val") else []):
        sub = root / part["path"]
        if not (sub / MANIFEST).is_file():
            problems.append(f"{sub}: missing")
        elif sha256_file(sub / MANIFEST) != part["manifest_sha256"]:
            problems.append(f"{sub / MANIFEST}: differs from the one this split wrote")
        else:
            problems += _verify_part(sub, read_manifest(sub))
    return problems


def _verify_part(root: pathlib.Path, manifest: dict) -> list[str]:
    problems = []
    listed = manifest["files"]
    for name, digest in listed.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: checksum differs from the manifest")
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        if path.relative_to(root).as_posix() not in listed:
            problems.append(f"{path}: not in the manifest")
    return problems


@dataclasses.dataclass(frozen=True)
class DataSource:
    """What a worker's ``--data DIR`` turned out to be.

    Attributes:
        root: the ImageFolder tree to read.
        classes: the class list from a ps-data manifest (fixes the labels even where a shard
            lacks a class), or None: the tree's own sub-directories.
        images: how many images the manifest promises, or None.
        split: True for a whole dataset that the worker splits on the fly by shard index.
    """

    root: pathlib.Path
    classes: tuple[str, ...] | None = None
    images: int | None = None
    split: bool = True


def resolve_data_source(path: str | os.PathLike, shard: int, num_shards: int) -> DataSource:
    """Decides what ``--data path`` is for worker ``shard`` of ``num_shards``.

    Three cases, told apart by ``manifest.json``:

    * a shard written by ps-data: used whole; the shard index and count its manifest
      records must be ``shard`` and ``num_shards``, so that no two workers train the same
      shard and none is left out;
    * the directory holding all of ps-data's shards: the worker takes ``shard-<shard>``
      from it, with the same check;
    * no manifest: a whole ImageFolder tree, split on the fly (``split=True``).

    Raises:
        DataError: a missing directory, a bad shard index, a mismatch with the manifest,
            a missing or foreign shard directory, or ps-data's validation split.
    """
    root = pathlib.Path(path)
    if num_shards < 1:
        raise DataError(f"number of shards must be at least 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise DataError(f"shard {shard} is out of range for {num_shards} shards (0..{num_shards - 1})")
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    manifest = read_manifest(root)
    if manifest is None:
        return DataSource(root)
    if manifest["kind"] == "val":
        raise DataError(f"{root} is the held-out validation split written by ps-data; give the worker "
                        "a shard, or the directory that holds all the shards")
    if manifest["num_shards"] != num_shards:
        raise DataError(f"{root} was split by ps-data into {manifest['num_shards']} shards, but this run has "
                        f"{num_shards} (--num-shards, or the server's --workers); split again or match it")
    if manifest["kind"] == "dataset":
        entry = next((s for s in manifest["shards"] if isinstance(s, dict) and s.get("index") == shard), {})
        shard_root = root / entry.get("path", shard_dir_name(shard))
        if not shard_root.is_dir():
            raise DataError(f"{root} has no directory for shard {shard} ({shard_root.name})")
        if not (shard_root / MANIFEST).is_file() or sha256_file(shard_root / MANIFEST) != entry.get("manifest_sha256"):
            raise DataError(f"{shard_root} does not belong to the split in {root} (its manifest differs)")
        root, manifest = shard_root, read_manifest(shard_root)
    if manifest["kind"] != "shard" or manifest["shard"] != shard:
        raise DataError(f"{root} is shard {manifest.get('shard')} of {manifest['num_shards']} written by ps-data, "
                        f"but this worker is --shard {shard}; point it at its own shard")
    return DataSource(root, tuple(manifest["classes"]), manifest["images"], split=False)
