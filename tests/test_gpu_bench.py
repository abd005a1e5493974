"""The GPU worker benchmark runs end to end (on the CPU here, tiny settings): it is ready for a lent GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_gpu_bench_smoke_on_cpu():
    result = subprocess.run(
        [sys.executable, "-m", "paramhub.tools.gpu_bench", "--device", "cpu", "--model", "mlp", "--classes", "4",
         "--image-size", "16", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--no-amp"],
        capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["alone_images_per_s"] > 0 and report["with_server_images_per_s"] > 0
    assert report["overlapped_images_per_s"] > 0 and report["overlapped_ratio"] > 0
