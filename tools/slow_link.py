"""The ``slow-link`` scenario: every worker behind a link limited to ``mbit`` (network namespaces and ``tc tbf``).

A small virtual network made only of namespaces this module creates, torn down on the
way out (on errors and Ctrl-C too); the root namespace's interfaces, routes and sysctls
are never touched, and every address is private to these namespaces (10.214.0.0/16):

* a "switch" namespace holding a Linux bridge (``br0``);
* one host namespace per node: the server host and worker hosts 0..N-1 (DDP rank r runs
  on worker host r). Each joins the bridge with a veth pair whose host end is called
  ``ph0`` in every host, so one ``GLOO_SOCKET_IFNAME=ph0`` serves every DDP rank.

Each worker host's link is limited to ``mbit`` in both directions: a ``tbf`` qdisc on
both ends of its veth (the host end shapes what it sends, the switch end what it
receives). The server host's link is not limited: the head node of a cluster has a fat
pipe, the workers share thin ones, so a worker's own link is what the benchmark slows.
DDP's ranks talk only worker to worker, so each of their exchanges crosses two slow links.

The server listens on 0.0.0.0 in its host, protected by a token (``PARAMHUB_TOKEN``,
random per network) that every process gets in its environment.

Needs root and iproute2 (``ip``, ``tc``); elsewhere :func:`slow_link_limits` raises
``Skipped`` with the reason.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import uuid
import warnings
from typing import Iterator

from paramhub.tools.versus_ddp import Limits

IFNAME = "ph0"  # the host end of every veth, in every host namespace
BRIDGE = "br0"
COMMAND_TIMEOUT = 15.0


def address(index: int) -> str:
    """The address of host ``index`` (0: the server, 1 + r: worker r) in 10.214.0.0/16."""
    n = index + 1
    if n > 65534:
        raise ValueError("at most 65533 workers fit in 10.214.0.0/16")
    return f"10.214.{n >> 8}.{n & 255}"


def tbf_args(mbit: float) -> list[str]:
    """``tc`` arguments for a ``mbit`` token bucket: ~64 kbit of burst per 10 Mbit (at least 32 KB), a 50 ms queue."""
    burst = max(32 * 1024, int(mbit * 1000))  # bytes: 100 KB at 100 Mbit/s
    return ["tbf", "rate", f"{mbit:g}mbit", "burst", str(burst), "latency", "50ms"]


class NetworkError(RuntimeError):
    """A command that builds the network failed (the message has the command and its stderr)."""


def _run(*argv: str, netns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise NetworkError(f"`{' '.join(cmd)}` did not finish in {COMMAND_TIMEOUT:.0f}s") from None
    if done.returncode:
        raise NetworkError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")


class SlowNetwork:
    """The namespaces and links of one slow-link network; :meth:`remove` deletes all of them.

    Args:
        workers: how many worker hosts.
        mbit: each worker link's rate, both directions (None: no limit).
    """

    def __init__(self, workers: int, mbit: float | None, tag: str | None = None):
        self.tag = tag or f"phsl-{uuid.uuid4().hex[:6]}"
        self.workers = workers
        self.mbit = mbit
        self.switch = f"{self.tag}-sw"
        self.server = f"{self.tag}-srv"
        self.hosts = [f"{self.tag}-w{r}" for r in range(workers)]
        self.made: list[str] = []  # namespaces, in the order made

    @property
    def namespaces(self) -> list[str]:
        return [self.switch, self.server, *self.hosts]

    @property
    def server_ip(self) -> str:
        return address(0)

    def worker_ip(self, rank: int) -> str:
        return address(1 + rank)

    def _add_netns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.made.append(name)
        _run("ip", "link", "set", "lo", "up", netns=name)

    def build(self) -> "SlowNetwork":
        self._add_netns(self.switch)
        _run("ip", "link", "add", BRIDGE, "type", "bridge", netns=self.switch)
        _run("ip", "link", "set", BRIDGE, "up", netns=self.switch)
        for index, host in enumerate([self.server, *self.hosts]):
            self._add_netns(host)
            port = f"p{index}"
            # Both ends are created inside their namespaces: nothing ever appears in the root one.
            _run("ip", "link", "add", IFNAME, "netns", host, "type", "veth", "peer", "name", port,
                 "netns", self.switch)
            _run("ip", "link", "set", port, "master", BRIDGE, netns=self.switch)
            _run("ip", "link", "set", port, "up", netns=self.switch)
            _run("ip", "addr", "add", f"{address(index)}/16", "dev", IFNAME, netns=host)
            _run("ip", "link", "set", IFNAME, "up", netns=host)
            if index > 0 and self.mbit is not None:  # a worker: shape both directions
                _run("tc", "qdisc", "add", "dev", IFNAME, "root", *tbf_args(self.mbit), netns=host)
                _run("tc", "qdisc", "add", "dev", port, "root", *tbf_args(self.mbit), netns=self.switch)
        return self

    def remove(self) -> list[str]:
        """Deletes every namespace made (their veths and the bridge go with them); returns what would not go."""
        left = []
        for name in reversed(self.made):
            with contextlib.suppress(subprocess.TimeoutExpired):
                if subprocess.run(["ip", "netns", "del", name], capture_output=True,
                                  timeout=COMMAND_TIMEOUT).returncode == 0:
                    continue
            left.append(name)
        self.made = left
        return left


class SlowLink(Limits):
    """Runs the server on the server host and worker / DDP rank r on worker host r of a :class:`SlowNetwork`."""

    def __init__(self, network: SlowNetwork, token: str | None = None):
        self.network = network
        self.token = token or secrets.token_hex(16)

    @staticmethod
    def _on(host: str) -> list[str]:
        return ["ip", "netns", "exec", host]

    def env(self) -> dict[str, str]:
        return {"GLOO_SOCKET_IFNAME": IFNAME, "PARAMHUB_TOKEN": self.token}

    def ddp_prefixes(self, world_size: int) -> dict[int, list[str]]:
        return {r: self._on(self.network.hosts[r]) for r in range(world_size)}

    def worker_prefix(self, shard: int) -> tuple[str, ...]:
        return tuple(self._on(self.network.hosts[shard]))

    def server_prefix(self) -> tuple[str, ...]:
        return tuple(self._on(self.network.server))

    def server_flags(self) -> list[str]:
        return ["--host", "0.0.0.0"]  # not loopback: allowed because PARAMHUB_TOKEN is set (env())

    def server_address(self, cluster) -> str:
        return f"{self.network.server_ip}:{cluster.port}"


def unavailable() -> str | None:
    """Why this machine cannot build the network, or None if it may (``ip netns add`` is tried when building)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs iproute2: {' and '.join(missing)} not found"
    return None


@contextlib.contextmanager
def slow_network(workers: int, mbit: float | None) -> Iterator[SlowNetwork]:
    """Builds a :class:`SlowNetwork` and always removes it afterwards. Raises NetworkError if it cannot be built."""
    network = SlowNetwork(workers, mbit)
    try:
        yield network.build()
    finally:
        network.remove()


@contextlib.contextmanager
def slow_link_limits(workers: int, mbit: float) -> Iterator[SlowLink]:
    """The ``slow-link`` scenario's limits: each worker's link held to ``mbit`` Mbit/s both ways, the server's not.

    Raises:
        Skipped: not root, iproute2 missing, or this kernel/sandbox refuses to build the network.
    """
    from paramhub.tools.versus_ddp import Skipped

    why = unavailable()
    if why:
        raise Skipped(why)
    network = SlowNetwork(workers, mbit)
    try:
        try:
            network.build()
        except NetworkError as exc:
            raise Skipped(f"could not build the namespaced network: {exc}") from None
        yield SlowLink(network)
    finally:
        left = network.remove()
        if left:
            warnings.warn(f"slow-link: could not delete network namespaces {left}; `ip netns del` them by hand")
