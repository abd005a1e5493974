"""Precise BN (common.evaluation.recompute_batchnorm_stats) against an independent reference, and where it is used.

The reference: after recomputation a BatchNorm layer's running_mean / running_var are the
plain mean and unbiased variance (per channel) of every activation it was fed, worked out
here with torch.mean / torch.var over the concatenated batches. Negative controls show the
check can fail: torch's running statistics with momentum 0.1 (what training leaves behind,
the lag precise BN fixes) and torch's own cumulative average (momentum=None) both miss it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from paramhub.common.data import DataError
from paramhub.common.evaluation import (PreciseBN, evaluate, evaluation_dataset, frozen_batchnorm_names,
                                        precise_bn_dataset, recompute_batchnorm_stats)
from paramhub.common.models import build_model
from paramhub.common.shards import split_dataset

pytestmark = pytest.mark.timeout(120)
TOL = dict(rtol=1e-5, atol=1e-5)


def write_image_folder(root, classes: int = 3, per_class: int = 8, size: int = 20) -> None:
    """A tiny ImageFolder: class c is a noisy colour; PNGs of ``size`` px."""
    gen = torch.Generator().manual_seed(len(str(root)))
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        base = torch.tensor([60 + 60 * c, 200 - 50 * c, 90.0]).view(3, 1, 1).expand(3, size, size)
        for i in range(per_class):
            pixels = (base + 50 * torch.randn(3, size, size, generator=gen)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(root / f"class{c}" / f"{i:02d}.png")


def uneven_batches(channels: int = 3, sizes=(5, 7, 4, 6), spatial: int = 6, seed: int = 0) -> list[torch.Tensor]:
    """Batches of different sizes whose means differ a lot from batch to batch (as when the data drifts)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, spatial, spatial, generator=gen) * (1 + i) + 3 * i - 2
            for i, n in enumerate(sizes)]


