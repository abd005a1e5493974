"""``make demo``: one server, two workers, synthetic data, small images; prints the loss falling.

Runs real ps-server and ps-worker processes on loopback and watches the server's
Status RPC, printing the mean training loss of every global version.
"""

from __future__ import annotations

import sys
import time

import click

from paramhub.common.config import Timeouts
from paramhub.tools.cluster import LocalCluster


@click.command()
@click.option("--model", default="resnet18", show_default=True)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=2))
@click.option("--image-size", default=32, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--timeout", default=600.0, show_default=True, help="Give up after this many seconds.")
def main(model, workers, steps, image_size, batch_size, timeout):
    """Train a small model on a local cluster and print the loss per global version."""
    from paramhub.worker.client import PSClient

    with LocalCluster() as cluster:
        cluster.start_server("--model", model, "--num-classes", "10", "--workers", str(workers),
                             "--max-steps", str(steps), "--lr", "0.02", "--momentum", "0.9",
                             "--checkpoint-dir", str(cluster.workdir / "checkpoints"))
        for shard in range(workers):
            cluster.start_worker(shard, "--data", "synthetic", "--image-size", str(image_size),
                                 "--batch-size", str(batch_size), "--synthetic-size", "2048", "--log-every", "0")
        print(f"server on {cluster.address}, {workers} workers, logs in {cluster.workdir}")
        print(f"{'version':>7}  {'loss':>8}")
        losses = {}
        deadline = time.monotonic() + timeout
        with PSClient(cluster.address, Timeouts(rpc=5, connect=10)) as client:
            while cluster.server.poll() is None and time.monotonic() < deadline:
                try:
                    status = client.status()
                except Exception:
                    break  # the server has finished and gone away
                if status.version and status.version not in losses:
                    losses[status.version] = status.last_loss
                    print(f"{status.version:>7}  {status.last_loss:>8.4f}", flush=True)
                if status.done:
                    break
                time.sleep(0.2)
        codes = cluster.wait(timeout=max(1.0, deadline - time.monotonic()))
    values = [losses[v] for v in sorted(losses)]
    if len(values) >= 6:
        print(f"mean loss of the first 3 versions {sum(values[:3]) / 3:.4f}, "
              f"of the last 3 {sum(values[-3:]) / 3:.4f}")
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        print(f"processes failed: {failed}; logs in {cluster.workdir}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
