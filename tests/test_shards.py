"""common/shards.py: stratified splits, manifests and checksums, bad input, and what a worker's --data is."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from conftest import fast_timeouts
from helpers_unit import property_settings
from paramhub.common import shards
from paramhub.common.config import WorkerConfig
from paramhub.common.data import training_shard
from paramhub.common.shards import (DataError, plan_split, read_manifest, resolve_data_source, split_dataset,
                                    val_count, verify_split)
from paramhub.worker.trainer import endless

pytestmark = pytest.mark.timeout(120)

COLOURS = {"cat": (220, 30, 30), "dog": (30, 220, 30), "eel": (30, 30, 220)}


def write_image_folder(root, counts=None, size=16):
    """One directory per class; class c's images are its colour plus a little per-image shade."""
    counts = counts or {name: 12 for name in COLOURS}
    for name, count in counts.items():
        folder = root / name
        folder.mkdir(parents=True)
        base = COLOURS.get(name, (128, 128, 128))
        for i in range(count):
            Image.new("RGB", (size, size), tuple(min(255, v + i) for v in base)).save(folder / f"{name}{i:03d}.png")
    return root


def write_fake_cifar(root, label_names=(b"truck", b"airplane", b"cat"), per_batch=6, protocol=2, seed=0):
    """A tiny cifar-10-batches-py laid out as CIFAR-10's python files are (protocol 2, bytes keys)."""
    root.mkdir(parents=True)
    rng = np.random.RandomState(seed)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": list(label_names), b"num_vis": 3072}, f, protocol=protocol)
    batches = {}
    for b in range(1, 6):
        data = rng.randint(0, 256, size=(per_batch, 3072)).astype(np.uint8)
        labels = [(b + i) % len(label_names) for i in range(per_batch)]
        batches[f"data_batch_{b}"] = (data, labels)
        with open(root / f"data_batch_{b}", "wb") as f:
            pickle.dump({b"batch_label": b"training batch", b"data": data, b"labels": labels,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=protocol)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f, protocol=protocol)
    return batches


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


# -- the plan ---------------------------------------------------------------------------------------


@property_settings(80)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6), num_shards=st.integers(1, 9),
       seed=st.integers(0, 2**32 - 1), val_fraction=st.sampled_from([0.0, 0.1, 0.3]))
def test_plan_is_stratified_disjoint_and_covering(sizes, num_shards, seed, val_fraction):
    classes = [f"c{i}" for i in range(len(sizes))]
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    rng = np.random.RandomState(seed % 1000)
    labels = [labels[i] for i in rng.permutation(len(labels))]  # classes interleaved in the input
    held = [val_count(n, val_fraction) for n in sizes]
    if any(h >= n for h, n in zip(held, sizes)) or sum(sizes) - sum(held) < num_shards:
        with pytest.raises(DataError):
            plan_split(labels, classes, num_shards, seed, val_fraction)
        return
    parts, val = plan_split(labels, classes, num_shards, seed, val_fraction)
    assert sorted(i for p in parts + [val] for i in p) == list(range(len(labels)))  # disjoint and covering
    assert all(p == sorted(p) for p in parts) and val == sorted(val)
    sizes_by_shard = [len(p) for p in parts]
    assert min(sizes_by_shard) >= 1 and max(sizes_by_shard) - min(sizes_by_shard) <= 1
    for c, n in enumerate(sizes):
        per_shard = [sum(labels[i] == c for i in p) for p in parts]
        assert max(per_shard) - min(per_shard) <= 1  # stratified
        assert sum(labels[i] == c for i in val) == held[c]


def test_plan_is_reproducible_and_depends_on_the_seed():
    labels = [i % 4 for i in range(400)]
    classes = ["a", "b", "c", "d"]
    first = plan_split(labels, classes, 5, seed=11, val_fraction=0.1)
    assert plan_split(labels, classes, 5, seed=11, val_fraction=0.1) == first
    assert plan_split(labels, classes, 5, seed=12, val_fraction=0.1) != first
    torch.manual_seed(3)
    np.random.seed(3)  # the global generators do not matter
    assert plan_split(labels, classes, 5, seed=11, val_fraction=0.1) == first
    # A shuffle, not blocks: the held-out images of class "a" are not its first ten.
    assert [i for i in first[1] if labels[i] == 0] != list(range(0, 40, 4))


