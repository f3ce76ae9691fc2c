"""wsnets: neural-network weights as data.

Load any checkpoint into a :class:`WeightSpace`, turn it into a neural graph, per-layer tensors, a
flat vector or weight statistics, and feed model zoos, equivariant meta-models, ESD analysis,
merging and loss-landscape tools from the same object.
"""

from .arch import Architecture, Layer, cnn, mlp
from .errors import (ArchitectureMismatchError, CheckpointError, ConfigError, MissingKeyError,
                     NonFiniteWeightsError, ShapeMismatchError, SpatialFlattenError, UnsafeCheckpointError,
                     UnsupportedLayerError, WSNetsError)
from .graph import from_graph, to_batch, to_graph
from .io import load, save
from .symmetry import PermutationSpec, fold_batchnorm, permutation_spec, permute, random_permute
from .weights import WeightSpace, stack

__version__ = "0.1.0"

__all__ = [
    "Architecture", "Layer", "mlp", "cnn", "WeightSpace", "stack", "load", "save", "to_graph", "to_batch",
    "from_graph", "PermutationSpec", "permutation_spec", "permute", "random_permute", "fold_batchnorm",
    "WSNetsError", "CheckpointError", "UnsafeCheckpointError", "NonFiniteWeightsError", "UnsupportedLayerError",
    "SpatialFlattenError", "ShapeMismatchError", "MissingKeyError", "ArchitectureMismatchError", "ConfigError",
]
