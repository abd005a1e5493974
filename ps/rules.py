"""Update rules: the server's math, as pure functions on flat tensors.

Nothing here knows about gRPC, workers or rounds. Every function that produces
new global weights returns a fresh tensor instead of writing in place, because
pulls in flight may still be streaming the previous version.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch


def sgd_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of SGD with the exact semantics of ``torch.optim.SGD`` (dampening 0).

    Args:
        params: current weights (not modified).
        grad: the (averaged) gradient.
        momentum_buffer: the previous momentum buffer, or None before the first step.
        lr, momentum, weight_decay, nesterov: as in torch.optim.SGD.

    Returns:
        (new weights, new momentum buffer or None when momentum is 0).
    """
    d_p = grad.add(params, alpha=weight_decay) if weight_decay else grad
    buf = None
    if momentum:
        if momentum_buffer is None:
            buf = d_p.clone()
        else:
            buf = momentum_buffer.mul_(momentum).add_(d_p)
        d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
    return params.add(d_p, alpha=-lr), buf


class UpdateRule(Protocol):
    """Turns an aggregated update of the PARAM region into new weights.

    ``state`` is the rule's own tensors (optimizer buffers); the rule may update
    them in place; they are saved in checkpoints under their keys.
    """

    def apply(self, params: torch.Tensor, update: torch.Tensor, state: dict[str, torch.Tensor],
              version: int) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class SGDRule:
    """Gradient mode: the server runs SGD (momentum, Nesterov, weight decay) on averaged gradients."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def apply(self, params: torch.Tensor, update: torch.Tensor, state: dict[str, torch.Tensor],
              version: int) -> torch.Tensor:
        new_params, buf = sgd_step(params, update, state.get("momentum_buffer"), lr=self.lr,
                                   momentum=self.momentum, weight_decay=self.weight_decay,
                                   nesterov=self.nesterov)
        if buf is not None:
            state["momentum_buffer"] = buf
        return new_params


class WeightedMean:
    """Accumulates a sample-weighted mean of flat tensors in place.

    Memory stays one accumulator per region however many workers contribute.
    Integer tensors (BatchNorm's ``num_batches_tracked``) are averaged in float64
    and rounded.
    """

    def __init__(self, like: list[torch.Tensor]):
        self._sums = [torch.zeros_like(t, dtype=torch.float64 if not t.is_floating_point() else t.dtype)
                      for t in like]
        self._dtypes = [t.dtype for t in like]
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: list[torch.Tensor], weight: float) -> None:
        """Adds ``weight`` × each tensor to the running sums."""
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        for acc, t in zip(self._sums, tensors):
            acc.add_(t.to(acc.dtype), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> list[torch.Tensor]:
        """The weighted means (fresh tensors), in the original dtypes."""
        if not self.count:
            raise ValueError("mean of nothing")
        out = []
        for acc, dtype in zip(self._sums, self._dtypes):
            avg = acc / self.total_weight
            out.append(avg.round().to(dtype) if not dtype.is_floating_point else avg.to(dtype))
        return out

    def reset(self) -> None:
        """Forgets everything added (keeps the memory)."""
        for acc in self._sums:
            acc.zero_()
        self.total_weight = 0.0
        self.count = 0
