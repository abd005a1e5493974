"""The docker-compose cluster, for real: the image is built, the cluster trains, and survives kills.

`make cluster-test` runs this (PARAMHUB_CLUSTER_TEST=1); `make test` skips it. It builds the CPU
image (deploy/build-image.sh: offline when no registry answers), brings up deploy/docker-compose.yml
with deploy/docker-compose.hostnet.yml (every container on the host network, the server on
127.0.0.1), with resnet18 on the 8x8 handwritten digits at 32 px split into two shards, and checks
from outside the containers:

- the server's healthcheck turns healthy, and every probe fits its timeout;
- the processes run as uid 10001, and /data is read-only;
- the server SIGKILLed mid-run: compose restarts it, it resumes from its checkpoint volume, and
  the workers join again; a worker SIGKILLed: it restarts and joins again;
- every container ends with exit 0; the server's ledger holds every version exactly once, from
  pushes each applied once (nothing lost, nothing doubled), from both shards;
- ps-eval wrote its metrics and its best model; the final checkpoint exports to a state_dict that
  torchvision's resnet18 loads strictly.

It prints what it measured (wall times, probe durations, image size, the server's peak RSS).
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from conftest import wait_for
from docker_env import DEPLOY, REPO, Compose, DockerUnavailable, docker, docker_daemon
from paramhub.common.checkpoint import list_checkpoints, load_checkpoint
from paramhub.common.config import Timeouts
from paramhub.common.security import Security
from paramhub.ps.ledger import Ledger
from paramhub.tools.ctl import export_model
from paramhub.tools.versus_ddp import cpu_model
from paramhub.worker.client import PSClient

pytestmark = [
    pytest.mark.skipif(not os.environ.get("PARAMHUB_CLUSTER_TEST"), reason="docker cluster: `make cluster-test`"),
    pytest.mark.timeout(2400),
]

IMAGE = os.environ.get("PARAMHUB_IMAGE", "paramhub:cpu")
MAX_STEPS = 60
SERVICES = ("ps-server", "worker-0", "worker-1", "ps-eval")
HEALTH_TIMEOUT_S = 5  # docker-compose.yml's healthcheck timeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_image(figures: dict) -> None:
    started = time.monotonic()
    result = subprocess.run([str(DEPLOY / "build-image.sh")], cwd=REPO, env={**os.environ, "TAG": IMAGE},
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures["image build (s)"] = round(time.monotonic() - started, 1)
    figures["image size (MB)"] = round(int(docker("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout) / 1e6)


def write_digits(root) -> None:
    """The 8x8 handwritten digits at 32 px, split into two shards and a held-out val/ (real data)."""
    for args in (["paramhub.tools.digits", "--out", str(root / "digits"), "--size", "32"],
                 ["paramhub.tools.data", "split", "--input", str(root / "digits"), "--shards", "2",
                  "--out", str(root / "data" / "shards"), "--val-fraction", "0.1"]):
        subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True, timeout=300)


def server_version(client: PSClient) -> int:
    try:
        return client.status().version
    except Exception:  # noqa: BLE001 - down while it restarts: not there yet
        return -1


def healthy(cluster: Compose, service: str = "ps-server") -> bool:
    health = cluster.state(service).get("Health") or {}
    return health.get("Status") == "healthy"


def probe_durations(cluster: Compose) -> list[float]:
    """Seconds each of the server's recent health probes took (docker keeps the last five)."""
    from datetime import datetime

    def parse(stamp: str) -> float:  # RFC 3339 with nanoseconds; Python reads microseconds
        head, _, rest = stamp.partition(".")
        fraction = re.match(r"\d*", rest).group()[:6]
        zone = rest[len(re.match(r"\d*", rest).group()):].replace("Z", "+00:00")
        return datetime.fromisoformat(f"{head}.{fraction or '0'}{zone}").timestamp()

    log = (cluster.state("ps-server").get("Health") or {}).get("Log") or []
    return [parse(entry["End"]) - parse(entry["Start"]) for entry in log]