@pytest.mark.parametrize("size, fraction, expected", [(10, 0.0, 0), (10, 0.1, 1), (10, 0.25, 3), (50, 0.01, 1),
                                                      (1000, 0.05, 50), (3, 0.9, 3)])
def test_val_count(size, fraction, expected):
    assert val_count(size, fraction) == expected


@pytest.mark.parametrize("labels, num_shards, seed, fraction, message", [
    ([0, 0, 1], 4, 0, 0.0, "cannot fill 4 shards"),
    ([0, 0, 0], 1, 0, 0.0, "class 'b' has no images"),
    ([0, 0, 1], 1, 0, 0.2, "class 'b' has 1 image"),
    ([0, 1, 0, 1], 0, 0, 0.0, "at least 1"),
    ([0, 1, 0, 1], 1, 0, 1.0, "[0, 1)"),
    ([0, 1, 0, 1], 1, -1, 0.0, "seed"),
])
def test_plan_refuses_what_cannot_be_split(labels, num_shards, seed, fraction, message):
    with pytest.raises(DataError) as info:
        plan_split(labels, ["a", "b"], num_shards, seed, fraction)
    assert message in str(info.value)


def test_a_class_smaller_than_the_shard_count_is_allowed():
    """Stratified splitting only needs every shard to get an image; a rare class reaches some shards."""
    labels = [0] * 9 + [1] * 2
    parts, _ = plan_split(labels, ["common", "rare"], 3)
    assert sorted(sum(labels[i] == 1 for i in p) for p in parts) == [0, 1, 1]
    assert all(p for p in parts)


# -- splitting an ImageFolder ---------------------------------------------------------------------------


def test_split_image_folder_writes_shards_val_and_manifests(tmp_path):
    src = write_image_folder(tmp_path / "train")
    out = tmp_path / "split"
    top = split_dataset(src, out, 4, seed=5, val_fraction=0.25)

    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000", "shard-00001", "shard-00002",
                                                     "shard-00003", "val"]
    assert json.loads((out / "manifest.json").read_text()) == top
    assert top["format"] == "paramhub-data" and top["format_version"] == 1 and top["kind"] == "dataset"
    assert top["source"] == {"type": "imagefolder", "path": str(src.resolve())}
    assert top["seed"] == 5 and top["num_shards"] == 4 and top["classes"] == ["cat", "dog", "eel"]
    assert top["val"]["images_per_class"] == {"cat": 3, "dog": 3, "eel": 3}  # 25% of 12
    assert top["images"] == 27 and [s["images"] for s in top["shards"]] == [7, 7, 7, 6]
    for name in COLOURS:
        assert sorted(s["images_per_class"][name] for s in top["shards"]) == [2, 2, 2, 3]

    seen = Counter()
    for entry in top["shards"] + [top["val"]]:
        part = out / entry["path"]
        manifest = read_manifest(part)
        assert sha(part / "manifest.json") == entry["manifest_sha256"]
        assert manifest["images_per_class"] == entry["images_per_class"]
        assert sorted(d.name for d in part.iterdir() if d.is_dir()) == ["cat", "dog", "eel"]
        files = image_files(part)
        assert sorted(manifest["files"]) == [f.relative_to(part).as_posix() for f in files]
        for f in files:
            assert manifest["files"][f.relative_to(part).as_posix()] == sha(f)
            original = src / f.parent.name / f.name  # same class directory, same name
            assert f.read_bytes() == original.read_bytes()
            assert os.path.samefile(f, original)  # hard-linked by default
            seen[original] += 1
        if entry is top["val"]:
            assert manifest["kind"] == "val"
        else:
            assert manifest["kind"] == "shard" and manifest["shard"] == entry["index"] and manifest["num_shards"] == 4
    assert seen == Counter({p: 1 for p in image_files(src)})  # every image exactly once: disjoint, covering
    assert verify_split(out) == []
    assert siblings(out) == ["split", "train"]  # no temporary directory left next to it


def test_the_split_is_readable_by_others_as_the_umask_allows(tmp_path):
    src = write_image_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    old = os.umask(0o022)
    try:
        split_dataset(src, tmp_path / "out", 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "shard-00000" / "cat").stat().st_mode) == 0o755


