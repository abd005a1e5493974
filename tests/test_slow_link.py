"""The slow-link network (tools/slow_link.py): worker links really run at the rate asked, and nothing is left behind.

Measured with a plain TCP transfer of 20 MB between namespaces (a Python socket on
each side, ``ip netns exec``), timed by the receiver from its first byte to EOF. At
100 Mbit/s both directions of a worker's link must carry 60-110 Mbit/s; the negative
control is the same path in a network built without limits, which must be more than
3x faster. Needs root and network namespaces; skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from netns import require_netns
from paramhub.tools import slow_link
from paramhub.tools.slow_link import SlowLink, slow_link_limits, slow_network
from paramhub.tools.versus_ddp import Skipped

pytestmark = pytest.mark.timeout(120)
PORT, SIZE = 5201, 20 * 10**6

# argv: listen|connect, send|recv, host, port, bytes. The receiver prints {"bytes", "seconds"}.
_XFER = r"""
import json, socket, sys, time
role, direction, host, port, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if role == "listen":
    server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port)); server.listen(1); server.settimeout(20)
    print("listening", flush=True)
    conn, _ = server.accept()
else:
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5); break
        except OSError:
            if time.monotonic() > deadline: raise
            time.sleep(0.05)
conn.settimeout(20)
if direction == "send":
    chunk = b"x" * (1 << 20)
    left = size
    while left:
        left -= conn.send(chunk[:min(left, len(chunk))])
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)  # the receiver closes after EOF
else:
    got, first = 0, None
    while True:
        data = conn.recv(1 << 20)
        if first is None: first = time.monotonic()
        if not data: break
        got += len(data)
    print(json.dumps({"bytes": got, "seconds": time.monotonic() - first}), flush=True)
conn.close()
"""


def transfer(listener_ns: str, connector_ns: str, listen_ip: str, upload: bool, size: int = SIZE) -> float:
    """Mbit/s of one transfer of ``size`` bytes; ``upload``: the connector sends (else the listener does)."""
    on = lambda ns: ["ip", "netns", "exec", ns, sys.executable, "-c", _XFER]  # noqa: E731
    listener = subprocess.Popen([*on(listener_ns), "listen", "recv" if upload else "send", "0.0.0.0", str(PORT),
                                 str(size)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "listening", listener.stderr.read()
        connector = subprocess.run([*on(connector_ns), "connect", "send" if upload else "recv", listen_ip, str(PORT),
                                    str(size)], capture_output=True, text=True, timeout=30)
        out, err = listener.communicate(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(timeout=10)
    assert connector.returncode == 0 and listener.returncode == 0, (connector.stderr, err)
    measured = json.loads(out if upload else connector.stdout)
    assert measured["bytes"] == size
    return measured["bytes"] * 8 / measured["seconds"] / 1e6


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_worker_links_run_at_the_rate_asked_and_unlimited_ones_are_much_faster():
    require_netns()
    with slow_network(2, 100.0) as net:
        up = transfer(net.server, net.hosts[0], net.server_ip, upload=True)  # worker 0 -> server
        down = transfer(net.server, net.hosts[1], net.server_ip, upload=False)  # server -> worker 1
    with slow_network(2, None) as free:  # the negative control: the same path, no tbf
        unlimited = transfer(free.server, free.hosts[0], free.server_ip, upload=True)
    print(f"up {up:.1f} Mbit/s, down {down:.1f} Mbit/s, unlimited {unlimited:.1f} Mbit/s")
    assert 60 <= up <= 110, up
    assert 60 <= down <= 110, down
    assert unlimited > 3 * max(up, down), (unlimited, up, down)


def test_limits_run_each_process_on_its_host_and_leave_nothing_behind():
    require_netns()
    links, spaces = root_links(), netns_names()
    with slow_link_limits(3, 100.0) as limits:
        assert isinstance(limits, SlowLink)
        net = limits.network
        assert set(net.namespaces) <= netns_names()
        assert root_links() == links  # every veth lives inside the network's own namespaces
        assert limits.worker_prefix(2) == ("ip", "netns", "exec", net.hosts[2])
        assert limits.ddp_prefixes(2) == {r: ["ip", "netns", "exec", net.hosts[r]] for r in range(2)}
        assert limits.server_prefix() == ("ip", "netns", "exec", net.server)
        assert limits.env()["GLOO_SOCKET_IFNAME"] == "ph0" and limits.env()["PARAMHUB_TOKEN"]
        assert "0.0.0.0" in limits.server_flags()
        for host in (net.server, *net.hosts):
            shown = subprocess.run(["ip", "netns", "exec", host, "ip", "-o", "addr", "show", "dev", "ph0"],
                                   capture_output=True, text=True, timeout=10, check=True).stdout
            assert "10.214." in shown
        # a worker reaches the server at the address workers are given
        transfer(net.server, net.hosts[2], net.server_ip, upload=True, size=10**5)
    assert not set(net.namespaces) & netns_names()
    assert netns_names() == spaces and root_links() == links


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_network_is_removed_on_errors(error):
    require_netns()
    with pytest.raises(error):
        with slow_link_limits(2, 100.0) as limits:
            made = limits.network.namespaces
            raise error("boom")
    assert not set(made) & netns_names()


def test_a_build_that_fails_halfway_is_removed_and_reported_as_skipped(monkeypatch):
    require_netns()
    real = slow_link._run

    def fail_on_tc(*argv, netns=None):
        if argv[0] == "tc":
            raise slow_link.NetworkError("`tc qdisc add` failed: no sch_tbf")
        real(*argv, netns=netns)

    monkeypatch.setattr(slow_link, "_run", fail_on_tc)
    spaces = netns_names()
    with pytest.raises(Skipped, match="no sch_tbf"):
        with slow_link_limits(2, 100.0):
            pass
    assert netns_names() == spaces


def test_not_root_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(slow_link.os, "geteuid", lambda: 1000)
    with pytest.raises(Skipped, match="root"):
        with slow_link_limits(2, 100.0):
            pass


def test_addresses_and_bucket():
    assert slow_link.address(0) == "10.214.0.1" and slow_link.address(300) == "10.214.1.45"
    args = slow_link.tbf_args(100)
    assert args[:3] == ["tbf", "rate", "100mbit"] and int(args[args.index("burst") + 1]) >= 64 * 1000 // 8 * 10
