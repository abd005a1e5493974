"""common/data.py: shard splitting, synthetic data, ImageFolder shards, transforms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms

from helpers_unit import property_settings
from paramhub.common import data
from paramhub.common.data import DataError, SyntheticImages, shard_indices, train_transform, training_shard

pytestmark = pytest.mark.timeout(60)


# -- shards --------------------------------------------------------------------------------------


@property_settings(60)
@given(num_samples=st.integers(1, 500), num_shards=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_shards_are_disjoint_covering_balanced(num_samples, num_shards, seed):
    if num_samples < num_shards:
        with pytest.raises(DataError):
            shard_indices(num_samples, 0, num_shards, seed)
        return
    shards = [shard_indices(num_samples, i, num_shards, seed) for i in range(num_shards)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(num_samples))  # covering, and disjoint (no index twice)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(s == sorted(s) for s in shards)


def test_shards_are_reproducible_and_depend_on_seed():
    a = shard_indices(1000, 2, 4, seed=7)
    assert a == shard_indices(1000, 2, 4, seed=7)
    assert a != shard_indices(1000, 2, 4, seed=8)
    # The split is a shuffle, not contiguous blocks: every shard sees every label of i % 10.
    assert {i % 10 for i in a} == set(range(10))
    assert a != list(range(500, 750))


def test_shards_do_not_depend_on_global_rng():
    torch.manual_seed(1)
    a = shard_indices(100, 0, 3, seed=0)
    torch.manual_seed(2)
    assert shard_indices(100, 0, 3, seed=0) == a


@pytest.mark.parametrize("args", [(10, -1, 2), (10, 2, 2), (10, 5, 2), (10, 0, 0), (10, 0, -3), (3, 0, 4), (0, 0, 1)])
def test_bad_shard_arguments(args):
    with pytest.raises(DataError):
        shard_indices(*args)


# -- synthetic data ------------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_index():
    a = SyntheticImages(50, 5, 16, seed=3)
    b = SyntheticImages(50, 5, 16, seed=3)
    for i in (0, 7, 49):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert torch.equal(xa, xb) and ya == yb == i % 5
        assert xa.shape == (3, 16, 16) and xa.dtype == torch.float32
    assert torch.equal(a[7][0], a[7][0])
    assert not torch.equal(a[0][0], a[5][0])  # same class, different sample
    assert not torch.equal(a[0][0], SyntheticImages(50, 5, 16, seed=4)[0][0])
    held_out = SyntheticImages(50, 5, 16, seed=3, index_offset=10_000)
    assert torch.equal(held_out.patterns, a.patterns) and not torch.equal(held_out[0][0], a[0][0])
    assert len(a) == 50
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(IndexError):
        a[-1]


def test_synthetic_does_not_depend_on_global_rng():
    torch.manual_seed(0)
    x = SyntheticImages(10, 2, 8, seed=1)[3][0]
    torch.manual_seed(99)
    assert torch.equal(SyntheticImages(10, 2, 8, seed=1)[3][0], x)


def test_synthetic_classes_are_separable():
    """Class means estimated on training samples classify held-out samples almost perfectly."""
    num_classes = 10
    train = SyntheticImages(300, num_classes, 16, seed=0)
    test = SyntheticImages(200, num_classes, 16, seed=0, index_offset=50_000)
    xs = torch.stack([train[i][0] for i in range(len(train))]).flatten(1)
    ys = torch.tensor([train[i][1] for i in range(len(train))])
    centroids = torch.stack([xs[ys == c].mean(0) for c in range(num_classes)])
    xt = torch.stack([test[i][0] for i in range(len(test))]).flatten(1)
    yt = torch.tensor([test[i][1] for i in range(len(test))])
    accuracy = (torch.cdist(xt, centroids).argmin(1) == yt).float().mean().item()
    assert accuracy >= 0.95
    # ...but not trivially: samples are noisy, not copies of their pattern.
    assert (xt[0] - test.patterns[0].flatten()).std() > 0.3


@pytest.mark.parametrize("args", [(0, 2, 8), (10, 0, 8), (10, 2, 0)])
def test_synthetic_rejects_bad_sizes(args):
    with pytest.raises(DataError):
        SyntheticImages(*args)


def test_synthetic_training_shard():
    shards = [training_shard("synthetic", i, 3, num_classes=4, image_size=8, synthetic_size=100) for i in range(3)]
    assert [len(s) for s in shards] == [34, 33, 33]
    assert sorted(i for s in shards for i in s.indices) == list(range(100))
    image, label = shards[1][0]
    assert image.shape == (3, 8, 8) and 0 <= label < 4


# -- ImageFolder -----------------------------------------------------------------------------------


def write_image_folder(root, per_class=(5, 4), size=16):
    for c, count in enumerate(per_class):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(count):
            colour = (255 * c, 40 * i, 128)
            Image.new("RGB", (size, size), colour).save(folder / f"img{i}.png")
    return root


def test_image_folder_training_shard(tmp_path):
    root = write_image_folder(tmp_path / "train")
    shards = [training_shard(str(root), i, 2, num_classes=2, image_size=16, augment="none") for i in range(2)]
    assert [len(s) for s in shards] == [5, 4]
    assert sorted(i for s in shards for i in s.indices) == list(range(9))
    labels = []
    for shard in shards:
        for image, label in shard:
            assert image.shape == (3, 16, 16) and image.dtype == torch.float32
            labels.append(label)
    assert sorted(labels) == [0] * 5 + [1] * 4
    # A model with more classes than the folder is fine; fewer is not.
    assert len(training_shard(str(root), 0, 1, num_classes=10, image_size=16)) == 9
    with pytest.raises(DataError, match="2 classes"):
        training_shard(str(root), 0, 1, num_classes=1, image_size=16)


def test_image_folder_resizes_to_image_size(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=(2, 2), size=16)
    shard = training_shard(str(root), 0, 1, num_classes=2, image_size=12)
    assert all(image.shape == (3, 12, 12) for image, _ in shard)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        training_shard(str(tmp_path / "nope"), 0, 1, num_classes=2, image_size=16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        training_shard(str(empty), 0, 1, num_classes=2, image_size=16)
    (empty / "class0").mkdir()  # class folders without images
    with pytest.raises(DataError):
        training_shard(str(empty), 0, 1, num_classes=2, image_size=16)


def test_image_folder_with_too_few_samples_for_shards(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=(1, 1))
    with pytest.raises(DataError):
        training_shard(str(root), 2, 3, num_classes=2, image_size=16)


# -- transforms --------------------------------------------------------------------------------------


def kinds(compose: transforms.Compose) -> list[type]:
    return [type(t) for t in compose.transforms]


@pytest.mark.parametrize("size, recipe", [(16, "cifar"), (32, "cifar"), (127, "cifar"), (128, "imagenet"),
                                          (224, "imagenet")])
def test_auto_augment_follows_image_size(size, recipe):
    auto = kinds(train_transform(size, "auto"))
    assert auto == kinds(train_transform(size, recipe))
    assert auto == kinds(train_transform(size))  # auto is the default
    if recipe == "imagenet":
        assert transforms.RandomResizedCrop in auto and transforms.RandomCrop not in auto
    else:
        assert transforms.RandomCrop in auto and transforms.RandomResizedCrop not in auto
    assert transforms.RandomHorizontalFlip in auto


def test_recipes_output_normalized_tensors_of_image_size():
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    for recipe in ("imagenet", "cifar", "none"):
        out = train_transform(24, recipe)(image)
        assert out.shape == (3, 24, 24), recipe
    none = kinds(train_transform(24, "none"))
    assert transforms.RandomHorizontalFlip not in none and transforms.Normalize in none
    out = data.eval_transform(32)(image)
    assert out.shape == (3, 32, 32)
    # ImageNet normalisation: a constant green channel 200/255 maps to (0.784 - 0.456) / 0.224.
    torch.testing.assert_close(out[1].mean().item(), (200 / 255 - 0.456) / 0.224, rtol=0, atol=1e-3)


@pytest.mark.parametrize("augment", ["randaugment", "", "ImageNet"])
def test_unknown_augment(augment):
    with pytest.raises(DataError, match="augment"):
        train_transform(32, augment)


def test_evaluation_sees_small_images_whole_as_training_does_and_crops_large_ones():
    """Below 128 px training keeps the whole image (CIFAR crops pad, not zoom): evaluation must too."""
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(40, 30, 3, generator=gen) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    small = data.eval_transform(32)(image)
    torch.testing.assert_close(small, train_transform(32, "none")(image))  # the recipe without randomness
    cropped = transforms.Compose([transforms.Resize(37), transforms.CenterCrop(32), transforms.ToTensor(),
                                  transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])(image)
    assert not torch.allclose(small, cropped)  # the zoomed-in crop (the old behaviour) is not what training saw
    large = kinds(data.eval_transform(224))
    assert transforms.CenterCrop in large and transforms.Resize in large


def test_seeded_augmentation_repeats(tmp_path):
    """Worker r's random crops and flips are the same run after run (and the same as DDP's rank r)."""
    from paramhub.common.data import seed_augmentation, shard_loader, training_shard

    gen = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(8):
            pixels = (torch.rand(20, 20, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")

    def first_batch(shard: int, seeded: bool) -> torch.Tensor:
        data = training_shard(str(tmp_path), shard, 2, num_classes=2, image_size=16, augment="cifar", seed=3)
        loader = shard_loader(data, 4, shard, seed=3)
        if seeded:
            seed_augmentation(3, shard)
        else:
            torch.manual_seed(torch.seed())  # a fresh, unrelated state, as an unseeded process has
        return next(iter(loader))[0]

    torch.testing.assert_close(first_batch(0, True), first_batch(0, True))
    assert not torch.equal(first_batch(0, False), first_batch(0, False))  # the negative control: unseeded differs
