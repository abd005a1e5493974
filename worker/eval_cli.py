"""ps-eval: evaluate the global model of a running parameter server.

Every option can also come from an environment variable named PARAMHUB_ plus the
option in upper case (``--every`` → ``PARAMHUB_EVERY``), or from the ``[eval]`` (and
``[common]``) table of a ``--config`` TOML file: a flag wins over a variable, a variable
over the file, the file over the default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import signal
import sys
import threading

import click

from paramhub.common.config import PRECISE_BN_BATCHES, Timeouts
from paramhub.common.cliutil import config_file_option, pop_security, security_options
from paramhub.common.runtime import LOG_FORMATS, configure_torch_threads, setup_logging
from paramhub.worker.cli import _address

log = logging.getLogger("paramhub.worker")
DEFAULT_EVERY_S = 60.0


def _tensorboard(ctx, param, value: str | None) -> str | None:
    """Fails at once, before any connection, when the tensorboard package is missing."""
    if value is not None and importlib.util.find_spec("tensorboard") is None:
        raise click.BadParameter("needs the tensorboard package: pip install tensorboard")
    return value


@click.command(context_settings={"auto_envvar_prefix": "PARAMHUB", "show_default": True})
@config_file_option("eval")
@click.option("--server", default="127.0.0.1:50051", callback=_address, help="The server's host:port.")
@click.option("--data", required=True, help="An ImageFolder directory of held-out images, or 'synthetic'.")
@click.option("--image-size", default=224, type=click.IntRange(min=8), help="Images are brought to this size (from 128 px: resize and center crop, as ImageNet training crops; below: resized whole).")
@click.option("--every", default=None, type=click.FloatRange(min=0), metavar="SECONDS",
              help=f"Evaluate new versions at most every SECONDS until the run is done [default: {DEFAULT_EVERY_S:g}].")
@click.option("--once", is_flag=True, help="Evaluate the current version once and exit.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Append one JSON line per evaluation here.")
@click.option("--checkpoint-dir", default=None, type=click.Path(file_okay=False),
              help="Keep the best model so far here (best.safetensors, best.json).")
@click.option("--tensorboard", default=None, type=click.Path(file_okay=False), callback=_tensorboard, metavar="DIR",
              help="Write top1/top5/loss by version as TensorBoard scalars here (needs `pip install tensorboard`).")
@click.option("--precise-bn-data", default=None, metavar="DIR",
              help="Training images (an ImageFolder, a ps-data shard or the directory of all shards): before "
                   "scoring, recompute each version's BatchNorm statistics on them ('precise BN'); the metrics "
                   "line then has top1 (after) and top1_running_stats (before), and the kept best model the "
                   "recomputed statistics.")
@click.option("--precise-bn-batches", default=PRECISE_BN_BATCHES, type=click.IntRange(min=1),
              help="Batches of --batch-size images for --precise-bn-data.")
@click.option("--batch-size", default=64, type=click.IntRange(min=1))
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--eval-size", default=1024, type=click.IntRange(min=1), help="Samples in the synthetic set.")
@click.option("--seed", default=0, type=int, help="Synthetic class patterns: the workers' --seed.")
@click.option("--loader-workers", default=0, type=click.IntRange(min=0), help="DataLoader worker processes.")
@click.option("--name", default="", help="Name shown in the server's log.")
@click.option("--connect-timeout", default=60.0, type=click.FloatRange(min=0, min_open=True),
              help="Seconds to keep retrying an unreachable server, then exit 2.")
@click.option("--rpc-timeout", default=30.0, type=click.FloatRange(min=0, min_open=True), help="Deadline of each small RPC.")
@security_options
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--log-format", default="text", type=click.Choice(LOG_FORMATS), help="Plain lines, or JSON lines with structured event fields.")
def main(server, data, image_size, every, once, out, checkpoint_dir, tensorboard, precise_bn_data, precise_bn_batches,
         batch_size, device, eval_size, seed, loader_workers, name, connect_timeout, rpc_timeout, log_level, log_format,
         **security):
    """Evaluate the global model (top-1, top-5, loss) as an observer; keep the best one.

    Prints one JSON line per evaluation (version, top1, top5, loss, time, samples; with
    --precise-bn-data also top1_running_stats).
    Exits 0 when the run is done, 2 when the server is unreachable.
    """
    setup_logging(log_level, log_format)
    if once and every is not None:
        raise click.UsageError("--once and --every exclude each other")
    configure_torch_threads(0, log, "[eval] ")  # auto: not every paramhub process on this machine takes all cores
    from paramhub.common.data import DataError
    from paramhub.worker.client import PSClient, RunFailed, ServerUnreachable
    from paramhub.worker.evaluator import EvalConfig, Evaluator

    import grpc

    config = EvalConfig(
        server=server, data=data, image_size=image_size,
        every=None if once else (DEFAULT_EVERY_S if every is None else every), out=out,
        checkpoint_dir=checkpoint_dir, batch_size=batch_size, device=device, eval_size=eval_size, seed=seed,
        loader_workers=loader_workers, name=name, tensorboard=tensorboard,
        precise_bn_data=precise_bn_data, precise_bn_batches=precise_bn_batches,
        timeouts=dataclasses.replace(Timeouts(), connect=connect_timeout, rpc=rpc_timeout),
    )
    stop = threading.Event()
    # SIGTERM ends the loop after the current step, so the evaluator leaves cleanly.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if on_main_thread else None
    with PSClient(server, config.timeouts, security=pop_security(security)) as client:
        try:
            Evaluator(config, client, stop).run()
        except ServerUnreachable as exc:
            log.error("[eval] %s", exc)
            sys.exit(2)
        except (RunFailed, DataError, ValueError) as exc:
            log.error("[eval] %s", exc)
            sys.exit(1)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                log.error("[eval] the server at %s refused us: %s", server, exc.details())
            else:
                log.error("[eval] server refused a call: %s: %s", exc.code().name, exc.details())
            sys.exit(1)
        finally:
            if on_main_thread:
                signal.signal(signal.SIGTERM, previous)
    sys.exit(0)


if __name__ == "__main__":
    main()
