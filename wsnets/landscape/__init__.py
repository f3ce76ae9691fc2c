"""Loss-landscape geometry of a network in weight space.

Directions (:mod:`.directions`), batched 1D/2D loss surfaces (:mod:`.surface`), Hessian spectra
(:mod:`.hessian`), intrinsic dimension (:mod:`.intrinsic`), sharpness summaries (:mod:`.sharpness`)
and plots (:mod:`.plot`). The command line is ``wsnets landscape surface|hessian|intrinsic``.
"""

from .directions import (Plane, interpolation_directions, normalize_direction, pca_directions, random_direction,
                         random_directions)
from .hessian import (HessianOperator, SpectralDensity, hutchinson_trace, lanczos, power_iteration, slq_density,
                      top_eigenvalues)
from .intrinsic import (DenseProjection, FastfoodProjection, IntrinsicResult, SparseProjection, d_int90,
                        intrinsic_dimension, make_projection)
from .sharpness import flatness, sharpness
from .surface import Surface, evaluate_points, naive_surface, surface_1d, surface_2d

__all__ = [
    "Plane", "random_direction", "random_directions", "normalize_direction", "interpolation_directions",
    "pca_directions", "Surface", "evaluate_points", "naive_surface", "surface_1d", "surface_2d",
    "HessianOperator", "SpectralDensity", "top_eigenvalues", "power_iteration", "lanczos", "hutchinson_trace",
    "slq_density", "DenseProjection", "SparseProjection", "FastfoodProjection", "make_projection",
    "intrinsic_dimension", "IntrinsicResult", "d_int90", "sharpness", "flatness",
]
