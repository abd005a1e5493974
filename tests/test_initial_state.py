"""The server's initial weights built in a child process, so that ps-server never imports torchvision."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time

import pytest
import torch

from paramhub.common.models import WeightsError, initial_state, initial_state_in_child

pytestmark = pytest.mark.timeout(120)


def test_the_child_builds_exactly_what_this_process_builds():
    here = initial_state("resnet18", 5, seed=3)
    child = initial_state_in_child("resnet18", 5, seed=3)
    assert list(child.state) == list(here.state)  # the state_dict's order, which the layout follows
    assert all(torch.equal(child.state[k], here.state[k]) for k in here.state)
    assert child.param_names == here.param_names and child.head == here.head == ["fc.weight", "fc.bias"]


def test_a_bad_weights_file_is_reported_from_the_child(tmp_path):
    with pytest.raises(WeightsError, match="no weights file"):
        initial_state_in_child("mlp", 3, init_from=str(tmp_path / "missing.safetensors"))


def test_the_server_process_does_not_import_torchvision():
    # torchvision imports torch._dynamo and sympy: 164 MB resident for the whole run
    code = ("import sys, paramhub.ps.cli, paramhub.ps.server, paramhub.tools.bench; "
            "sys.exit(1 if 'torchvision' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=100).returncode == 0


def test_a_child_that_takes_too_long_is_killed_and_reported():
    from paramhub.common import models

    with pytest.raises(RuntimeError, match="took over"):
        models.initial_state_in_child("resnet18", 5, timeout_s=0.01)  # it cannot even import torch that fast


def test_a_child_that_dies_is_reported():
    from paramhub.common import models

    outcome: dict[str, str] = {}

    def build():
        try:
            models.initial_state_in_child("resnet18", 5)
        except RuntimeError as exc:
            outcome["error"] = str(exc)

    builder = threading.Thread(target=build)
    builder.start()
    deadline = time.monotonic() + 30
    while not multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    for child in multiprocessing.active_children():
        child.kill()  # long before it has imported torchvision and built the model
    builder.join(timeout=60)
    assert "died" in outcome.get("error", "")