def test_split_is_reproducible(tmp_path):
    src = write_image_folder(tmp_path / "train")
    split_dataset(src, tmp_path / "a", 3, seed=9, val_fraction=0.1)
    split_dataset(src, tmp_path / "b", 3, seed=9, val_fraction=0.1)
    split_dataset(src, tmp_path / "c", 3, seed=10, val_fraction=0.1)
    for part in ["manifest.json", "shard-00000/manifest.json", "shard-00002/manifest.json", "val/manifest.json"]:
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes()
    files = {name: read_manifest(tmp_path / name / "shard-00000")["files"] for name in ("a", "c")}
    assert files["a"] != files["c"]


def test_copy_instead_of_hard_links(tmp_path):
    src = write_image_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    split_dataset(src, tmp_path / "out", 1, copy=True)
    copied = tmp_path / "out" / "shard-00000" / "cat" / "cat000.png"
    assert copied.read_bytes() == (src / "cat" / "cat000.png").read_bytes()
    assert not os.path.samefile(copied, src / "cat" / "cat000.png")


def test_nested_files_inside_a_class_keep_their_path(tmp_path):
    src = write_image_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    (src / "cat" / "more").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(src / "cat" / "more" / "x.png")
    (src / "cat" / "notes.txt").write_text("not an image")  # ignored, as ImageFolder ignores it
    split_dataset(src, tmp_path / "out", 1)
    manifest = read_manifest(tmp_path / "out" / "shard-00000")
    assert sorted(manifest["files"]) == ["cat/cat000.png", "cat/cat001.png", "cat/more/x.png", "dog/dog000.png",
                                         "dog/dog001.png"]


# -- splitting CIFAR-10's python batches --------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_split_cifar_writes_pngs_with_the_original_pixels(tmp_path, protocol):
    batches = write_fake_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    names = ["truck", "airplane", "cat"]  # label i of the batches is names[i]
    # torchvision's root (the parent of cifar-10-batches-py) works as well as the directory itself.
    top = split_dataset(tmp_path, tmp_path / "out", 2, seed=1, val_fraction=0.2)
    assert top["source"]["type"] == "cifar10" and top["classes"] == ["airplane", "cat", "truck"]
    assert top["images"] + top["val"]["images"] == 30
    found = 0
    for part in ["shard-00000", "shard-00001", "val"]:
        for f in image_files(tmp_path / "out" / part):
            batch, index = f.stem.rsplit("-", 1)
            data, labels = batches[batch]
            assert f.parent.name == names[labels[int(index)]]
            expected = data[int(index)].reshape(3, 32, 32).transpose(1, 2, 0)
            assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), expected)
            found += 1
    assert found == 30  # test_batch is not part of the split
    assert verify_split(tmp_path / "out") == []


def test_cifar_reader_refuses_a_pickle_that_would_run_code(tmp_path):
    write_fake_cifar(tmp_path / "cifar")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(tmp_path / "cifar" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f)
    with pytest.raises(DataError, match="not allowed"):
        split_dataset(tmp_path / "cifar", tmp_path / "out", 1)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "data_batch_3").unlink(), "has no data_batch_3"),
    (lambda d: (d / "data_batch_1").write_bytes(b"\x80\x02garbage"), "not a readable CIFAR-10"),
    (lambda d: pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
                           open(d / "data_batch_4", "wb")), "N x 3072"),
    (lambda d: pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 7]},
                           open(d / "data_batch_4", "wb")), "labels must lie in 0..2"),
    (lambda d: pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
                           open(d / "data_batch_4", "wb")), "1 labels for 2 images"),
    (lambda d: pickle.dump({b"label_names": [b"a", b"../up", b"c"]}, open(d / "batches.meta", "wb")), "directory name"),
])
def test_malformed_cifar_is_refused(tmp_path, damage, message):
    write_fake_cifar(tmp_path / "cifar")
    damage(tmp_path / "cifar")
    with pytest.raises(DataError) as info:
        split_dataset(tmp_path / "cifar", tmp_path / "out", 1)
    assert message in str(info.value)
    assert siblings(tmp_path / "out") == ["cifar"]


# -- bad input and output: a clear error, nothing written ------------------------------------------------------


