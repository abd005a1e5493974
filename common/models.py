"""Model factory: torchvision classifiers by name, plus a tiny BN-free model for tests.

Which tensors are the "head" (the classifier) matters for fine-tuning; the rest is
the backbone.
"""

from __future__ import annotations

import dataclasses
import multiprocessing

import torch
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
        import torchvision  # here, not at the top: a process that never builds a model is 164 MB lighter

        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def head_names(model: nn.Module) -> list[str]:
    """state_dict keys of the classifier head (``fc``)."""
    return [name for name in model.state_dict() if name.startswith("fc.")]


class WeightsError(ValueError):
    """Initial weights that cannot be read or do not fit the model."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Reads a torchvision-format state_dict from ``.safetensors`` or ``.pt``/``.pth`` without unpickling code.

    ``.pt`` files are read with ``torch.load(weights_only=True)``, which refuses
    anything but tensors and plain containers. Server-state keys of a paramhub
    checkpoint (``__paramhub__.*``) are dropped, so our checkpoints work too.
    """
    import pathlib

    from safetensors.torch import load_file

    file = pathlib.Path(path)
    if not file.is_file():
        raise WeightsError(f"no weights file at {file}")
    try:
        if file.suffix == ".safetensors":
            state = load_file(file)
        elif file.suffix in (".pt", ".pth"):
            state = torch.load(file, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
        else:
            raise WeightsError(f"{file}: expected a .safetensors, .pt or .pth file")
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"cannot read weights from {file}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{file} does not hold a state_dict of tensors")
    return {k: v for k, v in state.items() if not k.startswith("__paramhub__.")}


def load_initial_weights(model: nn.Module, path: str, new_head: bool) -> None:
    """Loads pretrained weights into ``model``; with ``new_head`` the classifier stays freshly initialised.

    Raises:
        WeightsError: unreadable file, missing or unexpected tensors, or a head of
            the wrong size without ``new_head``.
    """
    state = read_state_dict(path)
    head = set(head_names(model))
    if new_head:
        state = {k: v for k, v in state.items() if k not in head}
    expected = set(model.state_dict()) - (head if new_head else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise WeightsError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    own = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            hint = " (a different number of classes? add --new-head)" if name in head else ""
            raise WeightsError(f"{name}: {tuple(tensor.shape)} in {path}, {tuple(own[name].shape)} in the model{hint}")
    model.load_state_dict(state, strict=not new_head)


@dataclasses.dataclass(frozen=True)
class InitialState:
    """What the server needs of a model: its initial state_dict, which keys are parameters, its head."""

    state: dict[str, torch.Tensor]
    param_names: frozenset[str]
    head: list[str]


def initial_state(arch: str, num_classes: int, seed: int = 0, init_from: str | None = None,
                  new_head: bool = False) -> InitialState:
    """Builds the model (``build_model``), loads ``init_from`` if given, and keeps its state.

    Raises:
        ValueError, WeightsError: as ``build_model`` and ``load_initial_weights``.
    """
    model = build_model(arch, num_classes, seed)
    if init_from:
        load_initial_weights(model, init_from, new_head)
    return InitialState(model.state_dict(), frozenset(name for name, _ in model.named_parameters()),
                        head_names(model))


def _build_and_send(connection, arch: str, num_classes: int, seed: int, init_from: str | None,
                    new_head: bool) -> None:
    """The child's side: build, then send (error, key order, parameter names, head) and the tensors."""
    from safetensors.torch import save

    try:
        built = initial_state(arch, num_classes, seed, init_from, new_head)
        blob = save({k: v.contiguous() for k, v in built.state.items()})
        # safetensors sorts the keys; the layout follows the state_dict's own order
        connection.send((None, list(built.state), sorted(built.param_names), built.head))
        connection.send_bytes(blob)
    except Exception as exc:  # WeightsError and friends: the parent raises them
        connection.send((exc, None, None, None))
    finally:
        connection.close()


def initial_state_in_child(arch: str, num_classes: int, seed: int = 0, init_from: str | None = None,
                           new_head: bool = False, timeout_s: float = 600.0) -> InitialState:
    """``initial_state`` computed in a short-lived child process.

    Building a torchvision model imports torchvision, which imports torch._dynamo and
    sympy: 164 MB that a server process would keep resident for its whole run
    without using them again. The child pays that and hands back the tensors
    (safetensors bytes over a pipe); the same seed gives the same weights.

    Raises:
        WeightsError: ``init_from`` cannot be read or does not fit.
        RuntimeError: the child died or took longer than ``timeout_s``.
    """
    from safetensors.torch import load

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited
    receiving, sending = context.Pipe(duplex=False)
    child = context.Process(target=_build_and_send, args=(sending, arch, num_classes, seed, init_from, new_head),
                            name="paramhub-build-model", daemon=True)
    child.start()
    sending.close()  # ours: so that a dead child reads as end of file
    try:
        if not receiving.poll(timeout_s):
            raise RuntimeError(f"building {arch} in a child process took over {timeout_s:.0f}s")
        error, order, param_names, head = receiving.recv()
        if error is not None:
            raise error
        loaded = load(receiving.recv_bytes())
    except EOFError:
        raise RuntimeError(f"the child process building {arch} died (exit code {child.exitcode})") from None
    finally:
        receiving.close()
        if child.is_alive():
            child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()
    return InitialState({name: loaded[name] for name in order}, frozenset(param_names), head)
