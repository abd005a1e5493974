"""ps-server: run a parameter server.

Every option can also come from an environment variable named PARAMHUB_ plus the
option in upper case (``--lr`` → ``PARAMHUB_LR``), or from the ``[server]`` (and
``[common]``) table of a ``--config`` TOML file: a flag wins over a variable, a variable
over the file, the file over the default.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
import sys

import click

from paramhub.common import codec
from paramhub.common.config import (MAX_UPDATE_ABS, MODES, OPTIMIZERS, OUTER_OPTIMIZERS, PRECISE_BN_BATCHES,
                                    RESERVED_THREADS, SCHEDULES, UPDATES, ServerConfig, Timeouts)
from paramhub.common.models import ARCHS
from paramhub.common.cliutil import config_file_option, pop_security, security_options
from paramhub.common.runtime import LOG_FORMATS, configure_torch_threads, keep_freed_memory_resident, setup_logging
from paramhub.common.security import SecurityError

log = logging.getLogger("paramhub.ps")


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter("must be positive")
    return value


def _quorum(ctx, param, value: str) -> str | int:
    if value in ("all", "auto"):
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"expected all, auto or a number of pushes >= 1, got {value!r}")
    return int(value)


def _partition(ctx, param, value: str) -> tuple[int, int]:
    k, sep, m = value.partition("/")
    if not sep or not k.isdigit() or not m.isdigit() or not 0 <= int(k) < int(m):
        raise click.BadParameter(f"expected k/m with 0 <= k < m, got {value!r}")
    return int(k), int(m)


@click.command(context_settings={"auto_envvar_prefix": "PARAMHUB", "show_default": True})
@config_file_option("server")
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=50051, type=click.IntRange(0, 65535), help="Port; 0 picks a free one.")
@click.option("--model", default="resnet50", type=click.Choice(ARCHS), help="Architecture (torchvision).")
@click.option("--num-classes", default=1000, type=click.IntRange(min=1), help="Classes of the head.")
@click.option("--seed", default=0, type=int, help="Seed of the initial weights.")
@click.option("--mode", default="sync", type=click.Choice(MODES), help="Consistency mode.")
@click.option("--update", default="grad", type=click.Choice(UPDATES), help="What workers push.")
@click.option("--workers", default=1, type=click.IntRange(min=1), help="N: the workers the run starts with (the first sync rounds wait for N); later, workers join and leave at any time and rounds follow the live ones.")
@click.option("--max-workers", default=None, type=click.IntRange(min=1), help="The most workers training at once; further joins are refused (RESOURCE_EXHAUSTED) until one leaves [default: no limit but --max-live-workers].")
@click.option("--data-leases", is_flag=True, help="Hand out each epoch's samples as leases with the pulls and count each one trained exactly once, across joins, deaths and restarts; workers then train on the whole --data, not on a shard.")
@click.option("--lease-size", default=256, type=click.IntRange(min=1), help="--data-leases: samples per lease.")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="--data-leases: end the run once this many epochs are trained.")
@click.option("--backup-workers", default=0, type=click.IntRange(min=0), help="b: a round closes after N-b pushes.")
@click.option("--quorum", default="all", callback=_quorum, help="Sync: all (wait for N-b, drop late pushes), auto or Q: close after the quorum (auto: N-b, else a majority) and an adaptive grace window; late pushes go into the next update, damped.")
@click.option("--grace-k", default=3.0, type=click.FloatRange(min=0), help="--quorum auto: the grace window is median + k MAD of recent rounds' arrival times.")
@click.option("--staleness", default=None, type=click.IntRange(min=0), help="Async: the staleness bound s (default unbounded); 0 behaves as sync.")
@click.option("--staleness-damping/--no-staleness-damping", default=None, help="Scale each update by 1/(1+staleness) [default: on for async avg, else off].")
@click.option("--batch-share/--no-batch-share", default=None, help="Async: scale each update by its share of the global batch, so --lr is the sync-equivalent rate [default: on for async grad].")
@click.option("--momentum-correction/--no-momentum-correction", default=None, help="Async SGD: apply --momentum less the implicit momentum of asynchrony (1 - 1/N), so --momentum is the sync-equivalent [default: on for async].")
@click.option("--optimizer", default="sgd", type=click.Choice(OPTIMIZERS), help="Gradient mode: the server's optimizer.")
@click.option("--lr", default=0.1, type=float, callback=_positive, help="Gradient mode: the server's learning rate.")
@click.option("--momentum", default=0.9, type=click.FloatRange(0, 1, max_open=True), help="SGD momentum.")
@click.option("--nesterov/--no-nesterov", default=False, help="Nesterov momentum.")
@click.option("--weight-decay", default=0.0, type=click.FloatRange(min=0), help="Weight decay (decoupled for AdamW).")
@click.option("--lr-schedule", default="constant", type=click.Choice(SCHEDULES), help="LR by version after warm-up (cosine ends at --max-steps).")
@click.option("--warmup-versions", default=0, type=click.IntRange(min=0), help="Linear LR warm-up over this many versions.")
@click.option("--lr-step-size", default=1000, type=click.IntRange(min=1), help="Step schedule: versions between decays.")
@click.option("--lr-gamma", default=0.1, type=click.FloatRange(0, 1), help="Step schedule: decay factor.")
@click.option("--local-steps", default=1, type=click.IntRange(min=1), help="Averaging mode: H local steps per push.")
@click.option("--local-lr", default=0.05, type=float, callback=_positive, help="Averaging mode: the workers' local SGD learning rate.")
@click.option("--local-momentum", default=0.9, type=click.FloatRange(0, 1, max_open=True), help="Averaging mode: local SGD momentum.")
@click.option("--outer-optimizer", default="none", type=click.Choice(OUTER_OPTIMIZERS), help="Averaging mode: none (plain averaging) or nesterov (DiLoCo).")
@click.option("--outer-lr", default=0.7, type=float, callback=_positive, help="DiLoCo outer learning rate.")
@click.option("--outer-momentum", default=0.3, type=click.FloatRange(0, 1, max_open=True), help="DiLoCo outer Nesterov momentum (0.3 with --outer-lr 0.7: a steady-state step of one plain average, measured best for short rounds; the DiLoCo paper's 0.9 is for rounds of hundreds of steps).")
@click.option("--max-steps", default=None, type=click.IntRange(min=1), help="End the run at this global version.")
@click.option("--checkpoint-dir", default=None, type=click.Path(file_okay=False), help="Where checkpoints go.")
@click.option("--checkpoint-every", default=0, type=click.IntRange(min=0), help="Checkpoint every V versions (0: end only).")
@click.option("--keep-checkpoints", default=3, type=click.IntRange(min=1), help="How many checkpoints to keep.")
@click.option("--resume", is_flag=True, help="Continue from the newest valid checkpoint in --checkpoint-dir.")
@click.option("--linger", is_flag=True,
              help="After --max-steps, keep serving the final model (pulls, status, health) until SIGTERM instead of "
                   "exiting: for controllers that restart a container that exits (a Kubernetes StatefulSet).")
@click.option("--init-from", default=None, type=click.Path(dir_okay=False), help="Start from this local state_dict (.safetensors or .pt, torchvision format).")
@click.option("--new-head", is_flag=True, help="With --init-from: a fresh classifier head for --num-classes.")
@click.option("--freeze-backbone", is_flag=True, help="Train only the head; only its tensors travel on the wire.")
@click.option("--eval-data", default=None, help="Evaluate the global model on this ImageFolder directory (or 'synthetic').")
@click.option("--eval-every", default=0, type=click.IntRange(min=0), help="Evaluate every V versions (needs --eval-data).")
@click.option("--eval-image-size", default=224, type=click.IntRange(min=8), help="Image size for --eval-data.")
@click.option("--eval-size", default=1024, type=click.IntRange(min=1), help="Samples of synthetic evaluation data.")
@click.option("--eval-precise-bn-data", default=None, metavar="DIR",
              help="Before each evaluation, recompute the BatchNorm statistics on these training images (an "
                   "ImageFolder, a ps-data shard or the directory of all shards: 'precise BN'); the record has "
                   "top1 (after) and top1_running_stats (before).")
@click.option("--eval-precise-bn-batches", default=PRECISE_BN_BATCHES, type=click.IntRange(min=1),
              help="Batches of 64 images for --eval-precise-bn-data.")
@click.option("--lease-timeout", default=30.0, type=float, callback=_positive, help="Seconds of silence before a worker is lost.")
@click.option("--round-timeout", default=300.0, type=float, callback=_positive, help="A sync round closes with what arrived after this many seconds.")
@click.option("--partition", default="0/1", callback=_partition, help="k/m: hold partition k of m of the model's tensors (start m servers, one per k).")
@click.option("--codec", default="", help="How workers push their updates: NAME or NAME:key=value,... One of fp32, bf16, fp16 (dense), topk:ratio=R (the R largest elements, error feedback), or a codec another package installs (entry points paramhub.codecs). Default: dense in --wire-dtype.")
@click.option("--topk-ratio", default=0.0, type=click.FloatRange(0, 1), help="Shorthand for --codec topk:ratio=R: workers push only this fraction of each update's largest elements, keeping the rest as error feedback (0: dense).")
@click.option("--wire-dtype", default="fp32", type=click.Choice(["fp32", "bf16", "fp16"]), help="How floats travel in pulls, and in pushes unless --codec says otherwise (bf16/fp16 halve the bytes).")
@click.option("--chunk-bytes", default=codec.DEFAULT_CHUNK_BYTES,
              type=click.IntRange(codec.MIN_CHUNK_BYTES, codec.MAX_CHUNK_BYTES),
              help="Payload bytes per chunk of a pull, and the most a push chunk may carry (workers follow it).")
@click.option("--concurrent-pushes", default=1, type=click.IntRange(min=1), help="Pushes received and held at once, each up to the model's size on the wire (memory vs. overlap on many-core servers).")
@click.option("--max-update-abs", default=MAX_UPDATE_ABS, type=click.FloatRange(min=0, min_open=True),
              help="Refuse a push holding any value above this magnitude (INVALID_ARGUMENT): keeps the server's sums "
                   "and the model finite whatever a worker sends.")
@click.option("--clip-factor", default=None, type=click.FloatRange(min=0, min_open=True),
              help="For untrusted fleets: scale each push down to at most this multiple of the median L2 norm of the "
                   "last 32 pushes, and count it at most the median sample count (off by default; 3 is a good start).")
@click.option("--max-live-workers", default=1024, type=click.IntRange(min=1), help="Workers and observers registered with a live lease at once; joins beyond are refused (RESOURCE_EXHAUSTED).")
@click.option("--keep-departed", default=128, type=click.IntRange(min=0), help="Departed workers (left or lost) remembered and listed by Status; older departures are only counted.")
@click.option("--pull-wait", default=20.0, type=float, callback=_positive, help="Longest a Pull waits server-side for a new version.")
@click.option("--rpc-threads", default=128, type=click.IntRange(min=RESERVED_THREADS + 1), help="gRPC handler threads (started as needed); every open Push or Pull holds one.")
@click.option("--max-open-streams", default=None, type=click.IntRange(min=1), help=f"Push and Pull streams open at once; more are refused at once as busy (RESOURCE_EXHAUSTED, clients retry) [default: --rpc-threads - {RESERVED_THREADS}, the {RESERVED_THREADS} kept for health, Status, Join, Heartbeat, Leave].")
@click.option("--max-streams-per-peer", default=64, type=click.IntRange(min=1), help="Push and Pull streams open at once from one client address (a host's workers share it; each has up to 2 pushes and 2 pulls open).")
@click.option("--stall-timeout", default=60.0, type=float, callback=_positive, help="Cancel a push that sends nothing, or a pull whose client reads nothing, for this many seconds.")
@click.option("--request-timeout", default=5.0, type=float, callback=_positive, help="Cancel a call whose request message has not arrived this many seconds after it opened (clients send it at once).")
@click.option("--port-file", default=None, type=click.Path(dir_okay=False),
              help="Write the bound port here once listening (for --port 0).")
@click.option("--metrics-port", default=0, type=click.IntRange(0, 65535),
              help="Serve Prometheus metrics on http://HOST:PORT/metrics (read-only, no auth; 0: off).")
@click.option("--http-port", default=0, type=click.IntRange(0, 65535),
              help="Serve the live status page and /api/status on this port (read-only, no auth; 0: off).")
@click.option("--standby-for", default=None, metavar="HOST:PORT",
              help="Run as the standby of the primary at HOST:PORT: follow every version it publishes (workers see "
                   "a version only once the standby has it), refuse worker calls, and take over under a higher term "
                   "when the primary is gone for --failover-after seconds. Same model and run flags as the primary.")
@click.option("--failover-after", default=3.0, type=click.FloatRange(0, 60, min_open=True),
              help="--standby-for: seconds without the primary (its stream broken, unreachable) before taking over.")
@click.option("--replication-timeout", default=5.0, type=click.FloatRange(0, 300, min_open=True),
              help="A primary detaches a standby that acknowledges nothing this many seconds and goes on alone "
                   "(unprotected, logged and in Status) until it re-attaches.")
@click.option("--replicate-in-wire-dtype", is_flag=True,
              help="Round each averaged update to --wire-dtype before applying it (always, standby or not), so a "
                   "standby receives it in that dtype: half the replication bytes with bf16/fp16.")
@security_options
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host with neither TLS nor a token.")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--log-format", default="text", type=click.Choice(LOG_FORMATS), help="Plain lines, or JSON lines with structured event fields.")
def main(log_level, log_format, port_file, lease_timeout, round_timeout, pull_wait, stall_timeout, request_timeout,
         **options):
    """Run a parameter server that holds the global model and applies the workers' updates."""
    setup_logging(log_level, log_format)
    keep_freed_memory_resident()
    for key in ("metrics_port", "http_port"):
        options[key] = options[key] or None  # 0 is off here; in ServerConfig 0 picks a free port (tests)
    security = pop_security(options)
    try:
        config = ServerConfig(
            **options,
            security=security,
            timeouts=dataclasses.replace(Timeouts(), lease=lease_timeout, round=round_timeout, pull_wait=pull_wait,
                                         stall=stall_timeout, request=request_timeout),
        )
    except SecurityError as exc:  # an exposed listener: refused as a failure, not a usage error
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # ServerConfig's cross-field checks: every way of building a config gets them
        raise click.UsageError(str(exc)) from None
    # auto: not every paramhub process on this machine takes all cores; re-checked as workers start beside it
    configure_torch_threads(0, log, "[server] ", recheck=True)
    from paramhub.ps.server import PSServer

    from paramhub.common.models import WeightsError, initial_state_in_child
    from paramhub.common.shards import DataError

    try:
        # the model is built in a child process: this one never imports torchvision (164 MB it would keep)
        server = PSServer(config, build=initial_state_in_child)
        server.start()
    except (WeightsError, SecurityError, DataError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    if port_file:
        tmp = pathlib.Path(f"{port_file}.tmp")
        tmp.write_text(f"{server.port}\n")
        tmp.replace(port_file)  # readers never see a half-written file
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: server.stop())
    server.run_until_done()
    if server.store.failure:
        log.error("[server] run failed: %s", server.store.failure)
        sys.exit(1)
    log.info("[server] stopped at version %d%s", server.store.version,
             f"; final checkpoint {server.last_checkpoint}" if server.last_checkpoint else "")
    sys.exit(0)


if __name__ == "__main__":
    main()