def pids_of(cluster: Compose, service: str, program: str) -> list[int]:
    """The host PIDs of the ``program`` processes (a console script) in ``service``'s container."""
    rows = docker("top", cluster.container(service), "-eo", "pid,args").stdout.splitlines()[1:]
    pids = [int(row.split()[0]) for row in rows
            if any(word.endswith("/" + program) or word == program for word in row.split()[1:3])]
    assert pids, f"no {program} process in {service}: {rows}"
    return pids


def peak_rss_mb(cluster: Compose, service: str, program: str) -> float:
    """The peak RSS (VmHWM) of ``program`` in ``service``'s container, read from the host's /proc."""
    values = [int(re.search(r"VmHWM:\s+(\d+) kB", open(f"/proc/{pid}/status").read()).group(1))
              for pid in pids_of(cluster, service, program)]
    return round(max(values) / 1024, 1)


def crash(cluster: Compose, service: str, program: str) -> None:
    """SIGKILLs ``program`` in ``service``'s container from the host, as an OOM kill or a crash would.

    Not `docker kill`: Docker counts that as a manual stop, and restart policies ignore manual stops
    (the container stays Exited (137)); a process that dies on its own is restarted.
    """
    for pid in pids_of(cluster, service, program):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def docker_ready(tmp_path_factory):
    try:
        with docker_daemon(tmp_path_factory.mktemp("dockerd")):
            yield
    except DockerUnavailable as exc:
        pytest.skip(str(exc))


