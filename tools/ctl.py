"""ps-ctl: operator commands for paramhub runs and their checkpoints.

    ps-ctl export --checkpoint ckpt/ --out resnet50.pt      # newest checkpoint → plain state_dict
    ps-ctl export --checkpoint ckpt/ --out r50.pt --precise-bn-data /data/shards   # BatchNorm statistics recomputed
    ps-ctl health head:50051                                # exit 0 only while the server is SERVING
    ps-ctl status head:50051 [--json]                       # version, workers, staleness

Each subcommand is a thin click wrapper around a plain function that does the work,
so the same steps can be called from Python and tested without a CLI.

``ps-ctl health`` is a container's health probe, run every few seconds on a node that may be
busy: importing this module must stay cheap (grpc, click, protobuf; never torch, numpy or
safetensors, which made the probe take seconds). The checkpoint code is imported inside the
export functions that need it; ``tests/test_health_probe.py`` checks the probe's imports.
"""

from __future__ import annotations

import io
import json
import os
import pathlib

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramhub.common.cliutil import config_file_option, pop_security, security_options
from paramhub.common.config import PRECISE_BN_BATCHES
from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.common.pb import paramhub_pb2_grpc as pb_grpc
from paramhub.common.security import secure_channel
from paramhub.ps.status import StatusView, from_response

EXPORT_SUFFIXES = (".pt", ".safetensors")
# Each subcommand reads PARAMHUB_<FLAG> (PARAMHUB_TOKEN, ...), like every console script; left to
# itself click would prefix a subcommand's variables with its name (PARAMHUB_STATUS_TOKEN).
ENV = {"auto_envvar_prefix": "PARAMHUB"}


@click.group(context_settings={"auto_envvar_prefix": "PARAMHUB", "show_default": True})
def main():
    """Operate on paramhub runs and their checkpoints."""


