"""common/evaluation.py: metrics against a hand computation, eval mode, the held-out datasets."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from paramhub.common.data import DataError, SyntheticImages
from paramhub.common.evaluation import SYNTHETIC_INDEX_OFFSET, Metrics, evaluate, evaluation_dataset

pytestmark = pytest.mark.timeout(120)


class Logits(nn.Module):
    """A "classifier" whose input already is its logits, so the expected metrics can be worked out by hand."""

    def __init__(self):
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return x


def loader(rows: list[list[float]], labels: list[int], batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.tensor(rows), torch.tensor(labels)), batch_size=batch_size)


def cross_entropy(row: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def test_metrics_match_a_hand_computation_across_uneven_batches():
    rows = [
        [5.0, 1.0, 0.0, 0.5, 2.0, 3.0],  # label 0 ranks 1st: top-1 and top-5 hit
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 0 ranks 6th: both miss
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 1 ranks 5th: top-5 hit only
        [3.0, 0.0, 1.0, 0.2, 0.4, 0.6],  # label 2 ranks 2nd: top-5 hit only
        [1.0, 2.0, 0.1, 0.2, 0.3, 0.4],  # label 1 ranks 1st: both hit
    ]
    labels = [0, 0, 1, 2, 1]
    metrics = evaluate(Logits(), loader(rows, labels, batch_size=2), "cpu")
    assert metrics.samples == 5
    assert metrics.top1 == pytest.approx(2 / 5)
    assert metrics.top5 == pytest.approx(4 / 5)
    expected_loss = sum(cross_entropy(r, y) for r, y in zip(rows, labels)) / 5
    assert metrics.loss == pytest.approx(expected_loss, rel=1e-6)


def test_top5_is_top_k_when_there_are_fewer_than_five_classes():
    rows = [[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.5, 0.0, 1.0]]
    labels = [0, 0, 1]
    metrics = evaluate(Logits(), loader(rows, labels, batch_size=3), "cpu")
    assert metrics.top1 == pytest.approx(1 / 3)
    assert metrics.top5 == 1.0  # k = 3: every label is among the top 3
    assert metrics.loss == pytest.approx(sum(cross_entropy(r, y) for r, y in zip(rows, labels)) / 3, rel=1e-6)

    single = evaluate(Logits(), loader([[0.3], [-1.0]], [0, 0], batch_size=1), "cpu")
    assert (single.top1, single.top5, single.loss) == (1.0, 1.0, pytest.approx(0.0))


def test_evaluates_in_eval_mode_and_restores_the_mode():
    model = Logits()
    evaluate(model, loader([[1.0, 0.0]] * 3, [0] * 3, batch_size=2), torch.device("cpu"))
    assert model.modes == [False, False] and model.training
    model.eval()
    evaluate(model, loader([[1.0, 0.0]], [0], batch_size=2), "cpu")
    assert not model.training


def test_batchnorm_statistics_are_used_not_updated():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(2))
    model[1].running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, loader([[1.0, 2.0], [4.0, 0.0]], [0, 1], batch_size=2), "cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        evaluate(Logits(), [], "cpu")


def test_better_than_prefers_top1_then_lower_loss():
    best = Metrics(top1=0.5, top5=0.9, loss=1.0, samples=10)
    assert best.better_than(None)
    assert Metrics(top1=0.6, top5=0.6, loss=9.0, samples=10).better_than(best)
    assert Metrics(top1=0.5, top5=0.1, loss=0.9, samples=10).better_than(best)
    assert not Metrics(top1=0.5, top5=1.0, loss=1.0, samples=10).better_than(best)  # a full tie keeps the old one
    assert not Metrics(top1=0.4, top5=1.0, loss=0.1, samples=10).better_than(best)
    assert best.to_dict() == {"top1": 0.5, "top5": 0.9, "loss": 1.0, "samples": 10}


def test_synthetic_evaluation_set_has_the_training_classes_but_unseen_samples():
    held_out = evaluation_dataset("synthetic", num_classes=3, image_size=8, size=12, seed=5)
    train = SyntheticImages(12, 3, 8, seed=5)
    assert len(held_out) == 12 and held_out.index_offset == SYNTHETIC_INDEX_OFFSET
    torch.testing.assert_close(held_out.patterns, train.patterns)  # same classes ...
    for i in range(12):
        (image, label), (seen, seen_label) = held_out[i], train[i]
        assert label == seen_label and not torch.equal(image, seen)  # ... other samples


def make_image_folder(root, classes: int, per_class: int = 2):
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (30, 20), color=(40 * c, 10 * i, 200)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_image_folder_evaluation_set_is_resized_center_cropped_and_normalised(tmp_path):
    data = evaluation_dataset(make_image_folder(tmp_path / "val", classes=2), num_classes=3, image_size=8)
    image, label = data[0]
    assert image.shape == (3, 8, 8) and label == 0
    blue = (200 / 255 - 0.406) / 0.225  # ImageNet mean/std on a flat colour
    torch.testing.assert_close(image[2], torch.full((8, 8), blue), atol=1e-5, rtol=0)


def test_image_folder_with_too_many_classes_or_missing_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="3 classes but the model has 2"):
        evaluation_dataset(make_image_folder(tmp_path / "val", classes=3, per_class=1), num_classes=2, image_size=8)
    with pytest.raises(DataError, match="does not exist"):
        evaluation_dataset(tmp_path / "nowhere", num_classes=2, image_size=8)
