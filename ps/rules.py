"""Update rules: the server's math, as pure functions on flat tensors.

Nothing here knows about gRPC, workers or rounds. No function that produces new
global weights writes into the current weights, because pulls in flight may still
be streaming them: the result goes into ``out`` when given (the server passes the
averaged update, which it no longer needs, so a step allocates nothing) or into a
fresh tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch

from paramhub.common.codec import Piece
from paramhub.common.config import OUTER_OPTIMIZERS, SCHEDULES


def sgd_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of SGD with the exact semantics of ``torch.optim.SGD`` (dampening 0).

    Args:
        params: current weights (not modified).
        grad: the (averaged) gradient; not modified unless it is ``out``.
        momentum_buffer: the previous momentum buffer, or None before the first step.
        lr, momentum, weight_decay, nesterov: as in torch.optim.SGD.
        out: where to write the new weights (may be ``grad``); None: a fresh tensor.

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
    return torch.add(params, d_p, alpha=-lr, out=out), buf


class UpdateRule(Protocol):
    """Turns an aggregated update of the PARAM region into new weights.

    ``state`` is the rule's own tensors (optimizer buffers); the rule may update
    them in place; they are saved in checkpoints under their keys. The new weights
    go into ``out`` when given (it may be ``update``), never into ``params``.
    """

    def apply(self, params: torch.Tensor, update: torch.Tensor, state: dict[str, torch.Tensor],
              version: int, out: torch.Tensor | None = None) -> torch.Tensor: ...


def adamw_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step of AdamW with the semantics of ``torch.optim.AdamW`` (amsgrad off).

    Args:
        params: current weights (not modified).
        grad: the (averaged) gradient; not modified unless it is ``out``.
        exp_avg, exp_avg_sq: the moment estimates, updated in place.
        step: the number of this step, starting at 1 (for bias correction).
        lr, betas, eps, weight_decay: as in torch.optim.AdamW.
        out: where to write the new weights (may be ``grad``); None: a fresh tensor.

    Returns:
        The new weights.
    """
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    # grad is not read below this line, so out may be grad
    decayed = torch.mul(params, 1 - lr * weight_decay, out=out)
    return decayed.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """Learning-rate factor by global version: linear warm-up, then constant, cosine or step decay.

    Args:
        kind: ``constant``, ``cosine`` (to ``min_factor`` at ``total``) or ``step``
            (× ``gamma`` every ``step_size`` versions after warm-up).
        warmup: versions of linear warm-up from ``1/warmup`` to 1.
        total: the run's length in versions (cosine needs it).
    """

    kind: str = "constant"
    warmup: int = 0
    total: int | None = None
    step_size: int = 1000
    gamma: float = 0.1
    min_factor: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown LR schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.kind == "cosine" and not self.total:
            raise ValueError("a cosine schedule needs the run length (--max-steps)")
        if self.warmup < 0 or self.step_size < 1:
            raise ValueError("warm-up must be >= 0 and the step size >= 1")

    def factor(self, version: int) -> float:
        """The multiplier of the base learning rate for the update that makes ``version + 1``."""
        if version < self.warmup:
            return (version + 1) / self.warmup
        after = version - self.warmup
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, after / span)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "step":
            return self.gamma ** (after // self.step_size)
        return 1.0



def async_momentum(momentum: float, workers: int) -> float:
    """The server momentum that makes async SGD with ``workers`` workers behave like sync SGD with ``momentum``.

    Asynchrony begets momentum (Mitliagkas et al. 2016): N workers pushing in turn
    each apply a gradient about N − 1 versions old, which acts like an implicit
    momentum of 1 − 1/N on top of the optimizer's own. Subtracting it keeps the
    total where the synchronous recipe put it. Measured on the digits with 2 workers
    (BENCHMARKS.md "Training as well as DDP"): momentum 0.9 as given trailed DDP by 31
    points; 0.5 matched it.
    """
    return max(0.0, momentum - (1.0 - 1.0 / max(1, workers)))


@dataclasses.dataclass(frozen=True)
class SGDRule:
    """Gradient mode: the server runs SGD (momentum, Nesterov, weight decay) on averaged gradients."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: LRSchedule = LRSchedule()

    def apply(self, params: torch.Tensor, update: torch.Tensor, state: dict[str, torch.Tensor],
              version: int, out: torch.Tensor | None = None) -> torch.Tensor:
        new_params, buf = sgd_step(params, update, state.get("momentum_buffer"),
                                   lr=self.lr * self.schedule.factor(version), momentum=self.momentum,
                                   weight_decay=self.weight_decay, nesterov=self.nesterov, out=out)
        if buf is not None:
            state["momentum_buffer"] = buf
        return new_params


@dataclasses.dataclass(frozen=True)
class AdamWRule:
    """Gradient mode with a server-side AdamW."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    schedule: LRSchedule = LRSchedule()

    def apply(self, params: torch.Tensor, update: torch.Tensor, state: dict[str, torch.Tensor],
              version: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(params)
            state["exp_avg_sq"] = torch.zeros_like(params)
            state["step"] = torch.zeros((), dtype=torch.int64)
        state["step"] += 1
        return adamw_step(params, update, state["exp_avg"], state["exp_avg_sq"], int(state["step"]),
                          lr=self.lr * self.schedule.factor(version), betas=self.betas, eps=self.eps,
                          weight_decay=self.weight_decay, out=out)


@dataclasses.dataclass(frozen=True)
class AveragingRule:
    """Averaging mode: the update is the mean delta ``w_local - w_base`` (a pseudo-gradient's negative).

    ``outer="none"`` applies it as is (model averaging); ``outer="nesterov"`` treats
    ``-delta`` as a gradient for an outer SGD step with Nesterov momentum (DiLoCo).

    ``momentum_every=k`` delays the momentum (Liu et al. 2024, "Asynchronous Local-SGD
    Training for Language Modeling": delayed Nesterov): asynchronous pushes each carry
    about 1/k of a global batch, and a momentum step per push would compound the
    momentum k times per round. Each update applies its own pseudo-gradient at once,
    without momentum, and adds it to a sum; every k-th update also feeds the sum to
    the momentum buffer and applies the momentum part of the Nesterov step. Over k
    updates this moves the weights exactly as one synchronous Nesterov step on their
    sum would (tested), while every push still takes effect when it arrives.
    """

    outer: str = "none"
    outer_lr: float = 0.7
    outer_momentum: float = 0.3
    momentum_every: int = 1

    def __post_init__(self):
        if self.outer not in OUTER_OPTIMIZERS:
            raise ValueError(f"unknown outer optimizer {self.outer!r}; choose one of {', '.join(OUTER_OPTIMIZERS)}")
        if self.momentum_every < 1:
            raise ValueError(f"momentum_every must be >= 1, got {self.momentum_every}")

    def apply(self, params: torch.Tensor, update: torch.Tensor, state: dict[str, torch.Tensor],
              version: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.outer == "none":
            return torch.add(params, update, out=out)
        if self.momentum_every == 1:
            new_params, buf = sgd_step(params, update.neg(), state.get("momentum_buffer"), lr=self.outer_lr,
                                       momentum=self.outer_momentum, nesterov=True, out=out)
            if buf is not None:  # none without momentum: a checkpoint holds only tensors
                state["momentum_buffer"] = buf
            return new_params
        return self._delayed(params, update, state, out)

    def _delayed(self, params: torch.Tensor, update: torch.Tensor, state: dict[str, torch.Tensor],
                 out: torch.Tensor | None) -> torch.Tensor:
        if "delayed_sum" not in state:
            state["delayed_sum"] = torch.zeros_like(params)
            state["delayed_count"] = torch.zeros((), dtype=torch.int64)
        grad_sum = state["delayed_sum"].sub_(update)  # pseudo-gradients are -delta
        state["delayed_count"] += 1
        # the pseudo-gradient's own part of the Nesterov step, now (update may be out: read it first)
        new_params = torch.add(params, update, alpha=self.outer_lr, out=out)
        if int(state["delayed_count"]) < self.momentum_every:
            return new_params
        buf = state.get("momentum_buffer")
        buf = grad_sum.clone() if buf is None else buf.mul_(self.outer_momentum).add_(grad_sum)
        state["momentum_buffer"] = buf
        grad_sum.zero_()
        state["delayed_count"].zero_()
        return new_params.add_(buf, alpha=-self.outer_lr * self.outer_momentum)


class WeightedMean:
    """Accumulates a sample-weighted mean of flat tensors in place.

    Memory stays one accumulator per region however many workers contribute, and
    ``mean_`` divides in place, so a round allocates nothing of the model's size.
    Integer tensors (BatchNorm's ``num_batches_tracked``) are averaged in float64
    and rounded.
    """

    # Mixed-dtype adds (bf16 pushes into fp32 sums) convert slice by slice into one reused
    # buffer: torch's whole-tensor path for them measured 3-20x slower, and its own
    # conversion allocates a temporary for every slice.
    _SLICE = 1 << 20

    def __init__(self, like: list[torch.Tensor]):
        self._like = [(t.numel(), t.dtype) for t in like]
        self._sums: list[torch.Tensor | None] = [self._empty(r) for r in range(len(like))]
        self._scratch: dict[torch.dtype, torch.Tensor] = {}  # per sums dtype, _SLICE elements
        self.reset()

    def _empty(self, r: int) -> torch.Tensor:
        numel, dtype = self._like[r]
        return torch.empty(numel, dtype=dtype if dtype.is_floating_point else torch.float64)

    def add(self, pieces: list[Piece], weight: float, scales: list[float] | None = None) -> None:
        """Adds ``weight`` × each piece (times ``scales`` of its region, if given) to the running sums.

        ``scales`` damps some regions (stale updates) without changing their weight
        in the mean of the others (BatchNorm statistics). Values may have a
        narrower floating dtype than the sums (a bf16 wire): no full-size copy is
        made. Sparse pieces add at their indices.
        """
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        for piece in pieces:
            acc = self._sums[piece.region]
            alpha = weight * (scales[piece.region] if scales else 1.0)
            values = piece.values
            if piece.indices is not None:
                acc.index_add_(0, piece.indices, values.to(acc.dtype), alpha=alpha)
                continue
            target = acc[piece.offset : piece.offset + values.numel()]
            if values.dtype == acc.dtype:
                target.add_(values, alpha=alpha)
            else:
                scratch = self._scratch.get(acc.dtype)
                if scratch is None:
                    scratch = self._scratch[acc.dtype] = torch.empty(self._SLICE, dtype=acc.dtype)
                for start in range(0, values.numel(), self._SLICE):
                    part = values[start : start + self._SLICE]
                    converted = scratch[: part.numel()].copy_(part)
                    target[start : start + part.numel()].add_(converted, alpha=alpha)
        self.total_weight += weight
        self.count += 1

    def mean_(self) -> list[torch.Tensor]:
        """The weighted means, in the original dtypes; floating ones are the sums themselves, divided.

        Those tensors are handed over: call ``reset`` before adding again.
        """
        if not self.count:
            raise ValueError("mean of nothing")
        out = []
        for r, acc in enumerate(self._sums):
            if acc.dtype == self._like[r][1]:
                out.append(acc.div_(self.total_weight))
                self._sums[r] = None
            else:
                out.append((acc / self.total_weight).round().to(self._like[r][1]))
        return out

    def reset(self, spare: list[torch.Tensor | None] | None = None) -> None:
        """Forgets everything added.

        Sums handed over by ``mean_`` are replaced by the matching tensor of
        ``spare`` (memory nobody uses any more, such as an old version's weights)
        or by new memory.
        """
        for r, acc in enumerate(self._sums):
            if acc is None:
                candidate = spare[r] if spare is not None and r < len(spare) else None
                fits = candidate is not None and (candidate.numel(), candidate.dtype) == self._like[r]
                acc = self._sums[r] = candidate if fits else self._empty(r)
            acc.zero_()
        self.total_weight = 0.0
        self.count = 0