# -- export ---------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """``path`` itself, or for a directory its newest ``ckpt-v*.safetensors``.

    Raises:
        CheckpointError: a directory without checkpoints.
    """
    from paramhub.common.checkpoint import CheckpointError, list_checkpoints

    path = pathlib.Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoints (ckpt-v*.safetensors) in {path}")
        return found[-1]
    return path


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike, *, precise_bn_data: str | None = None,
                 precise_bn_batches: int = PRECISE_BN_BATCHES, image_size: int = 224,
                 batch_size: int = 64) -> tuple[pathlib.Path, dict]:
    """Writes the model of a checkpoint as a plain state_dict that torchvision loads with ``strict=True``.

    The server's own state (``__paramhub__.*`` tensors) is left out. Before anything
    is written the state is loaded strictly into the model the checkpoint names, so
    an export that would not load is never produced.

    With ``precise_bn_data`` the BatchNorm running statistics are recomputed first on
    ``precise_bn_batches`` batches of ``batch_size`` training images seen through the
    evaluation transform at ``image_size`` (``common.evaluation.PreciseBN``): only the
    BatchNorm buffers change, the weights are exported bit for bit. The layers a
    checkpoint's metadata lists as ``frozen_batchnorm`` (ps-eval's best model of a
    ``--freeze-backbone`` run) are left alone.

    Args:
        checkpoint: a server checkpoint (``ckpt-v*.safetensors``), ps-eval's
            ``best.safetensors``, or a directory (its newest checkpoint).
        out: ``*.pt`` (``torch.save`` of a dict of tensors; loads with
            ``torch.load(weights_only=True)``) or ``*.safetensors``. Written atomically.
        precise_bn_data: training images (ImageFolder, ps-data shard or directory of all
            shards), or None: the statistics as the checkpoint has them.
        precise_bn_batches, image_size, batch_size: the recomputation's settings.

    Returns:
        The checkpoint read and its metadata (``version``, ``model``, ``num_classes``, ...;
        with precise BN also ``precise_bn``: what the statistics were recomputed on).

    Raises:
        ValueError: ``out`` has another extension.
        CheckpointError: the checkpoint is missing, unreadable, corrupt, or does not fit its model.
        DataError: the precise-BN data cannot be used (missing, empty, another class count).
    """
    from paramhub.common.checkpoint import CheckpointError, load_checkpoint, save_state_file, write_atomically

    out = pathlib.Path(out)
    if out.suffix not in EXPORT_SUFFIXES:
        raise ValueError(f"cannot export to {out.name!r}: the name must end in {' or '.join(EXPORT_SUFFIXES)}")
    source = resolve_checkpoint(checkpoint)
    state, _, meta = load_checkpoint(source)
    arch, num_classes = meta.get("model"), meta.get("num_classes")
    if arch is None or num_classes is None:
        raise CheckpointError(f"{source} does not say which model it holds (no 'model'/'num_classes' metadata)")
    from paramhub.common.models import build_model

    model = build_model(arch, int(num_classes))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit {arch} with {num_classes} classes: {exc}") from None
    facts = {"version": meta["version"], "model": arch, "num_classes": int(num_classes)}
    if precise_bn_data is not None:
        from paramhub.common.evaluation import PreciseBN, batchnorm_layers

        precise = PreciseBN(precise_bn_data, num_classes=int(num_classes), image_size=image_size,
                            batch_size=batch_size, num_batches=precise_bn_batches)
        frozen = set(meta.get("frozen_batchnorm") or ()) & set(batchnorm_layers(model))
        done = precise.apply(model, "cpu", skip=frozen)
        state = model.state_dict()
        facts["precise_bn"] = {"data": str(precise_bn_data), "batches": done.batches, "samples": done.samples,
                               "image_size": image_size, "layers": done.layers, "skipped": done.skipped}
        meta = {**meta, "precise_bn": facts["precise_bn"]}
    if out.suffix == ".pt":
        import torch

        blob = io.BytesIO()
        torch.save({name: tensor.contiguous() for name, tensor in state.items()}, blob)
        write_atomically(out, blob.getvalue())
    else:
        save_state_file(out, state, facts)
    return source, meta


@main.command(context_settings=ENV)
@config_file_option("ctl")
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(),
              help="A checkpoint file (ckpt-v*.safetensors, best.safetensors) or a checkpoint directory (its newest).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="model.pt or model.safetensors.")
@click.option("--precise-bn-data", default=None, metavar="DIR",
              help="Training images (an ImageFolder, a ps-data shard or the directory of all shards): recompute the "
                   "BatchNorm statistics on them before exporting ('precise BN'); the weights are unchanged.")
@click.option("--precise-bn-batches", default=PRECISE_BN_BATCHES, type=click.IntRange(min=1),
              help="Batches for --precise-bn-data.")
@click.option("--batch-size", default=64, type=click.IntRange(min=1), help="Images per batch for --precise-bn-data.")
@click.option("--image-size", default=224, type=click.IntRange(min=8),
              help="--precise-bn-data images: resize + center crop to this size (as ps-eval --image-size).")
def export(checkpoint, out, precise_bn_data, precise_bn_batches, batch_size, image_size):
    """Write a checkpoint's model as a plain state_dict for torchvision (strict=True)."""
    from paramhub.common.checkpoint import CheckpointError
    from paramhub.common.shards import DataError

    try:
        source, meta = export_model(checkpoint, out, precise_bn_data=precise_bn_data,
                                    precise_bn_batches=precise_bn_batches, image_size=image_size,
                                    batch_size=batch_size)
    except DataError as exc:
        raise click.BadParameter(str(exc), param_hint="--precise-bn-data") from None
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
    if "precise_bn" in meta:
        done = meta["precise_bn"]
        if done["layers"]:
            click.echo(f"BatchNorm statistics of {done['layers']} layers recomputed on {done['batches']} batches "
                       f"({done['samples']} images) of {done['data']}"
                       + (f"; {done['skipped']} frozen layers left alone" if done["skipped"] else ""))
        else:
            click.echo("no BatchNorm statistics to recompute (the model has none, or all of them are frozen)")


# -- health and status ------------------------------------------------------------------


# The health RPC's deadline. A live server answers in milliseconds (it keeps handler threads for
# health: common.config.RESERVED_THREADS); 2 s leaves a probe with a 5 s budget room for start-up.
HEALTH_TIMEOUT_S = 2.0