def reference(activations: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    everything = torch.cat(activations)
    return torch.mean(everything, dim=(0, 2, 3)), torch.var(everything, dim=(0, 2, 3))  # var: unbiased


def matches(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> bool:
    return torch.allclose(bn.running_mean, mean, **TOL) and torch.allclose(bn.running_var, var, **TOL)


def stale_bn(channels: int = 3) -> nn.BatchNorm2d:
    """A BatchNorm layer whose running statistics come from other data, as after training."""
    bn = nn.BatchNorm2d(channels)
    bn.train()
    with torch.no_grad():
        for x in uneven_batches(channels, seed=99):
            bn(x * 0.3 + 5)
    return bn.eval()


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class TwoBN(nn.Module):
    """conv → bn1 → conv2 → bn2: bn2's input depends on how bn1 normalises."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv(x)))))


# -- the reference and its negative controls ---------------------------------------------------


@pytest.mark.parametrize("was_training", [False, True])
def test_one_batchnorm2d_gets_the_mean_and_unbiased_variance_of_all_its_inputs(was_training):
    batches = uneven_batches()
    bn = stale_bn()
    bn.train(was_training)
    mean, var = reference(batches[:3])
    assert not matches(bn, mean, var)  # stale before

    done = recompute_batchnorm_stats(bn, iter(batches), num_batches=3)

    assert (done.layers, done.skipped, done.batches, done.samples) == (1, 0, 3, 16)
    torch.testing.assert_close(bn.running_mean, mean, **TOL)
    torch.testing.assert_close(bn.running_var, var, **TOL)
    assert bn.num_batches_tracked.item() == 3
    assert bn.momentum == 0.1 and bn.training is was_training  # restored
    assert bn.weight.equal(torch.ones(3)) and bn.bias.equal(torch.zeros(3))  # parameters untouched


def test_negative_control_momentum_0_1_running_stats_do_not_match_the_reference():
    """What training leaves: an exponential average with momentum 0.1, dominated by the last batches."""
    batches = uneven_batches()
    mean, var = reference(batches)
    bn = stale_bn()
    bn.reset_running_stats()
    bn.train()
    with torch.no_grad():
        for x in batches:
            bn(x)
    assert bn.momentum == 0.1
    assert not torch.allclose(bn.running_mean, mean, **TOL) and not torch.allclose(bn.running_var, var, **TOL)
    recompute_batchnorm_stats(bn, batches, num_batches=len(batches))
    assert matches(bn, mean, var)  # the same layer, the same batches: recomputed, it does


def test_negative_control_torch_cumulative_average_misses_the_variance_between_batches():
    """momentum=None averages the per-batch variances: not the variance of all the inputs, when batch means differ."""
    batches = uneven_batches(sizes=(6, 6, 6, 6))  # equal sizes: its mean is right, its variance is not
    mean, var = reference(batches)
    bn = nn.BatchNorm2d(3, momentum=None)
    bn.train()
    with torch.no_grad():
        for x in batches:
            bn(x)
    torch.testing.assert_close(bn.running_mean, mean, **TOL)
    assert not torch.allclose(bn.running_var, var, rtol=0.05)


def test_a_tiny_conv_bn_model_recomputes_from_the_conv_outputs_and_keeps_its_weights():
    torch.manual_seed(0)
    model = ConvBN().eval()
    batches = [(x, torch.zeros(len(x), dtype=torch.long)) for x in uneven_batches()]  # (images, labels) batches
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        mean, var = reference([model.conv(x) for x, _ in batches])

    done = recompute_batchnorm_stats(model, batches, num_batches=10)  # more than there are: all 4

    assert (done.layers, done.batches, done.samples) == (1, 4, 22)
    torch.testing.assert_close(model.bn.running_mean, mean, **TOL)
    torch.testing.assert_close(model.bn.running_var, var, **TOL)
    assert model.bn.num_batches_tracked.item() == 4
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    assert not model.training and not model.bn.training


def test_skipped_layers_keep_their_statistics_and_normalise_with_them_during_the_pass():
    torch.manual_seed(1)
    model = TwoBN()
    model.bn1.running_mean.fill_(0.5)
    model.bn1.running_var.fill_(2.0)
    model.train()
    model.bn1.eval()  # as a worker keeps a frozen backbone's BatchNorm
    frozen = frozen_batchnorm_names(model, {"conv.weight", "conv.bias", "bn1.weight", "bn1.bias"})
    assert frozen == {"bn1"}
    batches = uneven_batches()
    bn1_before = {k: v.clone() for k, v in model.bn1.state_dict().items()}
    with torch.no_grad():  # bn1 in eval mode, with its own statistics
        mean, var = reference([model.conv2(torch.relu(model.bn1(model.conv(x)))) for x in batches])

    done = recompute_batchnorm_stats(model, batches, num_batches=4, skip=frozen)

    assert (done.layers, done.skipped) == (1, 1)
    for key, value in model.bn1.state_dict().items():
        assert torch.equal(value, bn1_before[key]), key
    torch.testing.assert_close(model.bn2.running_mean, mean, **TOL)
    torch.testing.assert_close(model.bn2.running_var, var, **TOL)
    assert model.training and model.bn2.training and not model.bn1.training  # every module's own flag back


def test_a_model_without_batchnorm_is_left_alone_and_no_batch_is_read():
    model = build_model("mlp", 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def never():
        raise AssertionError("a batch was read")
        yield

    done = recompute_batchnorm_stats(model, never(), num_batches=5)
    assert (done.layers, done.batches, done.samples) == (0, 0, 0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_resnet18_statistics_depend_on_the_weights_and_the_data_only():
    """Two copies with the same weights and different running statistics end with identical ones."""
    model = build_model("resnet18", 3, seed=2)
    other = copy.deepcopy(model)
    other.train()
    with torch.no_grad():
        other(torch.randn(4, 3, 16, 16) * 3 + 1)  # different running statistics, same weights
    batches = [torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    first = recompute_batchnorm_stats(model, batches, num_batches=3)
    recompute_batchnorm_stats(other, batches, num_batches=3)
    assert first.layers == 20 and first.batches == 3
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_failure_midway_restores_the_statistics_momentum_and_mode():
    bn = stale_bn()
    before = {k: v.clone() for k, v in bn.state_dict().items()}

    def batches():
        yield torch.randn(4, 3, 5, 5)
        raise OSError("disk gone")

    with pytest.raises(OSError):
        recompute_batchnorm_stats(bn, batches(), num_batches=3)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert bn.momentum == 0.1 and not bn.training


def test_bad_arguments_are_refused():
    bn = stale_bn()
    with pytest.raises(ValueError, match="at least 1"):
        recompute_batchnorm_stats(bn, [], num_batches=0)
    with pytest.raises(ValueError, match="no batches"):
        recompute_batchnorm_stats(bn, [], num_batches=2)
    with pytest.raises(ValueError, match="not BatchNorm layers of the model: conv"):
        recompute_batchnorm_stats(ConvBN(), [], num_batches=2, skip={"conv"})


# -- the data: training images through the evaluation transform ---------------------------------


def test_precise_bn_data_is_an_imagefolder_a_shard_or_all_shards_and_never_val(tmp_path):
    write_image_folder(tmp_path / "images", classes=3, per_class=6)
    split_dataset(tmp_path / "images", tmp_path / "split", 2, val_fraction=0.2)
    whole = precise_bn_dataset(tmp_path / "images", num_classes=3, image_size=16)
    every_shard = precise_bn_dataset(tmp_path / "split", num_classes=3, image_size=16)
    one_shard = precise_bn_dataset(tmp_path / "split" / "shard-00000", num_classes=3, image_size=16)
    assert len(whole) == 18 and len(every_shard) == 18 - 3 and len(one_shard) in (7, 8)
    assert whole[0][0].shape == (3, 16, 16)  # eval_transform: resize + center crop to 16
    with pytest.raises(DataError, match="held-out validation split"):
        precise_bn_dataset(tmp_path / "split" / "val", num_classes=3, image_size=16)


def test_bad_precise_bn_data_gets_a_clear_error(tmp_path):
    write_image_folder(tmp_path / "images", classes=3, per_class=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-images" / "a").mkdir(parents=True)
    cases = [(tmp_path / "missing", 3, "does not exist"), (tmp_path / "empty", 3, "not an ImageFolder"),
             (tmp_path / "no-images", 3, "not an ImageFolder"),
             (tmp_path / "images", 5, "has 3 classes but the model has 5")]
    for source, classes, message in cases:
        with pytest.raises(DataError, match=message):
            precise_bn_dataset(source, num_classes=classes, image_size=16)


def test_precise_bn_uses_the_same_shuffled_batches_every_time(tmp_path):
    write_image_folder(tmp_path / "images", classes=3, per_class=8)
    precise = PreciseBN(tmp_path / "images", num_classes=3, image_size=16, batch_size=5, num_batches=2)
    first, second = list(precise.loader()), list(precise.loader())
    assert [len(x) for x, _ in first] == [5] * 4  # full batches only
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert len(set(first[0][1].tolist())) > 1  # shuffled: not one class per batch, as ImageFolder's order would be


# -- the server's own evaluation ----------------------------------------------------------------


def test_server_evaluation_with_precise_bn_records_both_top1_and_keeps_the_recomputed_model(tmp_path):
    from paramhub.common.checkpoint import load_checkpoint
    from paramhub.ps.evaluation import ServerEvaluator

    write_image_folder(tmp_path / "train", classes=3, per_class=8)
    write_image_folder(tmp_path / "val", classes=3, per_class=3)
    model = build_model("resnet18", 3, seed=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    evaluator = ServerEvaluator("resnet18", 3, str(tmp_path / "val"), 5, image_size=16, size=0, batch_size=6,
                                out_dir=str(tmp_path / "out"), facts={"model": "resnet18", "num_classes": 3,
                                                                      "layout_hash": "h"},
                                precise_bn_data=str(tmp_path / "train"), precise_bn_batches=3)
    record = evaluator.run(5, state)

    val = DataLoader(evaluation_dataset(tmp_path / "val", num_classes=3, image_size=16), batch_size=6)
    assert record["top1_running_stats"] == evaluate(model, val, "cpu").top1
    PreciseBN(tmp_path / "train", num_classes=3, image_size=16, batch_size=6, num_batches=3).apply(model, "cpu")
    expected = evaluate(model, val, "cpu")
    assert (record["top1"], record["samples"]) == (expected.top1, 9)
    assert record["loss"] == pytest.approx(expected.loss, rel=1e-6)
    saved = json.loads((tmp_path / "out" / "server_metrics.jsonl").read_text())
    assert saved["top1_running_stats"] == record["top1_running_stats"]
    best, _, _ = load_checkpoint(tmp_path / "out" / "best" / "best.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(best[name], tensor), name  # the recomputed statistics, the same weights
    assert not torch.equal(best["bn1.running_var"], state["bn1.running_var"])


def test_server_refuses_precise_bn_without_its_evaluation():
    from click.testing import CliRunner

    from paramhub.ps.cli import main

    result = CliRunner().invoke(main, ["--eval-precise-bn-data", "train", "--model", "mlp"])
    assert result.exit_code == 2 and "needs --eval-data" in result.output
