"""The live status page (``--http-port``): ``/api/status``, and the page itself in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request

import grpc
import pytest
import torch

from conftest import fast_timeouts, wait_for

from paramhub.common.pb import paramhub_pb2 as pb
from paramhub.ps.status import from_response, to_response

pytestmark = pytest.mark.timeout(120)
GRAD = pb.PUSH_KIND_GRADIENT


def get(port: int, path: str) -> tuple[str, bytes]:
    """(Content-Type, body) of ``GET path``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return reply.headers["Content-Type"], reply.read()


def api_status(port: int) -> dict:
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON: browsers refuse it")

    content_type, body = get(port, "/api/status")
    assert content_type == "application/json"
    return json.loads(body, parse_constant=refuse)


def push(client, base_version: int, loss: float, value: float = 0.0) -> pb.PushResponse:
    grads = [torch.full((region.numel,), value) for region in client.info.layout.regions]
    return client.push(GRAD, base_version, grads, num_samples=4, loss=loss)


def test_api_status_reports_version_workers_staleness_and_loss(start_server, connect):
    server = start_server(http_port=0, workers=2)
    before = api_status(server.http_port)
    assert (before["version"], before["last_loss"], before["loss_history"]["version"]) == (0, None, [])
    a, b = connect(server.port), connect(server.port)
    a.join("alpha", shard=0), b.join("beta", shard=1)
    for version in range(2):
        push(a, version, loss=1.0 + version)
        push(b, version, loss=3.0 + version)
    status = api_status(server.http_port)
    assert (status["version"], status["mode"], status["update"], status["done"]) == (2, "sync", "grad", False)
    assert (status["workers_expected"], status["staleness_bound"]) == (2, 0)
    assert (status["pushes_applied"], status["pushes_dropped"], status["pushes_rejected"]) == (4, 0, 0)
    assert status["staleness_histogram"] == [[0, 4]]
    assert status["loss_history"]["version"] == [1, 2]
    assert status["loss_history"]["loss"] == [pytest.approx(2.0), pytest.approx(3.0)]  # each round's mean loss
    assert status["last_loss"] == pytest.approx(3.0)
    assert status["accuracy_history"] == {"version": [], "time": [], "top1": [], "top5": [], "loss": []}
    workers = {w["name"]: w for w in status["workers"]}
    assert set(workers) == {"alpha", "beta"}
    for name, loss in (("alpha", 2.0), ("beta", 4.0)):
        w = workers[name]
        assert (w["state"], w["last_base_version"], w["staleness"], w["applied"], w["dropped"]) == (
            "alive", 1, 0, 2, 0)
        assert w["last_loss"] == pytest.approx(loss) and 0 <= w["seconds_since_seen"] < 5
        assert w["pushes_per_second"] == pytest.approx(2 / server.metrics.window_s)
    assert status["pushes_per_second"] == pytest.approx(4 / server.metrics.window_s)


def test_the_page_and_the_status_rpc_show_one_view(start_server, connect):
    server = start_server(http_port=0, workers=2, backup_workers=1)
    a, b, c = connect(server.port), connect(server.port), connect(server.port)
    a.join("alpha", shard=0), b.join("beta", shard=1), c.join("gamma", shard=2)
    push(a, 0, loss=1.0)  # N - b = 1 push closes round 0
    assert push(b, 0, loss=2.0).outcome == pb.PUSH_OUTCOME_DROPPED
    with pytest.raises(grpc.RpcError):
        push(a, 7, loss=1.0)  # based on a version the server never had: rejected
    c.leave()
    page, reply = api_status(server.http_port), a.status()
    run = ("version", "done", "mode", "update", "pushes_applied", "pushes_rejected", "departed_workers")
    assert [page[key] for key in run] == [getattr(reply, key) for key in run] == [1, False, "sync", "grad", 1, 1, 1]
    assert page["staleness_histogram"] == [[h.staleness, h.count] for h in reply.staleness_histogram] == [[0, 1]]
    rows = {w["name"]: (w["state"], w["applied"], w["accepted"], w["dropped"]) for w in page["workers"]}
    assert rows == {w.name: (w.state, w.applied, w.accepted, w.dropped) for w in from_response(reply).workers} == {
        "alpha": ("alive", 1, 1, 0), "beta": ("alive", 0, 0, 1), "gamma": ("left", 0, 0, 0)}