def health_status(address: str, service: str = "", timeout: float = HEALTH_TIMEOUT_S, security=None) -> str:
    """The grpc.health.v1 status of ``service`` at ``address`` (``SERVING``, ``NOT_SERVING``, ...).

    Raises:
        grpc.RpcError: the server could not be reached within ``timeout`` seconds (``UNAVAILABLE``,
            ``DEADLINE_EXCEEDED``) or does not know the service (``NOT_FOUND``).
    """
    from paramhub.common.security import Security

    with secure_channel(address, security or Security(), options=[]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@main.command(context_settings=ENV)
@config_file_option("ctl")
@click.argument("address")
@click.option("--service", default="", help="The service to ask about ('' is the whole server).")
@click.option("--timeout", default=HEALTH_TIMEOUT_S, type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for the answer; keep it below the probe's own timeout.")
@security_options
def health(address, service, timeout, **security):
    """Exit 0 if the server at ADDRESS (host:port) is SERVING, 1 if not, 2 if unreachable.

    1 also when the server does not know --service. Needs no token.
    """
    try:
        status = health_status(address, service, timeout, pop_security(security))
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            click.echo(f"{address}: the server does not know the service {service!r} (NOT_FOUND)", err=True)
            raise SystemExit(1) from None
        click.echo(f"{address}: unreachable ({exc.code().name}: {exc.details()})", err=True)
        raise SystemExit(2) from None
    click.echo(f"{address}: {status}")
    raise SystemExit(0 if status == "SERVING" else 1)


def _replication_line(status: StatusView) -> str:
    """Primary or standby, the term, and how the standby stands (UNPROTECTED: a primary without one)."""
    if status.role == "standby":
        return (f"STANDBY of {status.primary} (term {status.term}, {status.standby_state}, at version "
                f"{status.replicated_version}): refuses workers until it takes over")
    standby = {"attached": f"standby attached, acked version {status.replicated_version}",
               "unprotected": "standby lost: UNPROTECTED", "none": "no standby"}.get(status.standby_state,
                                                                                     status.standby_state)
    return f"primary, term {status.term}, {standby}" + (f", {status.failovers} failover(s)" if status.failovers else "")


def status_table(status: StatusView) -> str:
    """The server's status as text tables: the run, its workers, the staleness histogram."""
    bound = "unbounded" if status.staleness_bound is None else str(status.staleness_bound)
    lines = [f"version {status.version}  mode {status.mode}/{status.update}  staleness bound {bound}  "
             f"{'DONE' if status.done else 'running'}  epoch {status.epoch}",
             f"pushes applied {status.pushes_applied}, rejected {status.pushes_rejected}; "
             f"waiting for the next update {status.round_pushes}; last loss {status.last_loss:.4f}",
             _replication_line(status), "",
             f"{'id':>3} {'name':<20} {'state':<6} {'applied':>8} {'dropped':>8} {'base':>7} {'loss':>8} {'seen':>7}"]
    for w in status.workers:
        lines.append(f"{w.worker_id:>3} {w.name[:20]:<20} {w.state:<6} "
                     f"{w.applied:>8} {w.dropped:>8} {w.last_base_version:>7} {w.last_loss:>8.4f} "
                     f"{w.seconds_since_seen:>6.1f}s")
    lines.append(f"{status.live_workers} live, {status.departed_workers} departed"
                 + (f"; {status.not_listed} not listed (the oldest departures)" if status.not_listed else ""))
    if status.membership is not None:
        m = status.membership
        lines.append(f"membership: a round waits for {m.round_members}; at least {m.min_workers} to start, at most "
                     f"{m.max_workers or 'any number of'} at once; {m.joins} joins, {m.departures} departures")
    if status.leases is not None:
        leases = status.leases
        lines += ["", f"data leases: {leases.completed} epoch(s) complete, {leases.reassigned} leased samples given "
                      "back by departures", "epoch      done  in pushes    leased   pending"]
        lines += [f"{e.epoch:>5} {e.done:>9} {e.in_pushes:>10} {e.leased:>9} {e.pending:>9}" for e in leases.epochs]
    if status.staleness_histogram:
        lines += ["", "staleness  pushes"] + [f"{staleness:>9}  {count}"
                                              for staleness, count in sorted(status.staleness_histogram.items())]
    return "\n".join(lines)


@main.command(context_settings=ENV)
@config_file_option("ctl")
@click.argument("address")
@click.option("--json", "as_json", is_flag=True, envvar="PARAMHUB_JSON", allow_from_autoenv=False,
              help="Print the Status reply as JSON.")
@click.option("--timeout", default=10.0, type=click.FloatRange(min=0, min_open=True), help="Seconds to wait.")
@security_options
def status(address, as_json, timeout, **security):
    """Print the run's state at ADDRESS (host:port): version, workers, staleness."""
    from google.protobuf import json_format

    try:
        with secure_channel(address, pop_security(security), options=[]) as channel:
            reply = pb_grpc.ParameterServerStub(channel).Status(pb.StatusRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        raise click.ClickException(f"{address}: {exc.code().name}: {exc.details()}") from None
    if as_json:
        click.echo(json.dumps(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)))
    else:
        click.echo(status_table(from_response(reply)))


if __name__ == "__main__":
    main()
