"""Model zoos: offline datasets, recipes, a batched trainer, a crash-safe store and loaders.

``wsnets.zoo.datasets.load(name)`` gives the fixed train/test split of an offline dataset; the rest
of the package (recipes, trainer, store, :class:`ZooDataset`) builds on it.
"""

from . import datasets

__all__ = ["datasets"]
