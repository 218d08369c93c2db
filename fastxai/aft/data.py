"""Fashion-MNIST from its original gzip IDX files (Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "FASHION_MNIST_DIR"  # overrides the folder
INSTALL_COMMAND = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Per-pixel mean and standard deviation of the 60k training images (intensities in [0, 1]).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UBYTE = 0x08


def fashion_mnist_dir() -> Path:
    """The folder holding the IDX files: ``$FASHION_MNIST_DIR`` or the Debian package's."""
    return Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR))


def fashion_mnist_missing(root: str | os.PathLike[str] | None = None) -> str | None:
    """``None`` when all four files exist, else a message naming the install command."""
    folder = Path(root) if root is not None else fashion_mnist_dir()
    missing = [name for pair in _FILES.values() for name in pair if not (folder / name).is_file()]
    if not missing:
        return None
    return (
        f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}); "
        f"install it with `{INSTALL_COMMAND}` (as root) or set ${FASHION_MNIST_ENV}"
    )


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """An unsigned-byte IDX file (gzip-compressed or not) as a uint8 tensor of its shape.

    Format: two zero bytes, the type code 0x08, the number of dimensions ``d``, ``d`` big-endian
    uint32 sizes, then the data in row-major order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        data = stream.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = 1
    for size in shape:
        count *= size
    if len(data) - header != count:
        raise ValueError(
            f"{path}: the header gives {count} bytes of data, the file holds {len(data) - header}"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(
    split: Literal["train", "test"] = "train", root: str | os.PathLike[str] | None = None
) -> tuple[Tensor, Tensor]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` long of the ``"train"`` (60k) or
    ``"test"`` (10k) split. Raises ``FileNotFoundError`` with the install command when missing."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else fashion_mnist_dir()
    message = fashion_mnist_missing(folder)
    if message:
        raise FileNotFoundError(message)
    image_file, label_file = _FILES[split]
    images = read_idx(folder / image_file)
    labels = read_idx(folder / label_file).long()
    if images.dim() != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{folder}: {split} images {tuple(images.shape)} and labels "
            f"{tuple(labels.shape)} do not match"
        )
    return images, labels


def normalise(images: Tensor) -> Tensor:
    r"""uint8 ``(N, H, W)`` -> float ``(N, 1, H, W)``: :math:`(x/255 - \mu) / \sigma`.

    A muted pixel (0 after normalisation) then takes the dataset's mean intensity.
    """
    return ((images.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)[:, None]