def corrupt(src):
    (src / "dog" / "dog003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really")


def truncate(src):
    data = (src / "eel" / "eel001.png").read_bytes()
    (src / "eel" / "eel001.png").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("prepare, num_shards, fraction, message", [
    (lambda root: None, 2, 0.0, "does not exist"),
    (lambda root: root.mkdir(), 2, 0.0, "no class sub-directories"),
    (lambda root: (write_image_folder(root, {"cat": 3}), (root / "dog").mkdir()), 2, 0.0, "class 'dog' has no images"),
    (lambda root: (write_image_folder(root, {"cat": 3}), (root / "dog").mkdir(),
                   (root / "dog" / "a.txt").write_text("x")), 2, 0.0, "class 'dog' has no images"),
    (lambda root: write_image_folder(root, {"cat": 2, "dog": 2}), 5, 0.0, "4 training image(s) cannot fill 5 shards"),
    (lambda root: write_image_folder(root, {"cat": 4, "dog": 4}), 7, 0.25, "6 training image(s) cannot fill 7"),
    (lambda root: write_image_folder(root, {"cat": 4, "dog": 1}), 1, 0.1, "class 'dog' has 1 image"),
    (lambda root: corrupt(write_image_folder(root)), 2, 0.0, "dog003.png: not a readable image"),
    (lambda root: truncate(write_image_folder(root)), 2, 0.0, "eel001.png: not a readable image"),
], ids=["missing", "empty", "class-without-images", "class-without-image-files", "more-shards-than-images",
        "more-shards-than-training-images", "class-too-small-for-val", "corrupt-image", "truncated-image"])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, prepare, num_shards, fraction, message):
    src = tmp_path / "train"
    prepare(src)
    before = siblings(src) if src.exists() else []
    with pytest.raises(DataError) as info:
        split_dataset(src, tmp_path / "out", num_shards, val_fraction=fraction)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()
    assert (siblings(src) if src.exists() else []) == before


def test_every_unreadable_image_is_named(tmp_path):
    src = write_image_folder(tmp_path / "train")
    corrupt(src)
    truncate(src)
    with pytest.raises(DataError) as info:
        split_dataset(src, tmp_path / "out", 2)
    assert "2 unreadable image(s)" in str(info.value)
    assert "dog003.png" in str(info.value) and "eel001.png" in str(info.value)


