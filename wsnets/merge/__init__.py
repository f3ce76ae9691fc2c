"""Weight synthesis and merging: averages, SWA, soups, task arithmetic, TIES, permutation alignment,
interpolation curves, loss barriers and Bezier mode-connecting curves.

Per-tensor methods (linear, SLERP, task arithmetic, TIES, DARE, breadcrumbs, model stock) are
registered functions (:mod:`wsnets.merge.methods`) that :func:`merge_checkpoints` streams over
checkpoints of any architecture and size (state_dicts, safetensors, sharded Hugging Face layouts), in
bounded memory, or that a TOML config drives (:func:`merge_config`).

The architecture-aware functions below take models as WeightSpaces, ``nn.Module``s, state_dicts or checkpoint paths, checks
they share one architecture (:class:`~wsnets.errors.ArchitectureMismatchError` naming the first
mismatch), and returns a :class:`~wsnets.WeightSpace`. Many networks are evaluated as one batch
(:func:`wsnets.merge.functional.forward`).

>>> import wsnets
>>> from wsnets.merge import average, weight_matching
>>> a, b = (wsnets.WeightSpace.random(wsnets.mlp(4, [8], 2)) for _ in range(2))
>>> b_aligned, perms = weight_matching(a, b)
>>> merged = average([a, b_aligned])
"""

from .align import activation_matching, align, matching_objective, weight_matching
from .average import SWA, average, is_snapshot, swa_lr
from .bezier import BezierCurve, bernstein, train_bezier
from .compat import first_mismatch, gather
from .config import load_config, merge_config
from .registry import Interval, Method, PerModel, get_method, keep_count, list_methods, register
from .shards import open_checkpoint
from .digest import digest_files
from .stream import MergeResult, TensorRule, ingredients, merge_checkpoints
from .functional import evaluate, forward, recompute_bn
from .interpolate import Curve, barrier, interpolate, interpolation_curve, loss_barrier, path_metrics
from .soup import SoupResult, dataset_evaluator, greedy_soup, uniform_soup
from .task_arithmetic import task_arithmetic, task_vectors, ties, ties_vector, trim

__all__ = [
    "average", "SWA", "swa_lr", "is_snapshot", "uniform_soup", "greedy_soup", "SoupResult", "dataset_evaluator",
    "task_vectors", "task_arithmetic", "ties", "ties_vector", "trim", "weight_matching", "activation_matching",
    "align", "matching_objective", "interpolate", "interpolation_curve", "loss_barrier", "barrier", "path_metrics",
    "Curve", "BezierCurve", "train_bezier", "bernstein", "forward", "evaluate", "recompute_bn", "gather",
    "first_mismatch", "merge_checkpoints", "digest_files", "ingredients", "MergeResult", "TensorRule", "merge_config",
    "load_config", "get_method", "list_methods", "register",
    "Method", "PerModel", "Interval", "keep_count", "open_checkpoint",
]