def test_compose_cluster_trains_survives_kills_and_keeps_its_model(docker_ready, tmp_path):
    figures: dict[str, object] = {"cpu": cpu_model()}
    build_image(figures)
    write_digits(tmp_path)
    port, token = free_port(), secrets.token_hex(16)
    cluster = Compose(f"paramhubtest{os.getpid()}", {
        "PS_HOST": "127.0.0.1", "PS_PORT": str(port), "PS_ADDRESS": f"127.0.0.1:{port}",
        "PARAMHUB_TOKEN": token, "MODEL": "resnet18", "NUM_CLASSES": "10", "IMAGE_SIZE": "32",
        "MAX_STEPS": str(MAX_STEPS), "CHECKPOINT_EVERY": "5", "EVAL_EVERY": "15",
        "PARAMHUB_DATA": str(tmp_path / "data"), "TRAIN_DATA": "/data/shards", "VAL_DATA": "/data/shards/val"})
    client = PSClient(f"127.0.0.1:{port}", Timeouts(rpc=5, connect=5), security=Security(token=token))
    started = time.monotonic()
    try:
        cluster.run("up", "-d", "--no-build", timeout=600)  # returns once the server is healthy
        wait_for(lambda: healthy(cluster), 300, "the server's healthcheck", poll=1)
        figures["up to healthy (s)"] = round(time.monotonic() - started, 1)

        server = cluster.container("ps-server")
        assert docker("exec", server, "id", "-u").stdout.strip() == "10001"
        denied = docker("exec", cluster.container("worker-0"), "touch", "/data/written", check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied

        # the server, SIGKILLed mid-run: no final checkpoint; compose restarts it, it resumes
        wait_for(lambda: server_version(client) >= 15, 600, "version 15", poll=1)
        figures["server RSS before the kill, resnet18 (MB)"] = peak_rss_mb(cluster, "ps-server", "ps-server")
        killed_at = server_version(client)
        crash(cluster, "ps-server", "ps-server")
        killed = time.monotonic()
        wait_for(lambda: cluster.state("ps-server")["RestartCount"] >= 1, 120, "compose to restart the server", poll=1)
        wait_for(lambda: server_version(client) > killed_at, 300, "the resumed server to apply an update", poll=1)
        figures["server kill to next update (s)"] = round(time.monotonic() - killed, 1)

        # a worker, SIGKILLed: compose restarts it and it joins again
        wait_for(lambda: server_version(client) >= 35, 600, "version 35", poll=1)
        crash(cluster, "worker-1", "ps-worker")
        wait_for(lambda: cluster.state("worker-1")["RestartCount"] >= 1, 120, "compose to restart worker-1", poll=1)

        probes = probe_durations(cluster)
        figures["health probes (s), the last five"] = [round(d, 2) for d in probes]
        assert probes and max(probes) < HEALTH_TIMEOUT_S, probes
        wait_for(lambda: all(cluster.state(s)["Status"] == "exited" for s in SERVICES), 900,
                 "every container to finish", poll=1)
        figures["run wall time (s)"] = round(time.monotonic() - started, 1)
        logs = {s: cluster.logs(s) for s in SERVICES}
        codes = {s: cluster.state(s)["ExitCode"] for s in SERVICES}
        assert codes == dict.fromkeys(SERVICES, 0), {s: logs[s][-3000:] for s in SERVICES}
        out = tmp_path / "out"
        docker("cp", f"{server}:/checkpoints", str(out))
    except BaseException:
        for service in SERVICES:  # what each container said, for whoever reads the failure
            try:
                print(f"\n--- {service} (last 3000 characters) ---\n{cluster.logs(service)[-3000:]}")
            except Exception as exc:  # noqa: BLE001 - a container that never started: say so, keep the failure
                print(f"\n--- {service}: no logs ({exc}) ---")
        raise
    finally:
        client.close()
        cluster.down()

    assert "resuming from" in logs["ps-server"]
    assert "joining again" in logs["worker-0"] and "joining again" in logs["worker-1"]
    assert logs["ps-server"].count("worker shard-1 joined") >= 3  # first, after the server's restart, its own

    # the ledger: every version once, every push applied once, both shards in it
    _, server_state, meta = load_checkpoint(list_checkpoints(out / "server")[-1])
    assert meta["version"] == MAX_STEPS
    entries = Ledger.from_tensors(server_state).entries
    assert sorted({e.version for e in entries}) == list(range(1, MAX_STEPS + 1))  # nothing lost
    # Nothing doubled. A push is (worker id, incarnation, sequence) and the ledger keeps id and
    # sequence: a worker's sequences rise within one incarnation, and only a new incarnation (one
    # Join each, counted in the server's log) starts again, at 1. A push applied twice breaks that.
    joins = collections.Counter(int(i) for i in re.findall(r"worker shard-\d joined \(id (\d+)", logs["ps-server"]))
    sequences = collections.defaultdict(list)
    for entry in sorted(entries, key=lambda e: e.version):
        sequences[entry.worker_id].append(entry.sequence)
    for worker, seqs in sequences.items():
        restarts = [now for before, now in zip(seqs, seqs[1:]) if now <= before]
        assert all(now == 1 for now in restarts), (worker, seqs)
        assert 1 + len(restarts) <= joins[worker], (worker, seqs, joins)
    ids = {int(shard): {int(i) for i in re.findall(rf"worker shard-{shard} joined \(id (\d+)", logs["ps-server"])}
           for shard in "01"}
    assert all(set(sequences) & ids[shard] for shard in (0, 1)), ids  # both shards trained

    # ps-eval's metrics and best model; the final model loads into torchvision
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["version"] == MAX_STEPS and all(0 <= m["top1"] <= 1 for m in metrics)
    assert (out / "best" / "best.safetensors").is_file()
    for source in (out / "server", out / "best" / "best.safetensors"):
        export_model(source, tmp_path / "model.pt")
        model = torchvision.models.resnet18(num_classes=10)
        model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    figures["evaluations"] = len(metrics)
    figures["final top1"] = metrics[-1]["top1"]
    print("\ncluster test figures:", json.dumps(figures, indent=1))

