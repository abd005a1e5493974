"""Model factory: torchvision classifiers by name, plus a tiny BN-free model for tests.

Which tensors are the "head" (the classifier) matters for fine-tuning; the rest is
the backbone.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

# Architectures we test. Any torchvision classification model with a ``fc`` head
# would work; keeping the list explicit gives a clear error for typos.
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
SMALL_ARCHS = ("mlp",)
ARCHS = TORCHVISION_ARCHS + SMALL_ARCHS


class SmallMLP(nn.Module):
    """A BatchNorm-free classifier for fast tests and exact-math checks.

    Pools any image to 4x4 so its size does not depend on the input resolution.
    """

    def __init__(self, num_classes: int, hidden: int = 64):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.hidden = nn.Linear(3 * 4 * 4, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.hidden(self.pool(x).flatten(1))))


def build_model(arch: str, num_classes: int, seed: int = 0) -> nn.Module:
    """Builds an untrained model whose initial weights depend only on ``seed``.

    Args:
        arch: a name from ``ARCHS`` (torchvision's resnets, or ``mlp``).
        num_classes: outputs of the classifier head.
        seed: seeds the weight initialisation (the global RNG is left untouched).

    Raises:
        ValueError: for an unknown architecture or a non-positive class count.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown model {arch!r}; choose one of {', '.join(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "mlp":
            return SmallMLP(num_classes)
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def head_names(model: nn.Module) -> list[str]:
    """state_dict keys of the classifier head (``fc``)."""
    return [name for name in model.state_dict() if name.startswith("fc.")]
