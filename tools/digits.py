"""Writes a small real image dataset as an ImageFolder: scikit-learn's handwritten digits.

1,797 scans of handwritten digits (UCI's optical recognition set), 8x8 grey
levels, shipped inside scikit-learn, so nothing is downloaded. Each becomes a
32x32 RGB PNG under ``OUT/<digit>/``, ready for ``ps-data split``::

    pip install scikit-learn
    python -m paramhub.tools.digits --out data/digits
"""

from __future__ import annotations

import pathlib

import click
import numpy as np
from PIL import Image


def write_digits(out: str | pathlib.Path, size: int = 32) -> int:
    """Writes the 1,797 digits under ``out/<digit>/NNNN.png`` (``out`` must be new or empty); returns the count.

    Raises:
        ImportError: scikit-learn is not installed.
        FileExistsError: ``out`` holds files.
    """
    from sklearn.datasets import load_digits

    root = pathlib.Path(out)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty")
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = (image / 16.0 * 255).astype(np.uint8)
        Image.fromarray(grey).resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{i:04d}.png")
    return len(digits.images)


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to create.")
@click.option("--size", default=32, show_default=True, type=click.IntRange(min=8), help="Output image size.")
def main(out: str, size: int) -> None:
    """Write scikit-learn's handwritten digits as an ImageFolder tree."""
    try:
        count = write_digits(out, size)
    except ImportError:
        raise click.ClickException("needs scikit-learn: pip install scikit-learn") from None
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {count} images in 10 classes to {out}")


if __name__ == "__main__":
    main()
