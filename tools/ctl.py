"""ps-ctl: operator commands for paramhub runs and their checkpoints.

    ps-ctl export --checkpoint ckpt/ --out resnet50.pt      # newest checkpoint → plain state_dict

Each subcommand is a thin click wrapper around a plain function that does the work,
so the same steps can be called from Python and tested without a CLI.
"""

from __future__ import annotations

import io
import os
import pathlib

import click
import torch

from paramhub.common.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint, save_state_file,
                                        write_atomically)
from paramhub.common.models import build_model

EXPORT_SUFFIXES = (".pt", ".safetensors")


@click.group(context_settings={"auto_envvar_prefix": "PARAMHUB", "show_default": True})
def main():
    """Operate on paramhub runs and their checkpoints."""


# -- export ---------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """``path`` itself, or for a directory its newest ``ckpt-v*.safetensors``.

    Raises:
        CheckpointError: a directory without checkpoints.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoints (ckpt-v*.safetensors) in {path}")
        return found[-1]
    return path


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike) -> tuple[pathlib.Path, dict]:
    """Writes the model of a checkpoint as a plain state_dict that torchvision loads with ``strict=True``.

    The server's own state (``__paramhub__.*`` tensors) is left out. Before anything
    is written the state is loaded strictly into the model the checkpoint names, so
    an export that would not load is never produced.

    Args:
        checkpoint: a server checkpoint (``ckpt-v*.safetensors``), ps-eval's
            ``best.safetensors``, or a directory (its newest checkpoint).
        out: ``*.pt`` (``torch.save`` of a dict of tensors; loads with
            ``torch.load(weights_only=True)``) or ``*.safetensors``. Written atomically.

    Returns:
        The checkpoint read and its metadata (``version``, ``model``, ``num_classes``, ...).

    Raises:
        ValueError: ``out`` has another extension.
        CheckpointError: the checkpoint is missing, unreadable, corrupt, or does not fit its model.
    """
    out = pathlib.Path(out)
    if out.suffix not in EXPORT_SUFFIXES:
        raise ValueError(f"cannot export to {out.name!r}: the name must end in {' or '.join(EXPORT_SUFFIXES)}")
    source = resolve_checkpoint(checkpoint)
    state, _, meta = load_checkpoint(source)
    arch, num_classes = meta.get("model"), meta.get("num_classes")
    if arch is None or num_classes is None:
        raise CheckpointError(f"{source} does not say which model it holds (no 'model'/'num_classes' metadata)")
    model = build_model(arch, int(num_classes))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit {arch} with {num_classes} classes: {exc}") from None
    if out.suffix == ".pt":
        blob = io.BytesIO()
        torch.save({name: tensor.contiguous() for name, tensor in state.items()}, blob)
        write_atomically(out, blob.getvalue())
    else:
        save_state_file(out, state, {"version": meta["version"], "model": arch, "num_classes": int(num_classes)})
    return source, meta


@main.command()
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(),
              help="A checkpoint file (ckpt-v*.safetensors, best.safetensors) or a checkpoint directory (its newest).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="model.pt or model.safetensors.")
def export(checkpoint, out):
    """Write a checkpoint's model as a plain state_dict for torchvision (strict=True)."""
    try:
        source, meta = export_model(checkpoint, out)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    arch, num_classes = meta["model"], int(meta["num_classes"])
    if arch == "mlp":
        builder = f"paramhub.common.models.build_model('mlp', {num_classes})"
    else:
        builder = f"torchvision.models.get_model({arch!r}, num_classes={num_classes})"
    click.echo(f"exported {arch} ({num_classes} classes, version {meta['version']}) from {source} to {out}\n"
               f"load it with {builder}.load_state_dict(state, strict=True)")


if __name__ == "__main__":
    main()