def test_a_status_reply_lists_the_workers_that_fit_and_counts_the_rest(start_server, connect):
    server = start_server(workers=3)
    for name in ("alpha", "beta", "gamma"):
        connect(server.port).join(name)
    view = server.servicer.status()
    one = to_response(view, budget_bytes=to_response(view, 1 << 20).workers[0].ByteSize() + 4)
    assert [w.worker_name for w in one.workers] == ["alpha"] and one.workers_not_listed == 2
    back = from_response(one)
    assert [w.name for w in back.workers] == ["alpha"] and (back.not_listed, back.live_workers) == (2, 3)


def test_a_silent_worker_shows_as_lost(start_server, connect):
    server = start_server(http_port=0, timeouts=fast_timeouts(lease=0.3))
    connect(server.port).join("quiet")  # joins, then never calls again
    worker = wait_for(lambda: [w for w in api_status(server.http_port)["workers"] if w["state"] == "lost"])[0]
    assert worker["name"] == "quiet" and worker["seconds_since_seen"] > 0.3


def test_the_page_is_self_contained_and_other_paths_are_404(start_server):
    server = start_server(http_port=0)
    content_type, body = get(server.http_port, "/")
    page = body.decode()
    assert content_type == "text/html; charset=utf-8"
    assert "/api/status" in page
    # nothing to fetch from elsewhere: no external scripts, styles, images or fonts
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"@import|url\(", page)
    with pytest.raises(urllib.error.HTTPError) as err:
        get(server.http_port, "/secrets")
    assert err.value.code == 404


@pytest.fixture
def evaluated_run(start_server, connect):
    """A server that evaluates every version, run by ``run_until_done`` in a thread, after 3 updates.

    Yields (server, worker name). Each update waits for its evaluation, so the
    accuracy history has exactly one point per version.
    """
    server = start_server(http_port=0, eval_data="synthetic", eval_every=1, eval_image_size=8, eval_size=32)
    runner = threading.Thread(target=server.run_until_done, name="run-until-done")
    runner.start()
    try:
        client = connect(server.port)
        client.join("worker-zero", shard=0)
        for version in range(3):
            push(client, version, loss=2.0 - 0.5 * version, value=0.1)
            wait_for(lambda: len(api_status(server.http_port)["accuracy_history"]["version"]) == version + 1)
        yield server, "worker-zero"
    finally:
        server.stop()
        runner.join(timeout=30)


def test_evaluations_fill_the_accuracy_history(evaluated_run):
    server, _ = evaluated_run
    history = api_status(server.http_port)["accuracy_history"]
    assert history["version"] == [1, 2, 3]
    assert all(0 <= top1 <= 1 for top1 in history["top1"]) and all(loss > 0 for loss in history["loss"])


CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=5000"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium; .ci/run does)")
def test_the_page_draws_the_run_in_a_headless_browser(evaluated_run, tmp_path):
    server, worker = evaluated_run
    url = f"http://127.0.0.1:{server.http_port}/"
    browser = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dump = subprocess.run(browser + ["--dump-dom", url], capture_output=True, text=True, timeout=90)
    assert dump.returncode == 0, dump.stderr[-2000:]
    dom = dump.stdout

    def element(pattern: str) -> str:
        found = re.search(pattern, dom, re.S)
        assert found, f"{pattern} not in the page:\n{dom[:3000]}"
        return found.group(0)

    # both plots drawn from /api/status: one point per version
    for plot in ("loss-plot", "accuracy-plot"):
        svg = element(rf'<svg[^>]*id="{plot}".*?</svg>')
        assert re.search(r'<polyline[^>]*data-points="3"', svg), svg
        assert svg.count("<circle") == 3
    assert 'data-bars="1"' in element(r'<svg[^>]*id="staleness-plot"[^>]*>')  # sync: staleness 0 only
    row = element(rf'<tr data-worker="{worker}">.*?</tr>')
    assert re.findall(r"<td[^>]*>(.*?)</td>", row)[:5] == [worker, "alive", "2", "0", "3"]
    assert re.search(r'id="version">3<', dom)
    shot = tmp_path / "status.png"
    taken = subprocess.run(browser + ["--window-size=1280,1000", f"--screenshot={shot}", url],
                           capture_output=True, text=True, timeout=90)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
