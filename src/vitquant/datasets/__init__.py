"""Small datasets that ship inside installed packages, so nothing is downloaded at run time."""
from vitquant.datasets.mnist import MNIST5K_MEAN, MNIST5K_STD, mnist5k_split

__all__ = ["MNIST5K_MEAN", "MNIST5K_STD", "mnist5k_split"]
