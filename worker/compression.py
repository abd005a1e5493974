"""Top-k sparsification of updates with error feedback.

Each push sends only the k largest-magnitude elements of (update + residual);
what was not sent stays in the residual and is added to the next update, so no
part of the gradient is lost, only delayed (the "error feedback" that makes
top-k converge like dense SGD).
"""

from __future__ import annotations

import torch


class TopKErrorFeedback:
    """Keeps one residual per PARAM region and picks the top ``ratio`` of each update.

    Args:
        ratio: fraction of elements sent per push (0 < ratio <= 1).
        like: the update tensors per region, for the residuals' shapes.
    """

    def __init__(self, ratio: float, like: dict[int, torch.Tensor]):
        if not 0 < ratio <= 1:
            raise ValueError(f"top-k ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self.residual = {r: torch.zeros_like(t) for r, t in like.items()}

    def compress(self, update: dict[int, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """(sorted indices, values) per region; the residuals keep everything not sent."""
        out = {}
        for r, u in update.items():
            acc = self.residual[r].add_(u)
            k = max(1, int(self.ratio * acc.numel()))
            _, indices = torch.topk(acc.abs(), k, sorted=False)
            indices, _ = indices.sort()
            out[r] = (indices, acc[indices].clone())
            acc[indices] = 0
        return out
