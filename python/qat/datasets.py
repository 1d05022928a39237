"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (gzip IDX files), for the
examples, the demo and the tests: nothing is downloaded."""

import gzip
import os
import struct
from typing import Tuple

import numpy as np
import torch

__all__ = ["DEFAULT_FASHION_MNIST", "load_fashion_mnist"]

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: str, dims: int) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"qat.datasets: {path} not found; install Debian's dataset-fashion-mnist package "
            f"(apt-get install dataset-fashion-mnist) or pass the folder holding the files")
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    if magic != 0x0800 + dims:
        raise ValueError(f"qat.datasets: {path} is not an IDX file of {dims} dimensions "
                         f"(magic {magic:#x})")
    shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(root: str = DEFAULT_FASHION_MNIST,
                       train: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: float32 images [N, 1, 28, 28] scaled to [0, 1] and int64
    labels [N], of the training (60,000) or test (10,000) split under ``root``.

    Raises:
        FileNotFoundError: naming the missing file and the Debian package that has it.
        ValueError: when a file is not the expected IDX file.
    """
    images_file, labels_file = _FILES[bool(train)]
    images = _read_idx(os.path.join(root, images_file), 3)
    labels = _read_idx(os.path.join(root, labels_file), 1)
    if len(images) != len(labels):
        raise ValueError(f"qat.datasets: {root} holds {len(images)} images but "
                         f"{len(labels)} labels")
    x = torch.from_numpy(images.copy()).float().div_(255).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
