"""ps-data: real processes split an ImageFolder and a CIFAR-10 directory; in-process (click's runner) it
verifies and refuses bad input; and a real ps-worker leaves after --epochs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from paramhub.common.data import training_shard
from paramhub.tools import data as cli
from paramhub.tools.cluster import LocalCluster
from test_shards import COLOURS, corrupt, write_fake_cifar, write_image_folder

pytestmark = pytest.mark.timeout(120)

PS_DATA = [sys.executable, "-m", "paramhub.tools.data"]


def ps_data(*args) -> subprocess.CompletedProcess:
    """ps-data as a real process."""
    return subprocess.run([*PS_DATA, *map(str, args)], capture_output=True, text=True, timeout=90)


def ps_data_here(*args):
    """ps-data in this process (no 3 s interpreter start); the result has exit_code, stdout, stderr."""
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def test_split_an_image_folder_then_every_worker_reads_its_shard(tmp_path):
    src = write_image_folder(tmp_path / "train")  # cat red, dog green, eel blue; 12 each
    out = tmp_path / "shards"
    result = ps_data("split", "--input", src, "--shards", 3, "--out", out, "--seed", 7, "--val-fraction", 0.25)
    assert result.returncode == 0, result.stderr
    assert f"imagefolder {src}: 3 classes; 3 shards of 9..9 images in {out}" in result.stdout
    assert "held out 9 images" in result.stdout
    top = json.loads((out / "manifest.json").read_text())
    assert top["seed"] == 7 and top["classes"] == ["cat", "dog", "eel"]
    assert [s["images_per_class"] for s in top["shards"]] == [{"cat": 3, "dog": 3, "eel": 3}] * 3

    seen = set()
    for shard in range(3):
        data = training_shard(str(out), shard, 3, num_classes=3, image_size=16, augment="none")
        for path, _ in data.dataset.samples:
            seen.add((path.split("/")[-2], path.split("/")[-1]))
        for image, label in data:
            assert int(image.mean((1, 2)).argmax()) == label  # the label is the colour the image shows
    assert len(seen) == 27

    verified = ps_data_here("verify", out)
    assert verified.exit_code == 0 and "every file matches" in verified.stdout
    Image.new("RGB", (16, 16), (0, 0, 0)).save(next((out / "val" / "dog").iterdir()))
    verified = ps_data_here("verify", out)
    assert verified.exit_code == 1
    assert "checksum differs" in verified.stderr and "1 problem(s)" in verified.stderr


def test_split_a_cifar10_python_directory(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py", label_names=(b"ship", b"bird"), per_batch=4)
    out = tmp_path / "shards"
    result = ps_data("split", "--input", tmp_path / "cifar-10-batches-py", "--shards", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "cifar10" in result.stdout and "2 shards of 10..10 images" in result.stdout
    pngs = sorted(out.glob("shard-*/*/*.png"))
    assert len(pngs) == 20 and {p.parent.name for p in pngs} == {"bird", "ship"}
    assert all(Image.open(p).size == (32, 32) for p in pngs)
    assert not (out / "val").exists()
    data = training_shard(str(out / "shard-00001"), 1, 2, num_classes=2, image_size=32, augment="none")
    assert len(data) == 10 and data.dataset.classes == ["bird", "ship"]


@pytest.mark.parametrize("setup, args, code, message", [
    (lambda t: None, ["--shards", "2"], 1, "does not exist"),
    (lambda t: (t / "in").mkdir(), ["--shards", "2"], 1, "no class sub-directories"),
    (lambda t: corrupt(write_image_folder(t / "in")), ["--shards", "2"], 1, "dog003.png: not a readable image"),
    (lambda t: write_image_folder(t / "in", {"cat": 2, "dog": 1}), ["--shards", "4"], 1, "cannot fill 4 shards"),
    (lambda t: write_image_folder(t / "in", {"cat": 2}), ["--shards", "0"], 2, "Invalid value for '--shards'"),
    (lambda t: write_image_folder(t / "in", {"cat": 2}), ["--shards", "1", "--val-fraction", "1"], 2,
     "Invalid value for '--val-fraction'"),
], ids=["missing", "empty", "corrupt", "too-many-shards", "zero-shards", "val-fraction-1"])
def test_bad_input_exits_non_zero_with_a_message_and_writes_nothing(tmp_path, setup, args, code, message):
    setup(tmp_path)
    result = ps_data_here("split", "--input", tmp_path / "in", "--out", tmp_path / "out", *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in"] if (tmp_path / "in").exists() else [])


def test_a_non_empty_output_needs_force(tmp_path):
    src = write_image_folder(tmp_path / "in", {"cat": 3, "dog": 3})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    result = ps_data_here("split", "--input", src, "--shards", 2, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "pass --force" in result.stderr
    assert (tmp_path / "out" / "old.txt").exists()
    result = ps_data_here("split", "--input", src, "--shards", 2, "--out", tmp_path / "out", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "shard-00000", "shard-00001"]


@pytest.mark.slow
def test_a_real_worker_leaves_after_its_epochs_and_exits_0(tmp_path):
    src = write_image_folder(tmp_path / "train", {name: 8 for name in COLOURS})
    assert ps_data("split", "--input", src, "--shards", 2, "--out", tmp_path / "shards").returncode == 0
    with LocalCluster(tmp_path / "run") as cluster:
        cluster.start_server("--model", "mlp", "--num-classes", "3", "--workers", "1", "--max-steps", "1000")
        worker = cluster.start_worker(1, "--num-shards", "2", "--data", str(tmp_path / "shards"), "--epochs", "2",
                                      "--image-size", "16", "--batch-size", "4", "--log-every", "1",
                                      "--connect-timeout", "30")
        code = worker.wait(timeout=90)
        log = cluster.read_log("worker1")
    assert code == 0, log
    assert "12 samples in shard" in log and "finished 2 epoch(s)" in log
    assert "done after 6 steps" in log  # 12 images / 4 per batch, twice
