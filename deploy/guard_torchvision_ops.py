"""Makes sure torchvision imports and builds a model in this image; run once by deploy/Dockerfile.

torchvision's wheels on PyPI are CUDA builds: beside a CPU-only torch (an offline build from a
wheelhouse, where download.pytorch.org's CPU torchvision cannot be reached) its C++ ops
(nms, roi_align, ...) cannot load. torchvision guards every fake-tensor registration of those ops
on their having loaded but two (nms and qnms), so its import fails with "operator torchvision::nms
does not exist". This guards those two the way the others are guarded. paramhub uses none of the
ops (models, datasets and transforms are pure Python); a call to one raises torchvision's own
"Couldn't load custom C++ ops" error. With the ops loadable, nothing is changed.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

UNGUARDED = ('@torch.library.register_fake("torchvision::nms")', '@torch.library.register_fake("torchvision::qnms")')
SMOKE = ("import torch, torchvision; "
         "out = torchvision.models.resnet18(num_classes=3)(torch.zeros(2, 3, 32, 32)); "
         "assert out.shape == (2, 3), out.shape; "
         "print('torchvision', torchvision.__version__, 'on torch', torch.__version__, "
         "'C++ ops loaded:', torchvision.extension._has_ops())")


def smoke() -> subprocess.CompletedProcess:
    """Imports torchvision and runs a ResNet in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", SMOKE], capture_output=True, text=True)


def guard(source: str) -> str:
    """``source`` (torchvision/_meta_registrations.py) with the two unguarded registrations guarded."""
    for decorator in UNGUARDED:
        if source.count(decorator) != 1:
            raise SystemExit(f"torchvision's _meta_registrations.py no longer reads {decorator}: check this script")
        source = source.replace(decorator, f"@({decorator[1:]} if torchvision.extension._has_ops() else (lambda f: f))")
    return source


def main() -> None:
    result = smoke()
    if result.returncode == 0:
        print(result.stdout.strip())
        return
    if "torchvision::nms does not exist" not in result.stderr:
        raise SystemExit(f"torchvision does not import:\n{result.stderr}")
    path = pathlib.Path(importlib.util.find_spec("torchvision").origin).parent / "_meta_registrations.py"
    path.write_text(guard(path.read_text()))
    result = smoke()
    if result.returncode != 0:
        raise SystemExit(f"torchvision still does not import after guarding its ops:\n{result.stderr}")
    print(result.stdout.strip(), f"(guarded nms and qnms in {path})")


if __name__ == "__main__":
    main()
