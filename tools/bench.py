"""ps-bench: measurements that the design's claims rest on.

``ps-bench transport`` times one push+pull of the whole model through paramhub's
own client and server, and, interleaved in the same run, a plain-socket echo of the
same bytes (tools/socket_baseline.py). It reports both medians and their ratio,
which is the figure BENCHMARKS.md speaks in: absolute times on a
shared machine drift from run to run, the ratio of interleaved rounds much less.

``ps-bench round`` and ``ps-bench aggregate`` (tools/bench_round.py) time a whole
sync round against gloo's all_reduce, and the server's update math against a
memory copy, in the same interleaved style.

Both servers run in child processes (tools/bench_servers.py), so neither
shares a GIL with the client.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

import click

from paramhub.common.codec import DEFAULT_CHUNK_BYTES
from paramhub.common.models import ARCHS
from paramhub.common.runtime import keep_freed_memory_resident, setup_logging
from paramhub.tools import bench_codecs, bench_round, convergence, socket_baseline, versus_ddp
from paramhub.tools.bench_servers import HOST, NUM_CLASSES, paramhub_server, socket_server

GOAL_RATIO = 1.5  # the transport goal: push+pull at most 1.5x the plain-socket round trip


# -- the rounds ----------------------------------------------------------------------


def run_transport(model_name: str, repeats: int, warmup: int, chunk_bytes: int) -> dict:
    """Runs the interleaved paramhub and socket rounds; returns the figures as a dict.

    Raises:
        click.ClickException: a server did not start, or a round moved the wrong bytes.
    """
    import torch

    from paramhub.common.config import Timeouts
    from paramhub.common.layout import Layout
    from paramhub.common.models import build_model
    from paramhub.common.pb import paramhub_pb2 as pb
    from paramhub.worker.client import PSClient

    model = build_model(model_name, NUM_CLASSES)  # seed 0, as the server's: a pull returns these bytes
    layout = Layout.from_model(model)
    nbytes = layout.nbytes
    # Bounds that fail a broken run in seconds rather than the defaults' minutes.
    timeouts = Timeouts(rpc=30, transfer=120, connect=30, pull_wait=5)

    with contextlib.ExitStack() as stack:  # unwinds in reverse: clients close before their servers stop
        paramhub = stack.enter_context(paramhub_server(model_name, chunk_bytes=chunk_bytes))
        echo_server = stack.enter_context(socket_server(nbytes))
        client = stack.enter_context(PSClient(f"{HOST}:{paramhub.wait_ready()}", timeouts, chunk_bytes))
        echo = stack.enter_context(socket_baseline.EchoClient((HOST, echo_server.wait_ready()), nbytes))

        info = client.join(name="bench")
        if info.layout.hash != layout.hash:
            raise click.ClickException("the server's layout differs from the model built here")
        send = layout.flatten(model.state_dict())
        recv = layout.empty_regions()
        del model

        def paramhub_round() -> float:
            start = time.perf_counter()
            reply = client.push(pb.PUSH_KIND_GRADIENT, info.version, send, num_samples=1, loss=0.0, dry_run=True)
            header = client.pull(recv, min_version=0)
            elapsed = time.perf_counter() - start
            if reply.outcome != pb.PUSH_OUTCOME_VALIDATED or header.version != info.version:
                raise click.ClickException(
                    f"dry-run push was not just validated: outcome {pb.PushOutcome.Name(reply.outcome)}, "
                    f"version {info.version} -> {header.version}")
            return elapsed

        def socket_round() -> float:
            start = time.perf_counter()
            echo.round_trip()
            return time.perf_counter() - start

        for _ in range(warmup):
            paramhub_round()
            socket_round()
        if not all(torch.equal(a, b) for a, b in zip(send, recv)):
            raise click.ClickException("pulled model differs from the server's initial weights")
        if not echo.check():
            raise click.ClickException("socket echo returned different bytes")

        # Alternate which path goes first, so neither always runs on a warmer cache.
        paramhub_s: list[float] = []
        socket_s: list[float] = []
        for i in range(repeats):
            if i % 2 == 0:
                paramhub_s.append(paramhub_round())
                socket_s.append(socket_round())
            else:
                socket_s.append(socket_round())
                paramhub_s.append(paramhub_round())

    paramhub_median, socket_median = statistics.median(paramhub_s), statistics.median(socket_s)
    return {
        "ratio": paramhub_median / socket_median,
        "paramhub_s": paramhub_median,
        "socket_s": socket_median,
        "goal_ratio": GOAL_RATIO,
        "model": model_name,
        "bytes": nbytes,
        "repeats": repeats,
        "warmup": warmup,
        "chunk_bytes": chunk_bytes,
        "cpus": os.cpu_count(),
        "paramhub_samples_s": paramhub_s,
        "socket_samples_s": socket_s,
        "pair_ratios": [p / s for p, s in zip(paramhub_s, socket_s)],
    }


def _format_report(r: dict) -> str:
    moved = 2 * r["bytes"]  # each round carries the model both ways

    def line(name: str, seconds: float) -> str:
        return f"  {name:<22} median {seconds * 1e3:8.1f} ms  ({moved / seconds / 1e9:.2f} GB/s both ways)"

    verdict = "meets" if r["ratio"] <= r["goal_ratio"] else "misses"
    chunk = r["chunk_bytes"]
    chunk_text = f"{chunk >> 20} MiB" if chunk % (1 << 20) == 0 else f"{chunk / 1024:g} KiB"
    return "\n".join([
        f"transport: {r['model']}, {r['bytes'] / 1e6:.1f} MB each way, {chunk_text} chunks, "
        f"{r['repeats']} interleaved repeats after {r['warmup']} warm-up, {r['cpus']} CPUs, loopback",
        line("paramhub push+pull", r["paramhub_s"]),
        line("plain socket echo", r["socket_s"]),
        f"  ratio {r['ratio']:.2f}x the socket ({verdict} the goal of at most {r['goal_ratio']:g}x; "
        f"per-pair {min(r['pair_ratios']):.2f}-{max(r['pair_ratios']):.2f}x)",
    ])


# -- the command line ----------------------------------------------------------------


@click.group(context_settings={"show_default": True})
def main():
    """Benchmarks of paramhub on this machine."""


@main.command()
@click.option("--model", default="resnet50", type=click.Choice(ARCHS), help="Whose full state travels.")
@click.option("--repeats", default=7, type=click.IntRange(min=1), help="Timed rounds of each path.")
@click.option("--warmup", default=1, type=click.IntRange(min=0), help="Untimed rounds of each path first.")
@click.option("--chunk-bytes", default=DEFAULT_CHUNK_BYTES, type=click.IntRange(4096, 32 << 20),
              help="Payload bytes per chunk, both directions (the client accepts messages up to 64 MiB).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def transport(model, repeats, warmup, chunk_bytes, as_json):
    """Push+pull of the whole model through paramhub against a plain-socket echo of the same bytes."""
    keep_freed_memory_resident()  # before any large allocation (common/runtime.py says why)
    setup_logging("WARNING")
    result = run_transport(model, repeats, warmup, chunk_bytes)
    click.echo(json.dumps(result) if as_json else _format_report(result))


@main.command("convergence")
@click.option("--model", default="resnet18", type=click.Choice(ARCHS), help="The model every run trains.")
@click.option("--workers", default=4, type=click.IntRange(min=1), help="Workers per distributed run.")
@click.option("--updates", default=40, type=click.IntRange(min=2), help="Global versions per run.")
@click.option("--eval-every", default=5, type=click.IntRange(min=1), help="Evaluate every V versions.")
@click.option("--batch-size", default=16, type=click.IntRange(min=1), help="Per worker; the baseline uses workers x this.")
@click.option("--image-size", default=32, type=click.IntRange(min=8))
@click.option("--lr", default=0.02, type=float, help="Server lr (grad), local lr (avg), baseline lr.")
@click.option("--modes", default=",".join(convergence.MODES), help="Comma-separated runs: " + ", ".join(convergence.RUNS))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def convergence_cmd(model, workers, updates, eval_every, batch_size, image_size, lr, modes, as_json):
    """Every mode on the same data, against single-process training at the same total batch."""
    setup_logging("WARNING")
    names = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = set(names) - set(convergence.RUNS)
    if unknown:
        raise click.BadParameter(f"unknown {sorted(unknown)}", param_hint="--modes")
    settings = convergence.Settings(model=model, workers=workers, updates=updates, eval_every=eval_every,
                                    batch_size=batch_size, image_size=image_size, lr=lr)
    results = convergence.run(settings, names)
    click.echo(convergence.to_json(results, settings) if as_json else convergence.format_table(results))


@main.command("versus-ddp")
@click.option("--data", default=None, type=click.Path(exists=True, file_okay=False),
              help="An ImageFolder (default: scikit-learn's digits, written into the work directory).")
@click.option("--model", default="resnet18", type=click.Choice(ARCHS))
@click.option("--workers", default=2, type=click.IntRange(min=1))
@click.option("--steps", default=200, type=click.IntRange(min=4), help="DDP steps; every run trains as many samples.")
@click.option("--eval-every", default=20, type=click.IntRange(min=1), help="Score the model every this many DDP steps.")
@click.option("--batch-size", default=32, type=click.IntRange(min=1), help="Per worker.")
@click.option("--image-size", default=32, type=click.IntRange(min=8))
@click.option("--lr", default=0.05, type=float)
@click.option("--momentum", default=0.9, type=float)
@click.option("--local-steps", default=4, type=click.IntRange(min=1), help="H of the averaging modes.")
@click.option("--augment", default="auto", type=click.Choice(["auto", "imagenet", "cifar", "none"]))
@click.option("--seeds", default="0", help="Comma-separated seeds (model init and data order).")
@click.option("--modes", default="sync-grad,async-grad,diloco", help="Comma-separated: " + ", ".join([*versus_ddp.MODES, *versus_ddp.DDP_RUNS]))
@click.option("--scenarios", default="equal", help="Comma-separated: " + ", ".join(versus_ddp.SCENARIOS))
@click.option("--target", default=None, type=float, help="Top-1 to time (default: DDP's final top-1 per scenario and seed).")
@click.option("--workdir", default=None, type=click.Path(file_okay=False), help="Keep data, logs and checkpoints here.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def versus_ddp_cmd(data, model, workers, steps, eval_every, batch_size, image_size, lr, momentum, local_steps, augment,
                   seeds, modes, scenarios, target, workdir, as_json):
    """torch DDP and paramhub's modes on the same images, model and recipe: accuracy, speed, time to target."""
    setup_logging("WARNING")
    try:
        settings = versus_ddp.Settings(
            data=data, model=model, workers=workers, steps=steps, eval_every=eval_every, batch_size=batch_size,
            image_size=image_size, lr=lr, momentum=momentum, local_steps=local_steps, augment=augment,
            seeds=tuple(int(s) for s in seeds.split(",") if s.strip()),
            modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
            scenarios=tuple(s.strip() for s in scenarios.split(",") if s.strip()), target=target)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    result = versus_ddp.run(settings, workdir, echo=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(result, indent=2) if as_json else
               f"CPU: {result['cpu']}\n" + versus_ddp.format_table(result["lines"], result["skipped"]))


