"""Test hosts in network namespaces: each gets its own address on a veth pair to the root namespace.

Needs root and iproute2; tests skip with the reason elsewhere. Addresses come
from 10.213.0.0/16 and exist only inside namespaces the test creates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest


def require_netns() -> None:
    """Skips the calling test unless network namespaces can be made here."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (the `ip` command) is not installed")
    probe = f"ph-probe-{uuid.uuid4().hex[:6]}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        pytest.skip("this kernel or sandbox refuses `ip netns add`")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Host:
    """A namespace joined to the root namespace by a veth pair on subnet 10.213.<n>.0/24.

    The root side is 10.213.<n>.1 (the server's address as this host sees it), the
    namespace side 10.213.<n>.2.
    """

    def __init__(self, n: int):
        tag = uuid.uuid4().hex[:6]
        self.name = f"ph-{tag}-{n}"
        self.root_if, self.ns_if = f"phr{tag}{n}", f"phn{tag}{n}"
        self.gateway, self.address = f"10.213.{n}.1", f"10.213.{n}.2"
        _ip("netns", "add", self.name)
        _ip("link", "add", self.root_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.root_if)
        _ip("link", "set", self.root_if, "up")
        for args in (("addr", "add", f"{self.address}/24", "dev", self.ns_if), ("link", "set", self.ns_if, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", self.name, "ip", *args)

    @property
    def wrapper(self) -> tuple[str, ...]:
        """Prefix that runs a command on this host."""
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        """Takes the link down: the host is cut off, its processes keep running."""
        _ip("link", "set", self.root_if, "down")

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.root_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