def test_existing_output_needs_force(tmp_path):
    src = write_image_folder(tmp_path / "train", {"cat": 3, "dog": 3})
    out = tmp_path / "out"
    out.mkdir()
    split_dataset(src, out, 1)  # an empty directory is fine
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty; pass --force"):
        split_dataset(src, out, 2)
    assert (out / "keep.txt").read_text() == "mine" and read_manifest(out)["num_shards"] == 1
    split_dataset(src, out, 2, force=True)
    assert not (out / "keep.txt").exists() and read_manifest(out)["num_shards"] == 2
    assert siblings(out) == ["out", "train"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        split_dataset(src, tmp_path / "file", 1)


@pytest.mark.parametrize("out", ["train", "train/shards", "."])
def test_output_may_not_overlap_the_input(tmp_path, out):
    src = write_image_folder(tmp_path / "train", {"cat": 3, "dog": 3})
    with pytest.raises(DataError, match="overlaps the input"):
        split_dataset(src, tmp_path / out, 1, force=True)
    assert sorted(p.name for p in src.iterdir()) == ["cat", "dog"]


def test_a_failure_while_writing_leaves_nothing_and_keeps_the_old_output(tmp_path, monkeypatch):
    src = write_image_folder(tmp_path / "train")
    out = tmp_path / "out"
    split_dataset(src, out, 2, seed=1)
    old = (out / "manifest.json").read_bytes()
    real_write, calls = shards.ImageFolderSource.write, []

    def failing_write(self, index, dst, copy=False):
        calls.append(index)
        if len(calls) >= 20:
            raise OSError(28, "No space left on device")
        return real_write(self, index, dst, copy)

    monkeypatch.setattr(shards.ImageFolderSource, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        split_dataset(src, out, 3, seed=2, force=True, threads=4)
    assert len(calls) >= 20
    assert (out / "manifest.json").read_bytes() == old and verify_split(out) == []
    assert siblings(out) == ["out", "train"]


def test_verify_finds_changed_missing_and_unlisted_files(tmp_path):
    src = write_image_folder(tmp_path / "train", {"cat": 4, "dog": 4})
    out = tmp_path / "out"
    split_dataset(src, out, 2, copy=True)
    shard = out / "shard-00001"
    changed, missing = image_files(shard)[:2]
    Image.new("RGB", (16, 16), (0, 0, 0)).save(changed)
    missing.unlink()
    (shard / "dog" / "stray.png").write_bytes(changed.read_bytes())
    problems = verify_split(out)
    assert len(problems) == 3
    assert any(str(changed) in p and "checksum" in p for p in problems)
    assert any(str(missing) in p and "missing" in p for p in problems)
    assert any("stray.png" in p and "not in the manifest" in p for p in problems)
    assert verify_split(shard) == problems  # a shard on its own checks the same way
    assert verify_split(out / "shard-00000") == []
    with pytest.raises(DataError, match="no ps-data manifest.json"):
        verify_split(src)


# -- what a worker's --data is ---------------------------------------------------------------------------------


@pytest.fixture
def split_dir(tmp_path):
    """cat 12, dog 12, eel 2 images in 3 shards and val (3 + 3 + 1): eel's one training image is in one shard."""
    src = write_image_folder(tmp_path / "train", {"cat": 12, "dog": 12, "eel": 2})
    split_dataset(src, tmp_path / "split", 3, seed=4, val_fraction=0.25)
    return tmp_path / "split"


def labels_and_colours(dataset):
    """(label, dominant channel) of every sample; the colour says which class an image really is."""
    pairs = []
    for image, label in dataset:
        pairs.append((label, int(image.mean((1, 2)).argmax())))
    return pairs


def test_a_whole_image_folder_is_split_on_the_fly(split_dir):
    src = split_dir.parent / "train"
    where = resolve_data_source(src, 1, 3)
    assert where.root == src and where.split and where.classes is None and where.images is None
    parts = [training_shard(str(src), i, 3, num_classes=3, image_size=16, augment="none") for i in range(3)]
    assert sorted(i for p in parts for i in p.indices) == list(range(26))


def test_a_shard_directory_is_used_whole_with_the_manifest_labels(split_dir):
    top = read_manifest(split_dir)
    lacking = next(s for s in top["shards"] if s["images_per_class"]["eel"] == 0)
    shard_dir = split_dir / lacking["path"]
    where = resolve_data_source(shard_dir, lacking["index"], 3)
    assert where == shards.DataSource(shard_dir, ("cat", "dog", "eel"), lacking["images"], split=False)
    # ps-data wrote an empty eel/ here; a copy through object storage (no empty directories) loses it.
    (shard_dir / "eel").rmdir()
    data = training_shard(str(shard_dir), lacking["index"], 3, num_classes=3, image_size=16, augment="none")
    assert len(data) == lacking["images"]
    pairs = labels_and_colours(data)
    # cat is red (channel 0) and label 0, dog is green and label 1: labels match what the images are,
    # though this shard has no eel images at all.
    assert sorted(set(pairs)) == [(0, 0), (1, 1)]
    # The same shard, picked from the directory holding all shards.
    from_top = training_shard(str(split_dir), lacking["index"], 3, num_classes=3, image_size=16, augment="none")
    assert [s[0] for s in from_top.dataset.samples] == [s[0] for s in data.dataset.samples]
    # A model with more outputs than classes is fine; with fewer it is not.
    assert len(training_shard(str(shard_dir), lacking["index"], 3, num_classes=10, image_size=16)) == len(data)
    with pytest.raises(DataError, match="3 classes"):
        training_shard(str(shard_dir), lacking["index"], 3, num_classes=2, image_size=16)


def test_the_directory_of_all_shards_gives_each_worker_its_own(split_dir):
    parts = [training_shard(str(split_dir), i, 3, num_classes=3, image_size=16, augment="none") for i in range(3)]
    paths = [[os.path.relpath(p, split_dir) for p, _ in part.dataset.samples] for part in parts]
    assert [{p.split(os.sep)[0] for p in ps} for ps in paths] == [{"shard-00000"}, {"shard-00001"}, {"shard-00002"}]
    assert sum(len(p) for p in parts) == read_manifest(split_dir)["images"] == 19
    assert all(label == colour for part in parts for label, colour in labels_and_colours(part))


@pytest.mark.parametrize("where, shard, num_shards, message", [
    ("shard-00001", 2, 3, "is shard 1 of 3 written by ps-data, but this worker is --shard 2"),
    ("shard-00001", 1, 4, "split by ps-data into 3 shards, but this run has 4"),
    (".", 0, 2, "split by ps-data into 3 shards, but this run has 2"),
    ("val", 0, 3, "held-out validation split"),
    (".", 3, 3, "out of range"),
    ("missing", 0, 3, "does not exist"),
])
def test_a_worker_that_does_not_match_the_split_is_refused(split_dir, where, shard, num_shards, message):
    with pytest.raises(DataError) as info:
        training_shard(str(split_dir / where), shard, num_shards, num_classes=3, image_size=16)
    assert message in str(info.value)


def test_a_damaged_split_is_refused(split_dir):
    # A shard directory swapped in from another split.
    other = split_dir.parent / "other"
    split_dataset(split_dir.parent / "train", other, 3, seed=99)
    os.rename(split_dir / "shard-00002", split_dir.parent / "moved")
    os.rename(other / "shard-00002", split_dir / "shard-00002")
    with pytest.raises(DataError, match="does not belong to the split"):
        resolve_data_source(split_dir, 2, 3)
    os.rename(split_dir / "shard-00002", split_dir.parent / "gone")
    with pytest.raises(DataError, match="no directory for shard 2"):
        resolve_data_source(split_dir, 2, 3)
    # An image removed from a shard, and a class directory the manifest does not list.
    shard = split_dir / "shard-00000"
    image_files(shard)[0].unlink()
    with pytest.raises(DataError, match="manifest lists"):
        training_shard(str(shard), 0, 3, num_classes=3, image_size=16)
    (shard / "zebra").mkdir()
    with pytest.raises(DataError, match="does not list: zebra"):
        training_shard(str(shard), 0, 3, num_classes=3, image_size=16)


def test_manifests_that_cannot_be_used(tmp_path, split_dir):
    shard = split_dir / "shard-00000"
    manifest = json.loads((shard / "manifest.json").read_text())
    (shard / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(DataError, match="format version 2"):
        resolve_data_source(shard, 0, 3)
    (shard / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    with pytest.raises(DataError, match="'files' is missing"):
        resolve_data_source(shard, 0, 3)
    (shard / "manifest.json").write_text('{"format": "paramhub-da')
    with pytest.raises(DataError, match="cannot be read as JSON"):
        resolve_data_source(shard, 0, 3)
    # Some other tool's manifest.json in a plain ImageFolder tree is not ours: the tree is split on the fly.
    src = split_dir.parent / "train"
    (src / "manifest.json").write_text(json.dumps({"files": 3}))
    assert resolve_data_source(src, 0, 2).split


# -- --epochs ------------------------------------------------------------------------------------------------


def test_endless_stops_after_the_given_epochs():
    loader = DataLoader(list(range(10)), batch_size=4)  # 3 batches an epoch
    assert len(list(endless(loader, epochs=2))) == 6
    forever = endless(loader)
    assert len([next(forever) for _ in range(10)]) == 10


@pytest.mark.parametrize("update", ["grad", "avg"])
def test_worker_with_epochs_trains_its_shard_that_many_times_then_leaves(start_server, connect, split_dir, update):
    from paramhub.worker.trainer import Trainer

    server = start_server(model="mlp", num_classes=3, workers=1, max_steps=1000, update=update, local_steps=2)
    shard = read_manifest(split_dir / "shard-00001")
    config = WorkerConfig(server=f"127.0.0.1:{server.port}", shard=1, num_shards=3, data=str(split_dir),
                          batch_size=2, image_size=16, epochs=2, log_every=0, timeouts=fast_timeouts())
    summary = Trainer(config, connect(server.port)).run()
    batches = shard["images"] // 2  # drop_last
    steps = 2 * batches // (1 if update == "grad" else 2)  # avg: two local steps per push
    assert summary.steps == steps and summary.pushes_accepted == steps
    assert server.store.version == steps
    assert not any(w.alive for w in server.registry.trainers())  # it left