@main.command("round")
@click.option("--workers", default=4, type=click.IntRange(min=1), help="N: workers, and gloo ranks.")
@click.option("--wire-dtype", default="fp32", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="How floats travel between the workers and the server (gloo always reduces fp32).")
@click.option("--model", default="resnet50", type=click.Choice(ARCHS), help="Whose layout and size.")
@click.option("--repeats", default=5, type=click.IntRange(min=1), help="Timed rounds of each path.")
@click.option("--warmup", default=1, type=click.IntRange(min=0), help="Untimed rounds of each path first.")
@click.option("--split-rounds", default=2, type=click.IntRange(min=0),
              help="Extra rounds with the pushes and the pulls apart, for the server's CPU per byte of each.")
@click.option("--standby", is_flag=True,
              help="Also time the same rounds on a second server followed by a standby (ps-server --standby-for), "
                   "interleaved: the cost of replication as a ratio to the round without.")
@click.option("--replicate-in-wire-dtype", is_flag=True,
              help="Give the servers ps-server's --replicate-in-wire-dtype (updates rounded to --wire-dtype).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def round_cmd(workers, wire_dtype, model, repeats, warmup, split_rounds, standby, replicate_in_wire_dtype,
              as_json):
    """A full sync round (N pushes, SGD, N pulls) against gloo all_reduce of the same tensor, interleaved."""
    setup_logging("WARNING")
    result = bench_round.run_round(model, workers, wire_dtype, repeats, warmup, split_rounds, standby=standby,
                                   replicate_in_wire_dtype=replicate_in_wire_dtype)
    click.echo(json.dumps(result) if as_json else bench_round.format_round(result))


