"""Data: sources, fingerprints, the S_S/S_C/S_I/S_E splits and augmentation sets."""

from memlens.data.augment import AUGMENTATIONS, Augmenter
from memlens.data.dataset import Dataset
from memlens.data.sources import load
from memlens.data.splits import Splits, make_splits

__all__ = ["AUGMENTATIONS", "Augmenter", "Dataset", "Splits", "load", "make_splits"]
