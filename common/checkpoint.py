"""Atomic, pickle-free checkpoints in safetensors format.

One file per checkpoint, ``ckpt-v{version:09d}.safetensors``. Model tensors are
stored under their state_dict names, so the file loads straight into the
torchvision model (``load_model_state``); server state (optimizer buffers) is
stored under keys starting with ``STATE_PREFIX``; run facts go in the metadata.
Writes go to a temporary file that is fsynced and renamed, so a crash never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import tempfile
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

STATE_PREFIX = "__paramhub__."
_NAME = re.compile(r"^ckpt-v(\d{9})\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or inconsistent."""


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order.

    Stored in the checkpoint's metadata and checked on load, so a file that was
    damaged after it was written (bit rot, a bad copy) is refused, not trained on.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


RULE_PREFIX = "rule."  # optimizer state in a checkpoint's server tensors: rule.<region name>.<key>


def rule_state_tensors(region_names: list[str],
                       rule_state: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Optimizer state by region index, as a checkpoint's server tensors (``rule.<region name>.<key>``)."""
    return {f"{RULE_PREFIX}{region_names[r]}.{key}": tensor
            for r, tensors in rule_state.items() for key, tensor in tensors.items()}


def rule_state_of(region_names: list[str], server_tensors: Mapping[str, torch.Tensor]) -> dict[int, dict]:
    """The optimizer state a checkpoint's server tensors hold, by region index; other tensors are ignored.

    Region names hold no dot (``param/float32``), so the key after the name is the state's own.
    """
    index = {name: r for r, name in enumerate(region_names)}
    state: dict[int, dict] = {}
    for key, tensor in server_tensors.items():
        if key.startswith(RULE_PREFIX):
            region, _, name = key[len(RULE_PREFIX):].partition(".")
            if region in index:
                state.setdefault(index[region], {})[name] = tensor
    return state


def checkpoint_path(directory: str | os.PathLike, version: int) -> pathlib.Path:
    """The file name a checkpoint of ``version`` gets in ``directory``."""
    return pathlib.Path(directory) / f"ckpt-v{version:09d}.safetensors"


def write_atomically(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Writes ``data`` to ``path`` via a temporary file that is fsynced and renamed.

    A reader (or a crash) sees the old file or the new one, never half of one.
    The directory is created if missing and fsynced so the rename itself is durable.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_state_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, object] | None = None) -> pathlib.Path:
    """Writes a state_dict to a safetensors file of any name, atomically, in checkpoint format.

    ``load_checkpoint`` reads it back, with ``metadata`` as the metadata it returns,
    so files such as ps-eval's ``best.safetensors`` export and load like checkpoints.

    Args:
        path: the file to write (its directory is created if missing).
        tensors: state_dict-named tensors (views and GPU tensors are fine; they are copied).
        metadata: JSON-serialisable facts; its ``version`` (default 0) is stored where
            ``load_checkpoint`` looks for it.

    Returns:
        The path written.
    """
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    facts = dict(metadata or {})
    version = int(facts.pop("version", 0))
    header = {"version": str(version), "paramhub": json.dumps(facts), "sha256": tensor_digest(tensors)}
    return write_atomically(path, save(tensors, metadata=header))


def save_checkpoint(
    directory: str | os.PathLike,
    version: int,
    model_state: Mapping[str, torch.Tensor],
    server_state: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, object] | None = None,
    keep_last: int = 3,
) -> pathlib.Path:
    """Writes a checkpoint atomically and prunes all but the newest ``keep_last``.

    Args:
        directory: created if missing.
        version: the global version the state belongs to.
        model_state: state_dict-named tensors (views are fine; they are copied).
        server_state: optimizer and other server tensors, stored with STATE_PREFIX.
        metadata: JSON-serialisable facts (model spec, layout hash, ...).
        keep_last: how many checkpoints to keep; 0 keeps all.

    Returns:
        The path written.
    """
    tensors = dict(model_state)
    for name, t in (server_state or {}).items():
        tensors[STATE_PREFIX + name] = t
    final = save_state_file(checkpoint_path(directory, version), tensors, {**(metadata or {}), "version": version})
    if keep_last > 0:
        for old in list_checkpoints(final.parent)[:-keep_last]:
            old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: str | os.PathLike) -> list[pathlib.Path]:
    """Checkpoint files in ``directory``, oldest first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Reads a checkpoint: (model state, server state, metadata). Never unpickles."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            raw_meta = f.metadata() or {}
        metadata = json.loads(raw_meta.get("paramhub", "{}"))
        metadata["version"] = int(raw_meta["version"])
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if "sha256" in raw_meta and raw_meta["sha256"] != tensor_digest(tensors):
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match their checksum")
    model = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
    server = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    return model, server, metadata


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's state_dict from a checkpoint, ready for ``load_state_dict(strict=True)``."""
    return load_checkpoint(path)[0]
