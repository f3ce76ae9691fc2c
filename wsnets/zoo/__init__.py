"""Model zoos: offline datasets, recipes, a batched trainer, a crash-safe store and loaders.

* ``datasets.load(name)``: fixed train/test split of an offline dataset (:mod:`wsnets.zoo.datasets`).
* ``load_recipe(path)`` / ``build(recipe, out)``: train a population as one computation per group and
  write it to a crash-safe store (:mod:`wsnets.zoo.build`, :mod:`wsnets.zoo.store`).
* ``open(DIR)`` -> :class:`Zoo`: filter rows, read metrics, ``load()`` a WeightSpace, ``to_module()``.
* :class:`ZooDataset`: any representation (graph, tensors, flat, stats, esd) with targets and splits.
"""

from . import datasets
from .build import build, plan
from .recipe import Recipe, RunSpec, load_recipe, parse_recipe
from .records import Record, Zoo, open
from .store import merge

__all__ = ["datasets", "build", "plan", "Recipe", "RunSpec", "load_recipe", "parse_recipe", "Record", "Zoo", "open",
           "merge", "ZooDataset"]


def __getattr__(name: str):
    if name == "ZooDataset":
        from .dataset import ZooDataset
        return ZooDataset
    raise AttributeError(name)