@main.command("aggregate")
@click.option("--workers", default=4, type=click.IntRange(min=1), help="N: pushes averaged per update.")
@click.option("--model", default="resnet50", type=click.Choice(ARCHS), help="Whose layout and size.")
@click.option("--wire-dtype", default="fp32", type=click.Choice(["fp32", "bf16", "fp16"]), help="Dtype of the pushes.")
@click.option("--repeats", default=7, type=click.IntRange(min=1), help="Timed rounds of each path.")
@click.option("--warmup", default=1, type=click.IntRange(min=0), help="Untimed rounds of each path first.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def aggregate(workers, model, wire_dtype, repeats, warmup, as_json):
    """The server's update math (mean of N pushes, SGD) against copying the same bytes, interleaved."""
    keep_freed_memory_resident()  # as the server does
    setup_logging("WARNING")
    result = bench_round.run_aggregate(model, workers, repeats, warmup, wire_dtype)
    click.echo(json.dumps(result) if as_json else bench_round.format_aggregate(result))


@main.command("codecs")
@click.option("--model", default="resnet50", type=click.Choice(ARCHS))
@click.option("--image-size", default=64, type=click.IntRange(min=8), help="Of the random images the gradient is taken on.")
@click.option("--codecs", "specs", default=",".join(bench_codecs.DEFAULT_SPECS), help="Comma-separated codec specs.")
@click.option("--repeats", default=3, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def codecs_cmd(model, image_size, specs, repeats, as_json):
    """Bytes per push and encode/receive time of each codec on one real gradient, against fp32."""
    from paramhub.common.codecs import CodecError

    try:
        result = bench_codecs.run(model, image_size, [s.strip() for s in specs.split(",") if s.strip()], repeats)
    except CodecError as exc:
        raise click.UsageError(str(exc)) from None
    result["cpu"] = versus_ddp.cpu_model()
    click.echo(json.dumps(result, indent=2) if as_json else f"CPU: {result['cpu']}\n" + bench_codecs.format_table(result))


if __name__ == "__main__":
    main()
